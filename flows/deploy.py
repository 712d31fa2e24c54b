"""The nanochat deployments (`nanochat deploy`), the same ones deployments/prefect.yaml declares.

- speedrun: the whole pipeline; runs started from the UI can be retried there (finished stages come back
  Cached, a crashed training stage resumes from its newest checkpoint). Its chat server is a run of `serve`.
- serve: a chat server held for as long as its flow run lives (cancel it to stop).
- evaluate: every model under the store that lacks a result, on a cron schedule, and one checkpoint each
  time a training stage emits `nanochat.checkpoint.saved` (the event's payload names the checkpoint and
  the store). Results are keyed by checkpoint digest and task set, so repeats evaluate nothing new.
- train-node: node K > 0 of a multi-node training stage (flows/multinode.py), started by node 0 on the work
  queue node-K, which that host's worker serves (`prefect worker start --pool nanochat --work-queue node-K`).

Two ways to run them:
- `register`: deployments on a process work pool, from this checkout (the pull step sets the working
  directory to the repository root); `prefect worker start --pool nanochat` on each host runs their flow runs.
- `serve_deployments` (`nanochat deploy --serve`): registered and run by this process, no pool or worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import deploy, flow, serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.workers.process import ProcessWorker

from flows.evaluate import eval_config, local_store

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POOL = "nanochat"
CHECKPOINT_EVENT = "nanochat.checkpoint.saved"
# deployment name -> the flow's entrypoint, relative to the repository root (as in prefect.yaml)
ENTRYPOINTS = {
    "speedrun": "flows/speedrun.py:speedrun",
    "serve": "flows/serve.py:serve",
    "evaluate": "flows/evaluate.py:evaluate",
    "train-node": "flows/multinode.py:train_node",
}


def checkpoint_trigger(tasks: str, max_per_task: int) -> DeploymentEventTrigger:
    """Run evaluate on the checkpoint (and into the store) that each checkpoint event names."""
    return DeploymentEventTrigger(
        name="evaluate-each-checkpoint",
        expect={CHECKPOINT_EVENT},
        match={"prefect.resource.id": "nanochat.checkpoint.*"},
        parameters={"checkpoint": "{{ event.payload.path }}", "store": "{{ event.payload.store }}", "missing_ok": True,
                    "tasks": tasks, "max_per_task": max_per_task},
    )


def deployment_options(store: str, cron: str, tasks: str, max_per_task: int) -> dict[str, dict[str, Any]]:
    """{deployment name: to_deployment keyword arguments}, shared by both ways of running them."""
    eval_config(tasks, max_per_task, "")  # a bad task set fails here, not in every triggered run
    store = local_store(store)
    return {
        # one speedrun at a time: two would train on the same GPUs
        "speedrun": {"parameters": {"store": store, "serve_deployment": "serve/serve"}, "concurrency_limit": 1},
        "serve": {},
        "evaluate": {"parameters": {"store": store, "tasks": tasks, "max_per_task": max_per_task},
                     "schedules": [Cron(cron, timezone="UTC")],
                     "triggers": [checkpoint_trigger(tasks, max_per_task)], "concurrency_limit": 1},
        # node K > 0 of a multi-node training stage, run by the worker of that host's queue node-K
        "train-node": {},
    }


def deployments(store: str, cron: str = "0 3 * * *", tasks: str = "auto", max_per_task: int = -1,
                names: list[str] | None = None) -> list[RunnerDeployment]:
    """The deployments (all, or those in `names`) of the flows loaded from this checkout, for a work pool:
    their pull step sets a worker's working directory to the repository root."""
    options = deployment_options(store, cron, tasks, max_per_task)
    return [flow.from_source(source=str(REPO), entrypoint=ENTRYPOINTS[name]).to_deployment(name=name, **kwargs)
            for name, kwargs in options.items() if names is None or name in names]


def served_deployments(store: str, cron: str, tasks: str, max_per_task: int) -> list[RunnerDeployment]:
    """The same deployments of the flows imported here, for a runner in this process."""
    from flows.evaluate import evaluate
    from flows.multinode import train_node
    from flows.serve import serve as serve_flow
    from flows.speedrun import speedrun

    flows = {"speedrun": speedrun, "serve": serve_flow, "evaluate": evaluate, "train-node": train_node}
    options = deployment_options(store, cron, tasks, max_per_task)
    return [flows[name].to_deployment(name=name, **kwargs) for name, kwargs in options.items()]


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool `name` unless it exists; returns whether it was created."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            return True


def register(store: str, pool: str = DEFAULT_POOL, cron: str = "0 3 * * *", tasks: str = "auto",
             max_per_task: int = -1, names: list[str] | None = None) -> list[UUID]:
    """Register the deployments on the process work pool `pool` (created if missing); a worker runs them."""
    chosen = deployments(store, cron, tasks, max_per_task, names)
    ensure_work_pool(pool)
    return deploy(*chosen, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
                  ignore_warnings=True)


def serve_deployments(store: str, cron: str = "0 3 * * *", tasks: str = "auto", max_per_task: int = -1,
                      limit: int | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs here until interrupted."""
    serve(*served_deployments(store, cron, tasks, max_per_task), limit=limit)
