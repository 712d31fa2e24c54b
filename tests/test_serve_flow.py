"""The chat server as a run of the `serve` deployment: the speedrun's last task starts that run (served here
by a real runner process), waits for /health, reuses it for the same model, and cancelling the run (what the
UI's Cancel does) stops the server."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from uuid import UUID

import pytest
import torch
from test_deployments import stop
from test_flows import free_port

from nanochat_core.checkpoint import save_final_model
from nanochat_core.gpt import GPT, config_for_depth
from nanochat_core.pipeline import artifacts
from nanochat_core.tokenizer import Tokenizer

RUNNER = ("from prefect import serve; from flows.serve import serve as serve_flow; "
          "serve(serve_flow.to_deployment(name='serve'))")


@pytest.fixture(scope="module")
def chat_model(tiny_tokenizer_dir, tmp_path_factory) -> artifacts.ArtifactRef:
    return commit_chat_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("store"))


def commit_chat_model(tiny_tokenizer_dir: Path, root: Path) -> artifacts.ArtifactRef:
    """A model artifact the way the sft stage commits one: final model files + a manifest naming its tokenizer."""
    tok_dir = root / "tokenizer"
    Tokenizer.load(tiny_tokenizer_dir).save(tok_dir)
    tok_digest = artifacts.write_manifest(tok_dir, "tokenizer", {}, {}, "test")
    torch.manual_seed(0)
    model = GPT(config_for_depth(1, Tokenizer.load(tok_dir).get_vocab_size(), 128))
    model.init_weights()
    model_dir = root / "sft"
    save_final_model(model_dir, model, {"model_config": asdict(model.config), "stage": "sft"})
    digest = artifacts.write_manifest(model_dir, "sft", {}, {"tokenizer": tok_digest}, "test",
                                      inputs={"tokenizer": str(tok_dir)})
    return artifacts.ArtifactRef(str(model_dir), digest)


@pytest.fixture(scope="module")
def runner(prefect_api, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("runner") / "runner.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", RUNNER], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    yield log_path
    stop(proc, signal.SIGINT, grace=5)  # an idle runner can sit on SIGINT for 30 s+; nothing is left to check


def test_serve_run_holds_the_server_and_cancelling_it_stops_it(prefect_api, runner, chat_model, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from flows.serve import flow_run_state, health, start_serve_run

    deadline = time.time() + 90
    while True:  # the runner registers the deployment when it starts
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name("serve/serve")
                break
            except Exception:  # noqa: BLE001 - not yet
                if time.time() > deadline:
                    pytest.fail("the serve deployment was never registered:\n" + Path(runner).read_text()[-3000:])
        time.sleep(1)
    port = free_port()
    info = start_serve_run("serve/serve", chat_model, "127.0.0.1", port, tmp_path)
    assert not info["reused"] and health(info["url"])["status"] == "ok"
    assert flow_run_state(info["flow_run_id"]).is_running()
    assert json.loads((tmp_path / f"server-{port}.json").read_text())["flow_run_id"] == info["flow_run_id"]

    again = start_serve_run("serve/serve", chat_model, "127.0.0.1", port, tmp_path)
    assert again["reused"] and again["flow_run_id"] == info["flow_run_id"]

    with get_client(sync_client=True) as client:  # the UI's Cancel
        client.set_flow_run_state(UUID(info["flow_run_id"]), Cancelling(), force=True)
    deadline = time.time() + 90
    while health(info["url"]) is not None:
        if time.time() > deadline:
            pytest.fail("the server still answers after its flow run was cancelled")
        time.sleep(1)
    while not flow_run_state(info["flow_run_id"]).is_final():
        if time.time() > deadline:
            pytest.fail("the cancelled serve run never reached a final state")
        time.sleep(1)
    assert flow_run_state(info["flow_run_id"]).is_cancelled()
