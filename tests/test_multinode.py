"""A training stage over 2 nodes x 1 process on this machine, through the multi-node path: node 0 is the stage
task, node 1 a `train-node` flow run that a real process worker picks up from its per-host work queue."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_deployments import stop
from test_flows import free_port

from nanochat_core.checkpoint import latest_checkpoint
from nanochat_core.pipeline import stages
from nanochat_core.pipeline.launch import Nodes

REPO = Path(__file__).resolve().parents[1]
POOL = "nanochat-multinode-test"
BASE = {"depth": 2, "max_seq_len": 64, "device_batch_size": 4, "total_batch_size": 512, "num_iterations": 6,
        "eval_every": -1, "eval_tokens": 1024, "save_every": 3, "device_type": "cpu"}


@pytest.fixture
def node1_worker(prefect_api, tmp_path):
    """The train-node deployment on a process pool, and a worker serving the node-1 queue (host 1)."""
    from prefect.client.orchestration import get_client

    from flows.deploy import register
    from flows.multinode import node_queue

    register(str(tmp_path / "store"), pool=POOL, names=["train-node"])  # what `nanochat deploy` does
    with get_client(sync_client=True) as client:
        if not _queue_exists(client):
            client.create_work_queue(name=node_queue(1), work_pool_name=POOL)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "2",
           "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--work-queue",
                             node_queue(1)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield tmp_path / "worker.log"
    stop(proc, signal.SIGTERM, grace=5)  # an idle worker can sit on SIGTERM for 30 s+; nothing is left to check
    log.close()


def _queue_exists(client) -> bool:
    from flows.multinode import node_queue

    try:
        client.read_work_queue_by_name(node_queue(1), work_pool_name=POOL)
        return True
    except Exception:  # noqa: BLE001 - absent
        return False


def test_base_stage_over_two_nodes(prefect_api, node1_worker, shared_data, tmp_path):
    from prefect import flow

    from flows.tasks import run_stage

    store = str(tmp_path / "store")
    shards = stages.run_stage("shards", stages.make_config("shards", {"source": str(shared_data)}), {}, store)
    tok = stages.run_stage("tokenizer", stages.make_config("tokenizer", {"vocab_size": 512, "max_chars": 500_000}),
                           {"shards": shards}, store)
    nodes = Nodes(nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=free_port())

    @flow(name="two-node-base")
    def two_node_base():
        return run_stage("base", BASE, {"shards": shards, "tokenizer": tok}, store, nproc=1, nodes=nodes)

    t0 = time.time()
    ref, cached, _ = two_node_base()
    base_dir = Path(ref.uri)
    assert not cached
    ckpt = latest_checkpoint(base_dir)
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2, node1_worker.read_text()[-3000:]
    assert (ckpt / "optim_rank1.pt").is_file() and (ckpt / "state_rank1.pt").is_file()  # written by node 1
    metrics = json.loads((base_dir / "MANIFEST.json").read_text())["metrics"]
    assert metrics["steps"] == 6 and metrics["val_bpb"] is not None
    print(f"2-node base stage: {time.time() - t0:.1f}s")
