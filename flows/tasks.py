"""One Prefect task per pipeline stage, over nanochat_core's stage contract.

Caching: the task's cache key is the stage's content key (stage, config, upstream digests, code version)
plus the store, so the Prefect record and the store agree on what "done" means. Prefect's record is
only trusted while the store still holds the artifact intact: `run_stage` checks the store first and
forces a refresh when the artifact is missing or damaged (a cache hit never returns a dead reference).

While a stage runs, its process output becomes Prefect log lines; its `NANOCHAT_PROGRESS` lines drive a
Prefect progress artifact and a terminal bar; its `NANOCHAT_CHECKPOINT` lines become
`nanochat.checkpoint.saved` events (the trigger of the evaluate deployment).
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.events import emit_event
from prefect.logging import get_run_logger
from prefect.states import State

from nanochat_core import artifacts, stages
from nanochat_core.artifacts import ArtifactError, ArtifactRef
from nanochat_core.common import parse_structured_line


def _refs(inputs: dict[str, dict[str, str]]) -> dict[str, ArtifactRef]:
    return {flag: ArtifactRef.from_dict(ref) for flag, ref in inputs.items()}


def _plan(stage: str, config: dict[str, Any], inputs: dict[str, dict[str, str]], store: str) -> stages.StagePlan:
    return stages.plan_stage(stage, stages.make_config(stage, config), _refs(inputs), store)


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    plan = _plan(parameters["stage"], parameters["config"], parameters["inputs"], parameters["store"])
    store_id = hashlib.sha256(parameters["store"].encode()).hexdigest()[:8]
    return f"nanochat-{plan.stage}-{plan.key}-{store_id}"


class StageOutput:
    """Turns a stage process's output lines into logs, a progress artifact, a terminal bar and events."""

    def __init__(self, stage: str, logger, log_every: float = 10.0):
        self.stage, self.logger, self.log_every = stage, logger, log_every
        self.artifact_id = None
        self.last_update = self.last_log = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, line: str) -> None:
        parsed = parse_structured_line(line)
        if parsed is None:
            self.logger.info(line)
        elif parsed[0] == "progress":
            self.progress(parsed[1])
        else:
            self.checkpoint(parsed[1])

    def progress(self, p: dict[str, Any]) -> None:
        step, total = p.get("step", 0), max(1, p.get("total", 1))
        pct = min(100.0, 100.0 * step / total)
        extras = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in p.items() if k not in ("step", "total"))
        now = time.time()
        if self.tty:
            bar = "#" * int(pct / 5)
            sys.stderr.write(f"\r{self.stage:>9} [{bar:<20}] {pct:5.1f}% {step}/{total} {extras}"[:150])
            sys.stderr.flush()
            if step >= total:
                sys.stderr.write("\n")
        if now - self.last_update >= 2.0 or step >= total:
            self.last_update = now
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    progress=pct, key=f"{self.stage}-progress", description=f"{self.stage}: steps done")
            else:
                update_progress_artifact(self.artifact_id, pct)
        if now - self.last_log >= self.log_every or step >= total:
            self.last_log = now
            self.logger.info(f"{self.stage} step {step}/{total} {extras}")

    def checkpoint(self, c: dict[str, Any]) -> None:
        self.logger.info(f"checkpoint saved: {c.get('path')} (step {c.get('step')})")
        emit_event(
            event="nanochat.checkpoint.saved",
            resource={"prefect.resource.id": f"nanochat.checkpoint.{self.stage}.{c.get('step')}",
                      "nanochat.stage": self.stage, "nanochat.path": str(c.get("path"))},
            payload=c,
        )


@task(cache_key_fn=stage_cache_key, result_serializer="json", persist_result=True)
def stage_task(stage: str, config: dict[str, Any], inputs: dict[str, dict[str, str]], store: str,
               nproc: int = 1) -> dict[str, str]:
    """Produce the stage's artifact (or find it in the store) and return its reference as a dict."""
    logger = get_run_logger()
    plan = _plan(stage, config, inputs, store)
    done = stages.find_done(plan)
    if done is not None:
        logger.info(f"{stage}: found complete artifact {done.uri} in the store")
        return done.to_dict()
    for flag, ref in _refs(inputs).items():  # never train on a damaged upstream checkpoint
        artifacts.verify_artifact(ref.uri, ref.digest, deep=True)
        logger.info(f"{stage}: input {flag} verified ({ref.uri})")
    logger.info(f"{stage}: computing into {plan.work_dir}")
    ref = stages.execute(plan, _refs(inputs), nproc=nproc, on_line=StageOutput(stage, logger))
    return ref.to_dict()


def run_stage(stage: str, config: dict[str, Any], inputs: dict[str, ArtifactRef], store: str,
              nproc: int = 1) -> tuple[ArtifactRef, bool, float]:
    """Run one stage task; returns (reference, came from cache, seconds)."""
    params = {"stage": stage, "config": config, "inputs": {k: v.to_dict() for k, v in inputs.items()},
              "store": store, "nproc": nproc}
    plan = _plan(stage, config, params["inputs"], store)
    intact = stages.find_done(plan) is not None
    options: dict[str, Any] = {"name": stage, "task_run_name": stage, "refresh_cache": not intact}
    if not artifacts.is_remote(store):
        options["result_storage"] = Path(artifacts.local_path(store)).resolve() / ".prefect-results"
    t0 = time.time()
    state: State = stage_task.with_options(**options)(**params, return_state=True)
    result = ArtifactRef.from_dict(state.result())
    try:  # the store is the truth: re-read the digest (a rebuilt artifact has a new one)
        ref = artifacts.verify_artifact(result.uri)
    except ArtifactError as e:
        raise ArtifactError(f"stage {stage} returned an unusable artifact: {e}") from e
    return ref, state.name == "Cached", time.time() - t0
