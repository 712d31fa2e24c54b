"""The stage contract: `run_stage(name, config, inputs, store) -> ArtifactRef`.

A stage is a module with a CLI (`python -m` or `torchrun -m`) that computes into `--out DIR` and writes
metrics.json; this module knows each stage's config class, inputs and launcher, computes its cache key
and output location, finds a finished artifact instead of recomputing it, runs the process when needed,
and commits the result by writing MANIFEST.json (and uploading, for a remote store).

Works the same from plain Python, a notebook or a Prefect task (flows/ passes its own `on_line` to turn
the process output into logs, progress and events).
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat_core import artifacts
from nanochat_core.artifacts import ArtifactError, ArtifactRef
from nanochat_core.config import config_from_dict, config_to_dict
from nanochat_core.launch import python_command, run_streaming, torchrun_command


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # entry point module (python -m / torchrun -m)
    config_class: str  # attribute of `module`
    inputs: tuple[tuple[str, str], ...]  # (CLI flag, upstream stage)
    distributed: bool  # launched with torchrun

    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_class)


TOK = ("tokenizer", "tokenizer")
STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("shards", "nanochat_core.data.shards", "ShardsConfig", (), False),
        StageSpec("tokenizer", "nanochat_core.tokenizer", "TokenizerConfig", (("shards", "shards"),), False),
        StageSpec("base", "nanochat_core.train.base", "BaseTrainConfig", (("shards", "shards"), TOK), True),
        StageSpec("mid", "nanochat_core.train.mid", "MidTrainConfig", (("base", "base"), TOK), True),
        StageSpec("sft", "nanochat_core.train.sft", "SFTConfig", (("mid", "mid"), TOK), True),
        StageSpec("eval", "nanochat_core.chat_eval", "ChatEvalConfig", (("model", "sft"), TOK), True),
    ]
}
PIPELINE = list(STAGES)  # dependency order


@dataclass(frozen=True)
class StagePlan:
    stage: str
    key: str
    uri: str  # final location in the store
    work_dir: Path  # local directory the process computes in
    code_version: str
    config: dict[str, Any]
    upstream: dict[str, str]  # CLI flag -> upstream manifest digest
    input_uris: dict[str, str]  # CLI flag -> upstream URI


def make_config(stage: str, values: dict[str, Any] | None = None) -> Any:
    """The stage's config object from a dict of field values (strictly checked)."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages are {PIPELINE}")
    return config_from_dict(STAGES[stage].config_cls(), values or {})


def plan_stage(stage: str, config: Any, inputs: dict[str, ArtifactRef], store: str) -> StagePlan:
    spec = STAGES[stage]
    missing = [flag for flag, _ in spec.inputs if flag not in inputs]
    if missing:
        raise ValueError(f"stage {stage} needs inputs {missing}")
    cfg = config_to_dict(config)
    upstream = {flag: inputs[flag].digest for flag, _ in spec.inputs}
    code = artifacts.code_version(spec.module)
    key = artifacts.cache_key(stage, cfg, upstream, code)
    input_uris = {flag: inputs[flag].uri for flag, _ in spec.inputs}
    return StagePlan(stage, key, artifacts.join_uri(store, stage, key), artifacts.staging_dir(store, stage, key),
                     code, cfg, upstream, input_uris)


def find_done(plan: StagePlan) -> ArtifactRef | None:
    """The finished artifact of this plan if the store has it intact."""
    try:
        return artifacts.verify_artifact(plan.uri)
    except ArtifactError:
        return None


def stage_command(plan: StagePlan, input_dirs: dict[str, Path], config_path: Path, nproc: int) -> list[str]:
    spec = STAGES[plan.stage]
    args = ["--out", str(plan.work_dir), "--config", str(config_path)]
    for flag, _ in spec.inputs:
        args += [f"--{flag}", str(input_dirs[flag])]
    if spec.distributed:
        return torchrun_command(spec.module, args, nproc)
    return python_command(spec.module, args)


def thread_env(nproc: int) -> dict[str, str]:
    """Split the machine's cores between the ranks (torch would otherwise oversubscribe them),
    unless the user chose a thread count."""
    if os.environ.get("OMP_NUM_THREADS"):
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // max(1, nproc)))}


def commit(plan: StagePlan) -> ArtifactRef:
    """Write the manifest (last) for a finished work dir and publish it to the store."""
    metrics_path = plan.work_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    digest = artifacts.write_manifest(plan.work_dir, plan.stage, plan.config, plan.upstream, plan.code_version,
                                      metrics, inputs=plan.input_uris)
    artifacts.publish(plan.work_dir, plan.uri)
    return ArtifactRef(plan.uri, digest)


class StageBusy(RuntimeError):
    """Another process is computing the same stage into the same directory."""


def _lock_work_dir(work_dir: Path):
    """An exclusive lock on the work dir, so two runs never write one artifact at once."""
    work_dir.mkdir(parents=True, exist_ok=True)
    handle = open(work_dir / ".lock", "a+")  # noqa: SIM115 - held for the duration of the stage
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        handle.close()
        raise StageBusy(f"{work_dir} is being computed by another process; wait for it or stop it") from e
    return handle


def execute(
    plan: StagePlan,
    inputs: dict[str, ArtifactRef],
    nproc: int = 1,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> ArtifactRef:
    """Run the stage's process into plan.work_dir and commit the artifact."""
    input_dirs = {flag: artifacts.materialize(ref) for flag, ref in inputs.items()}
    lock = _lock_work_dir(plan.work_dir)
    (plan.work_dir / artifacts.MANIFEST).unlink(missing_ok=True)  # being (re)computed: incomplete
    fd, cfg_path = tempfile.mkstemp(prefix=f"nanochat-{plan.stage}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(plan.config, f)
    try:
        spec = STAGES[plan.stage]
        cmd = stage_command(plan, input_dirs, Path(cfg_path), nproc if spec.distributed else 1)
        kwargs = {"on_line": on_line} if on_line else {}
        run_streaming(cmd, env=thread_env(nproc if spec.distributed else 1), timeout=timeout, **kwargs)
        return commit(plan)
    finally:
        os.unlink(cfg_path)
        lock.close()


def run_stage(stage: str, config: Any, inputs: dict[str, ArtifactRef], store: str, nproc: int = 1,
              on_line: Callable[[str], None] | None = None) -> ArtifactRef:
    """Plain-Python entry: return the finished artifact, computing it only if the store lacks it."""
    plan = plan_stage(stage, config, inputs, store)
    return find_done(plan) or execute(plan, inputs, nproc=nproc, on_line=on_line)
