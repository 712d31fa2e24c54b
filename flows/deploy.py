"""The nanochat deployments, registered and served by this process (`nanochat deploy`).

- speedrun: the whole pipeline; runs started from the UI can be retried there (finished stages come back
  Cached, a crashed training stage resumes from its newest checkpoint).
- serve: a chat server held for as long as its flow run lives (cancel it to stop).
- evaluate: every model under the store that lacks a result, on a cron schedule, and one checkpoint each
  time a training stage emits `nanochat.checkpoint.saved` (the event's payload names the checkpoint and
  the store). Results are keyed by checkpoint digest and task set, so repeats evaluate nothing new.

For work pools and workers on other machines, deployments/prefect.yaml declares the same deployments.
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.events import DeploymentEventTrigger

from flows.evaluate import eval_config, evaluate, local_store
from flows.serve import serve as serve_flow
from flows.speedrun import speedrun

CHECKPOINT_EVENT = "nanochat.checkpoint.saved"


def checkpoint_trigger(tasks: str, max_per_task: int) -> DeploymentEventTrigger:
    """Run evaluate on the checkpoint (and into the store) that each checkpoint event names."""
    return DeploymentEventTrigger(
        name="evaluate-each-checkpoint",
        expect={CHECKPOINT_EVENT},
        match={"prefect.resource.id": "nanochat.checkpoint.*"},
        parameters={"checkpoint": "{{ event.payload.path }}", "store": "{{ event.payload.store }}",
                    "tasks": tasks, "max_per_task": max_per_task},
    )


def deployments(store: str, cron: str = "0 3 * * *", tasks: str = "auto", max_per_task: int = -1) -> list[Any]:
    """The three deployments, for `store` (the speedrun's default and the evaluate schedule's root)."""
    eval_config(tasks, max_per_task, "")  # a bad task set fails here, not in every triggered run
    store = local_store(store)
    return [
        speedrun.to_deployment(name="speedrun", parameters={"store": store}),
        serve_flow.to_deployment(name="serve"),
        evaluate.to_deployment(
            name="evaluate",
            parameters={"store": store, "tasks": tasks, "max_per_task": max_per_task},
            cron=cron,
            triggers=[checkpoint_trigger(tasks, max_per_task)],
        ),
    ]


def serve_deployments(store: str, cron: str = "0 3 * * *", tasks: str = "auto", max_per_task: int = -1,
                      limit: int | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs here until interrupted."""
    serve(*deployments(store, cron, tasks, max_per_task), limit=limit)
