"""The evaluate flow against a real Prefect server: scanning a store, results keyed by checkpoint digest and
task set (nothing evaluated twice), and the deployment that a `nanochat.checkpoint.saved` event triggers,
served by a real `nanochat deploy` process."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_deployments import stop, wait_for

from nanochat_core.pipeline import artifacts, stages

MICRO = {
    "tokenizer": {"vocab_size": 512, "max_chars": 1_000_000},
    "base": {"depth": 2, "max_seq_len": 64, "device_batch_size": 8, "total_batch_size": 512,
             "num_iterations": 20, "eval_every": 10, "eval_tokens": 2048, "save_every": 10, "device_type": "cpu"},
}
TASKS = "ARC-Easy"


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_data):
    """A store with a finished tiny base model: its final model plus the checkpoints at steps 10 and 20."""
    root = str(tmp_path_factory.mktemp("store"))
    shards = stages.run_stage("shards", stages.make_config("shards", {"source": str(shared_data)}), {}, root)
    tok = stages.run_stage("tokenizer", stages.make_config("tokenizer", MICRO["tokenizer"]), {"shards": shards}, root)
    stages.run_stage("base", stages.make_config("base", MICRO["base"]), {"shards": shards, "tokenizer": tok}, root)
    return root


def eval_dirs(store) -> set[str]:
    return {p.name for p in (Path(store) / "eval").glob("*") if (p / "MANIFEST.json").is_file()}


def test_models_in_a_store_and_their_tokenizer(store):
    models = [Path(m) for m in stages.find_models(store)]
    assert [m.name for m in models] == ["step_000010", "step_000020", models[-1].name]
    assert (models[-1] / "MANIFEST.json").is_file()
    tok = stages.model_tokenizer(models[0])  # a checkpoint: found through its stage's manifest
    assert tok.uri == stages.model_tokenizer(models[-1]).uri and artifacts.verify_artifact(tok.uri).digest == tok.digest
    # a checkpoint's reference is its content: the same weights elsewhere have the same digest
    copy = Path(store) / "elsewhere"
    shutil.copytree(models[0], copy)
    try:
        assert artifacts.checkpoint_ref(copy).digest == stages.model_ref(models[0]).digest
        with pytest.raises(artifacts.ArtifactError, match="tokenizer"):
            stages.model_tokenizer(copy)  # nothing beside it says which tokenizer it was trained with
    finally:
        shutil.rmtree(copy)


def test_evaluate_scans_the_store_once_then_finds_every_result(prefect_api, store):
    from flows.evaluate import evaluate

    first = evaluate(store=store, tasks=TASKS, max_per_task=2, device_type="cpu")
    assert len(first["evaluated"]) == 3 and first["already"] == []
    assert {e["step"] for e in first["evaluated"]} == {10, 20}
    assert all(e["phase"] == "base" and 0 <= e["metrics"]["ARC-Easy"] <= 1 for e in first["evaluated"])
    assert len(eval_dirs(store)) == 3
    second = evaluate(store=store, tasks=TASKS, max_per_task=2, device_type="cpu")
    assert second["evaluated"] == [] and len(second["already"]) == 3
    # another task set is another result
    other = evaluate(checkpoint=first["evaluated"][0]["model"], store=store, tasks=TASKS, max_per_task=3,
                     device_type="cpu")
    assert len(other["evaluated"]) == 1 and len(eval_dirs(store)) == 4


def test_evaluate_bad_input_is_a_clear_error(prefect_api, store, tmp_path):
    from flows.evaluate import evaluate
    from nanochat_core.config import ConfigError

    with pytest.raises(ConfigError, match="unknown task"):
        evaluate(store=store, tasks="ARC-Easy,Nope")
    with pytest.raises(artifacts.ArtifactError, match="missing does not exist"):
        evaluate(checkpoint=str(tmp_path / "missing"), store=store, tasks=TASKS)
    # what an event for a checkpoint that training has since pruned gets: nothing to do, not a failure
    assert evaluate(checkpoint=str(tmp_path / "missing"), store=store, tasks=TASKS, missing_ok=True) == {
        "evaluated": [], "already": []}


def flow_runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def emit(api_url: str, resource: dict, payload: dict) -> None:
    """Emit the checkpoint event from a fresh process, as a training flow would (this process's events
    client may still be bound to another module's test server)."""
    code = ("import json, sys; from prefect.events import emit_event; "
            "emit_event(event='nanochat.checkpoint.saved', resource=json.loads(sys.argv[1]), "
            "payload=json.loads(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, json.dumps(resource), json.dumps(payload)], check=True, timeout=120,
                   env={**os.environ, "PREFECT_API_URL": api_url})


def run_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_checkpoint_event_triggers_one_evaluation(prefect_api, store, tmp_path):
    from prefect.client.orchestration import get_client

    # a checkpoint the other tests did not evaluate with this task set: the step-10 one, at max_per_task 1
    checkpoint = str(stages.find_models(store)[0])
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(tmp_path / "deploy.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", "--serve", "--store", store, "--tasks", TASKS,
                             "--max-per-task", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def deployment():
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name("evaluate/evaluate")
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

        dep = wait_for(deployment, 90, "the evaluate deployment", proc)
        assert dep.parameters == {"store": str(Path(store).resolve()), "tasks": TASKS, "max_per_task": 1}
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
        before = eval_dirs(store)
        payload = {"path": checkpoint, "step": 10, "stage": "base", "store": store}
        resource = {"prefect.resource.id": "nanochat.checkpoint.base.10", "nanochat.stage": "base"}

        def completed_runs():
            runs = flow_runs(dep.id)
            return [r for r in runs if r.state and r.state.is_final()]

        emit(prefect_api, resource, payload)
        first = wait_for(lambda: completed_runs(), 180, "the first triggered run", proc)
        assert len(first) == 1 and first[0].state.is_completed(), first[0].state
        assert first[0].parameters["checkpoint"] == checkpoint
        assert first[0].created_by is not None and first[0].created_by.type == "AUTOMATION"
        new = eval_dirs(store) - before
        assert len(new) == 1
        result = json.loads((Path(store) / "eval" / new.pop() / "results.json").read_text())
        assert result["model"] == checkpoint and result["step"] == 10

        emit(prefect_api, resource, payload)
        second = wait_for(lambda: [r for r in completed_runs() if r.id != first[0].id], 180,
                          "the second triggered run", proc)
        assert second[0].state.is_completed(), second[0].state
        assert len(eval_dirs(store) - before) == 1  # still the one result
        # logs reach the server in batches, after the state may have
        wait_for(lambda: "evaluate: 0 new, 1 already evaluated" in run_logs(second[0].id), 30,
                 "the second run's log line")
    finally:
        stop(proc, signal.SIGINT, grace=30)
        log.close()
