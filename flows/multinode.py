"""Training stages across several hosts: one torchrun per node, each launched by a Prefect worker.

The stage task (node 0) starts one `train-node` flow run per other node, each on that node's work queue
(`node-1`, `node-2`, ...: run `prefect worker start --pool nanochat --work-queue node-K` on host K), then
runs node 0's torchrun itself with the same static rendezvous (node 0's address and a port), and commits
the artifact once every node has finished. The nodes must share the store (one filesystem path): every rank
writes its checkpoint shard into the stage's work directory, which is how a crashed multi-node stage
resumes, exactly, on the same number of nodes.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger

from flows.tasks import StageOutput, _refs
from nanochat_core.pipeline import stages
from nanochat_core.pipeline.launch import Nodes

TRAIN_NODE_DEPLOYMENT = "train-node/train-node"


def node_queue(node_rank: int) -> str:
    return f"node-{node_rank}"


@flow(name="train-node", log_prints=True)
def train_node(plan: dict[str, Any], inputs: dict[str, dict[str, str]], store: str, nproc: int,
               nnodes: int, node_rank: int, master_addr: str, master_port: int) -> None:
    """Node `node_rank` (> 0) of a multi-node stage: this host's torchrun; node 0 commits the artifact."""
    nodes = Nodes(nnodes, node_rank, master_addr, master_port)
    nodes.validate()
    if node_rank == 0:
        raise ValueError("node 0 is run by the stage task itself, not by train-node")
    plan = stages.StagePlan.from_dict(plan)
    stage = plan.stage
    logger = get_run_logger()
    logger.info(f"{stage}: node {node_rank}/{nnodes} joining {master_addr}:{master_port}, {nproc} process(es)")
    stages.run_process(plan, _refs(inputs), nproc, on_line=StageOutput(stage, logger, label=f"{stage}-node{node_rank}"),
                       nodes=nodes)


def start_other_nodes(params: dict[str, Any], nodes: Nodes) -> list[FlowRun]:
    """A train-node flow run for each node but 0, each on its host's work queue (returns at once)."""
    runs = []
    for rank in range(1, nodes.nnodes):
        parameters = {**params, "nnodes": nodes.nnodes, "node_rank": rank, "master_addr": nodes.master_addr,
                      "master_port": nodes.master_port}
        runs.append(run_deployment(TRAIN_NODE_DEPLOYMENT, parameters=parameters, timeout=0,
                                   work_queue_name=node_queue(rank)))
    return runs


def wait_for_nodes(runs: list[FlowRun], timeout: float = 600.0) -> None:
    """Every other node's run must end Completed; raise naming the first that did not."""
    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        for run in runs:
            while True:
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    break
                if time.time() > deadline:
                    raise TimeoutError(f"node run {run.name} ({run.id}) did not finish within {timeout:.0f}s")
                time.sleep(1.0)
            if not state.is_completed():
                raise RuntimeError(f"node run {run.name} ({run.id}) ended {state.name}: {state.message}")
