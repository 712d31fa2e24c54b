"""Deployments on a process work pool, against a real `prefect server start` and real `prefect worker` processes.

- deployments/prefect.yaml (`prefect deploy`) and `nanochat deploy` register the same deployments;
- a worker killed outright mid-pretraining takes its flow run and the training processes with it, the run is
  reported Crashed, and retrying the same flow run the way the UI's Retry button does (on a new worker) finishes
  it: the stages done before the kill come back Cached and pretraining resumes from its last checkpoint.

The helpers here (server, worker, waiting) are shared with tests/test_prefect_ui.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psutil
import pytest
from test_flows import free_port, with_overrides

from nanochat_core.pipeline import artifacts

REPO = Path(__file__).resolve().parents[1]
POOL = "nanochat"
PREFECT = [sys.executable, "-m", "prefect"]

PRESET_NAMES = ["tiny", "d20", "d26", "d32", "gpt2", "d12-2026", "tiny-2026"]


def prefect_env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    """The environment of every Prefect process of a test: its own home, this server, nothing from the internet."""
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url, "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2", "OMP_NUM_THREADS": "1", **extra}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 1.0) -> Any:
    """Poll `predicate` until it returns something truthy; fail (with the log's tail) on timeout or if `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            pytest.fail(f"process exited with {proc.returncode} while waiting for {what}\n{tail}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{log.read_text()[-3000:] if log else ''}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, grace: float = 15.0) -> None:
    """Signal the process group, then SIGKILL it after `grace` (an idle worker can ignore one SIGINT for minutes)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def api_healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` (API and UI) on a free port with its own database; this process's client uses it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=prefect_env(home, api_url), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: api_healthy(api_url), 120, "the Prefect server", proc, log_path)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        stop(proc, signal.SIGTERM)


@contextmanager
def worker(api_url: str, home: Path, log_path: Path, pool: str = POOL) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool <pool>` in its own process group, stopped on exit (if still alive)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*PREFECT, "worker", "start", "--pool", pool], env=prefect_env(home, api_url),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
    try:
        yield proc
    finally:
        stop(proc)


def run_prefect(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def flow_run(run_id: UUID):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def final_state(run_id: UUID):
    state = flow_run(run_id).state
    return state if state is not None and state.is_final() else None


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def prefect_api(prefect_home) -> Iterator[str]:
    with prefect_server(prefect_home) as api_url:
        yield api_url


def registered() -> dict[str, dict[str, Any]]:
    """What the server holds for each deployment, with the automations that run it (its triggers)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        automations = client.read_automations()
    out = {}
    for d in deployments:
        triggers = [{"name": a.name, "expect": sorted(a.trigger.expect), "match": a.trigger.match.model_dump(),
                     "parameters": action.parameters}
                    for a in automations for action in a.actions if getattr(action, "deployment_id", None) == d.id]
        out[d.name] = {
            "entrypoint": d.entrypoint, "pull_steps": d.pull_steps, "parameters": d.parameters,
            "work_pool": d.work_pool_name, "description": d.description, "schema": d.parameter_openapi_schema,
            "schedules": [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules],
            "concurrency_limit": d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
            "triggers": triggers,
        }
    return out


def test_prefect_yaml_and_nanochat_deploy_register_the_same_deployments(prefect_api, prefect_home, tmp_path):
    from prefect.client.orchestration import get_client

    store = str(tmp_path / "store")
    env = prefect_env(prefect_home, prefect_api)
    out = run_prefect([sys.executable, "-m", "flows.cli", "deploy", "--store", store], env).stdout
    assert f"prefect worker start --pool {POOL}" in out
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(POOL).type == "process"  # created, since it was missing
    by_cli = registered()

    run_prefect([*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                {**env, "NANOCHAT_REPO": str(REPO), "NANOCHAT_STORE": store})
    by_yaml = registered()
    assert by_yaml == by_cli  # same fields, and the yaml replaced the trigger's automation rather than adding one

    assert set(by_yaml) == {"speedrun", "serve", "evaluate", "train-node"}
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert all(d["pull_steps"] == pull and d["work_pool"] == POOL for d in by_yaml.values())
    speedrun, evaluate = by_yaml["speedrun"], by_yaml["evaluate"]
    assert speedrun["parameters"] == {"store": store, "serve_deployment": "serve/serve"}
    assert speedrun["concurrency_limit"] == 1 and evaluate["concurrency_limit"] == 1
    # the UI's Custom run form: the presets as a select, every stage's fields under overrides
    schema = speedrun["schema"]
    assert schema["properties"]["preset"]["enum"] == PRESET_NAMES  # every preset, in presets.py order
    assert set(schema["definitions"]["StageOverrides"]["properties"]) == {
        "shards", "tokenizer", "base", "mid", "sft", "rl", "eval"}
    assert "num_iterations" in schema["definitions"]["BaseOverrides"]["properties"]
    assert evaluate["schedules"] == [("0 3 * * *", "UTC", True)]
    assert evaluate["triggers"] == [{
        "name": "evaluate-each-checkpoint", "expect": ["nanochat.checkpoint.saved"],
        "match": {"prefect.resource.id": "nanochat.checkpoint.*"},
        "parameters": {"checkpoint": "{{ event.payload.path }}", "store": "{{ event.payload.store }}",
                       "missing_ok": True, "tasks": "auto", "max_per_task": -1},
    }]


def committed_checkpoints(store: Path) -> list[Path]:
    """Base checkpoints written completely (a COMPLETE marker is the last file of a checkpoint)."""
    return [p.parent for p in store.glob("base/*/checkpoints/step_*/COMPLETE")]


def training_processes(store: Path) -> list[psutil.Process]:
    """Live pretraining processes (torchrun and its ranks) that write into `store`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "nanochat_core.train.base" in cmdline and str(store) in cmdline:
            found.append(proc)
    return found


def task_states(run_id: UUID) -> list[tuple[str, str]]:
    """(task name, state name) of every task run of the flow run, all attempts, in start order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return [(t.name, t.state_name) for t in sorted(runs, key=lambda t: t.expected_start_time)]


@pytest.mark.slow
def test_worker_killed_mid_pretraining_then_retried_like_the_ui(prefect_api, prefect_home, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Scheduled

    from flows.deploy import register

    store = tmp_path / "store"
    # A pool of its own, and no evaluate deployment on it: runs that checkpoint events trigger would compete for
    # the CPU (the other test leaves one on the nanochat pool).
    pool = "fault-test"
    register(str(store), pool=pool, names=["speedrun"])
    # long enough to be killed mid-way; saves every 10 steps
    overrides = with_overrides(base={"num_iterations": 200, "seed": 7})
    first_log = tmp_path / "worker1.log"
    with worker(prefect_api, prefect_home, first_log, pool) as first:
        run = run_deployment("speedrun/speedrun", parameters={"overrides": overrides, "serve": False}, timeout=0)
        wait_for(lambda: committed_checkpoints(store), 300, "a committed base checkpoint", first, first_log, 0.2)
        started = psutil.Process(first.pid).children(recursive=True)  # the flow run, torchrun, its rank
        assert training_processes(store), "pretraining is not running"
        os.killpg(first.pid, signal.SIGKILL)  # the worker dies outright
        first.wait()

    # The flow run has a process group of its own, so the group kill misses it; but its next log line to the
    # console hits the dead worker's pipe and ends it (rich exits on a broken pipe), and it reports Crashed.
    # Training ends with it (SIGTERM: a checkpoint on the way out): nothing is left running.
    _, alive = psutil.wait_procs(started, timeout=90)
    assert alive == [], f"outlived the killed worker: {[p.cmdline() for p in alive]}"
    assert training_processes(store) == []
    crashed = wait_for(lambda: final_state(run.id), 60, "the killed run to end")
    assert crashed.is_crashed(), crashed
    assert flow_run(run.id).deployment_id is not None  # the UI shows Retry only for deployment runs
    before = {p.name for p in committed_checkpoints(store)}

    with worker(prefect_api, prefect_home, tmp_path / "worker2.log", pool) as second:
        with get_client(sync_client=True) as client:  # exactly what the UI's Retry button sends
            client.set_flow_run_state(run.id, Scheduled(name="AwaitingRetry", message="Retry from the UI"),
                                      force=True)
        done = wait_for(lambda: final_state(run.id), 600, "the retried run", second, tmp_path / "worker2.log")
    assert done.is_completed(), done
    assert flow_run(run.id).run_count == 2  # the same flow run, a second attempt

    summary = json.loads((store / "runs" / str(run.id) / "summary.json").read_text())
    cached = {name: info["cached"] for name, info in summary["stages"].items()}
    assert cached == {"shards": True, "tokenizer": True, "base": False, "base_eval": False, "mid": False,
                      "mid_eval": False, "sft": False, "sft_eval": False}
    retried = task_states(run.id)
    assert ("shards", "Cached") in retried and ("tokenizer", "Cached") in retried
    assert ("base", "Crashed") in retried and ("base", "Completed") in retried
    metrics = artifacts.read_manifest(summary["stages"]["base"]["uri"])["metrics"]
    assert metrics["steps"] == 200
    resumed = metrics["resumed_from_step"]
    assert resumed > 0 and f"step_{resumed:06d}" in before, (resumed, before)
