"""One Prefect task per pipeline stage, over nanochat_core's stage contract.

Caching: the task's cache key is the stage's content key (stage, config, upstream digests, code version)
plus the store, so the Prefect record and the store agree on what "done" means. The stage plan (key, config,
code hashes) is computed once per stage per run, by the flow (nanochat_core.pipeline.plan.decide), and passed
to the task as a parameter. Prefect's record is only trusted while the store still holds the artifact intact:
the flow checks the store first and forces a refresh when the artifact is missing or damaged (a cache hit never
returns a dead reference).

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
from prefect.filesystems import RemoteFileSystem
from prefect.logging import get_run_logger
from prefect.states import State

from nanochat_core.pipeline import artifacts, stages
from nanochat_core.pipeline.artifacts import ArtifactError, ArtifactRef
from nanochat_core.pipeline.launch import Nodes
from nanochat_core.progress import parse_structured_line


def _refs(inputs: dict[str, dict[str, str]]) -> dict[str, ArtifactRef]:
    return {flag: ArtifactRef.from_dict(ref) for flag, ref in inputs.items()}


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    plan = parameters["plan"]
    store_id = hashlib.sha256(parameters["store"].encode()).hexdigest()[:8]
    return f"nanochat-{plan['stage']}-{plan['key']}-{store_id}"


class StageOutput:
    """Turns a stage process's output lines into logs, a progress artifact, a terminal bar and events."""

    def __init__(self, stage: str, logger, log_every: float = 10.0, label: str | None = None, store: str = ""):
        self.stage, self.logger, self.log_every, self.store = stage, logger, log_every, store
        self.label = label or stage  # the pipeline node (base_eval, ...) for progress
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
            sys.stderr.write(f"\r{self.label:>9} [{bar:<20}] {pct:5.1f}% {step}/{total} {extras}"[:150])
            sys.stderr.flush()
            if step >= total:
                sys.stderr.write("\n")
        if now - self.last_update >= 2.0 or step >= total:
            self.last_update = now
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    progress=pct, key=f"{self.label.replace('_', '-')}-progress",
                    description=f"{self.label}: steps done")
            else:
                update_progress_artifact(self.artifact_id, pct)
        if now - self.last_log >= self.log_every or step >= total:
            self.last_log = now
            self.logger.info(f"{self.label} step {step}/{total} {extras}")

    def checkpoint(self, c: dict[str, Any]) -> None:
        self.logger.info(f"checkpoint saved: {c.get('path')} (step {c.get('step')})")
        emit_event(
            event="nanochat.checkpoint.saved",
            resource={"prefect.resource.id": f"nanochat.checkpoint.{self.stage}.{c.get('step')}",
                      "nanochat.stage": self.stage, "nanochat.path": str(c.get("path"))},
            payload={**c, "store": self.store},  # where the evaluate flow puts its results
        )


@task(cache_key_fn=stage_cache_key, result_serializer="json", persist_result=True)
def stage_task(plan: dict[str, Any], inputs: dict[str, dict[str, str]], store: str,
               nproc: int = 1, nnodes: int = 1, master_addr: str = "127.0.0.1",
               master_port: int = 29500) -> dict[str, str]:
    """Produce the stage's artifact (or find it in the store) and return its reference as a dict.
    With nnodes > 1 this is node 0 of a multi-node stage (flows/multinode.py starts the other nodes)."""
    logger = get_run_logger()
    plan = stages.StagePlan.from_dict(plan)
    stage = plan.stage
    done = stages.find_done(plan, deep=True)
    if done is not None:
        logger.info(f"{stage}: found complete artifact {done.uri} in the store")
        return done.to_dict()
    for flag, ref in _refs(inputs).items():  # never train on a damaged upstream checkpoint
        artifacts.verify_input(ref)
        logger.info(f"{stage}: input {flag} verified ({ref.uri})")
    logger.info(f"{stage}: computing into {plan.work_dir}")
    output = StageOutput(stage, logger, label=TaskRunContext.get().task_run.name, store=store)
    nodes = Nodes(nnodes, 0, master_addr, master_port)
    nodes.validate()
    if nnodes == 1:
        return stages.execute(plan, _refs(inputs), nproc=nproc, on_line=output).to_dict()
    from flows.multinode import start_other_nodes, wait_for_nodes

    others = start_other_nodes({"plan": plan.to_dict(), "inputs": inputs, "store": store, "nproc": nproc}, nodes)
    logger.info(f"{stage}: started nodes 1..{nnodes - 1}: {', '.join(r.name for r in others)}")
    ref = stages.execute(plan, _refs(inputs), nproc=nproc, on_line=output, nodes=nodes)
    wait_for_nodes(others)
    return ref.to_dict()


def result_storage(store: str) -> Path | RemoteFileSystem:
    """Where Prefect keeps the stage tasks' result records: in the store (`<store>/.prefect-results`), so a
    fresh process or another machine finds them. For a remote store that is a saved RemoteFileSystem block
    (result_storage reads an "s3://..." string as a block slug). The block holds no secrets: s3fs takes the
    keys from the AWS variables of whoever runs the task; the endpoint is recorded when one is set."""
    if not artifacts.is_remote(store):
        return Path(artifacts.local_path(store)).resolve() / ".prefect-results"
    block = RemoteFileSystem(basepath=artifacts.join_uri(store, ".prefect-results"),
                             settings=artifacts.storage_options(store, secrets=False))
    block.save(f"nanochat-results-{hashlib.sha256(store.encode()).hexdigest()[:12]}", overwrite=True)
    return block


def run_stage(stage: str, config: dict[str, Any], inputs: dict[str, ArtifactRef], store: str,
              nproc: int = 1, name: str | None = None, nodes: Nodes | None = None,
              plan: stages.StagePlan | None = None, intact: bool | None = None) -> tuple[ArtifactRef, bool, float]:
    """Run one stage task (shown as `name`, default the stage); returns (reference, found in the store, seconds).
    `nodes` spreads a distributed stage over several hosts (node 0 is this one). A flow that has already planned
    the stage and checked the store (pipeline.plan.decide) passes `plan` and `intact`, so neither is done twice."""
    if plan is None:
        plan = stages.plan_stage(stage, stages.make_config(stage, config), inputs, store)
    params = {"plan": plan.to_dict(), "inputs": {k: v.to_dict() for k, v in inputs.items()}, "store": store,
              "nproc": nproc}
    if nodes is not None and nodes.nnodes > 1 and stages.STAGES[stage].distributed:
        params.update(nnodes=nodes.nnodes, master_addr=nodes.master_addr, master_port=nodes.master_port)
    if intact is None:
        # Deep (sha256) check before trusting a cache hit: a flipped byte is found here and the stage recomputed,
        # instead of a later stage loading it.
        done, why = stages.damage(plan, deep=True)
        intact = done is not None
        if not intact and artifacts.read_manifest_bytes(plan.uri) is not None:
            get_run_logger().warning(f"{name or stage}: the stored artifact is not usable ({why}); recomputing it")
    options: dict[str, Any] = {"name": name or stage, "task_run_name": name or stage, "refresh_cache": not intact,
                               "result_storage": result_storage(store)}
    t0 = time.time()
    state: State = stage_task.with_options(**options)(**params, return_state=True)
    result = ArtifactRef.from_dict(state.result())
    try:  # the store is the truth: re-read the digest (a rebuilt artifact has a new one)
        ref = artifacts.verify_artifact(result.uri)
    except ArtifactError as e:
        raise ArtifactError(f"stage {stage} returned an unusable artifact: {e}") from e
    return ref, intact, time.time() - t0
