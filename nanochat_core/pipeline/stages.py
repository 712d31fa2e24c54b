"""The stage contract: `run_stage(name, config, inputs, store) -> ArtifactRef`.

A stage is a module with a CLI (`python -m` or `torchrun -m`) that computes into `--out DIR` and writes
metrics.json; this module knows each stage's config class, inputs and launcher, computes its cache key
and output location, finds a finished artifact instead of recomputing it, runs the process when needed,
and commits the result by writing MANIFEST.json (and uploading, for a remote store).

Works the same from plain Python, a notebook or a Prefect task (flows/ passes its own `on_line` to turn
the process output into logs, progress and events).
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat_core.config import ConfigError, config_from_dict, config_to_dict
from nanochat_core.fileio import sha256_file, sha256_json
from nanochat_core.pipeline import artifacts, identity
from nanochat_core.pipeline.artifacts import ArtifactError, ArtifactRef
from nanochat_core.pipeline.launch import Nodes, python_command, run_streaming, torchrun_command


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # entry point module (python -m / torchrun -m)
    config_class: str  # attribute of `module`
    inputs: tuple[str, ...]  # CLI flags naming upstream artifacts
    distributed: bool  # launched with torchrun
    # config fields that name a local file or directory the stage reads (with the part of a directory it reads):
    # they enter the key by content, not by path, so an edit in place re-runs the stage and a move does not
    content_fields: tuple[tuple[str, str], ...] = ()

    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_class)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("shards", "nanochat_core.data.shards", "ShardsConfig", (), False, (("source", "pretrain"),)),
        StageSpec("tokenizer", "nanochat_core.tok_train", "TokenizerConfig", ("shards",), False),
        StageSpec("base", "nanochat_core.train.base", "BaseTrainConfig", ("shards", "tokenizer"), True),
        StageSpec("mid", "nanochat_core.train.mid", "MidTrainConfig", ("base", "tokenizer"), True,
                  (("identity_conversations", ""),)),
        StageSpec("sft", "nanochat_core.train.sft", "SFTConfig", ("mid", "tokenizer"), True,
                  (("identity_conversations", ""),)),
        StageSpec("rl", "nanochat_core.train.rl", "RLConfig", ("model", "tokenizer"), True),
        StageSpec("eval", "nanochat_core.eval", "EvalConfig", ("model", "tokenizer"), True),
    ]
}


@dataclass(frozen=True)
class Node:
    """One step of the pipeline: a stage run on particular upstream nodes (eval runs after every model)."""
    name: str  # unique in the pipeline: the task name, the key in summaries and reports
    stage: str
    inputs: tuple[tuple[str, str], ...] = ()  # (CLI flag, upstream node)


def pipeline(rl: bool = False, midtrain: bool = True) -> list[Node]:
    """The speedrun's nodes in dependency order; RL (and its evaluation) only when asked for, as upstream. Without
    midtraining (the 2026 recipe, as upstream since 2026) there is no mid or mid_eval node and sft fine-tunes the
    base model: its `mid` input (the model it starts from, the CLI's --mid DIR) is the base node. The input keeps
    its flag either way, so a pipeline with midtraining keys its nodes exactly as before; in the store an sft
    artifact of a base model is told from one of a mid model by the stage of that input (plan.node_artifacts)."""
    tok = ("tokenizer", "tokenizer")
    nodes = [
        Node("shards", "shards"),
        Node("tokenizer", "tokenizer", (("shards", "shards"),)),
        Node("base", "base", (("shards", "shards"), tok)),
        Node("base_eval", "eval", (("model", "base"), tok)),
    ]
    if midtrain:
        nodes += [Node("mid", "mid", (("base", "base"), tok)), Node("mid_eval", "eval", (("model", "mid"), tok))]
    nodes += [
        Node("sft", "sft", (("mid", "mid" if midtrain else "base"), tok)),
        Node("sft_eval", "eval", (("model", "sft"), tok)),
    ]
    if rl:
        nodes += [Node("rl", "rl", (("model", "sft"), tok)), Node("rl_eval", "eval", (("model", "rl"), tok))]
    return nodes


def pipeline_of(configs: dict[str, Any], rl: bool = False) -> list[Node]:
    """The nodes of a run whose stage configs are `configs` (presets.stage_configs): midtraining when it has a mid
    config (a preset without midtraining gives none)."""
    return pipeline(rl, midtrain="mid" in configs)


@dataclass(frozen=True)
class StagePlan:
    """Everything about one stage run that is decided before it runs: computed once per stage per run, then
    passed along (to the Prefect task as a dict, to the process as its --config)."""
    stage: str
    key: str
    uri: str  # final location in the store
    work_dir: Path  # local directory the process computes in
    code_version: str
    config: dict[str, Any]  # what the process runs with (paths as given)
    upstream: dict[str, str]  # CLI flag -> upstream manifest digest
    input_uris: dict[str, str]  # CLI flag -> upstream URI
    code_modules: dict[str, str]  # module -> normalized-source hash (identity.module_hashes)
    identity_config: dict[str, Any]  # config as it enters the key and manifest (content fields by content digest)
    reused: dict[str, str] = dataclasses.field(default_factory=dict)  # pinned upstream node -> its artifact (--reuse)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "work_dir": str(self.work_dir)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StagePlan:
        return cls(**{**d, "work_dir": Path(d["work_dir"])})


def with_reused(plan: StagePlan, reused: dict[str, str]) -> StagePlan:
    """The plan of a stage built on artifacts pinned by --reuse: its manifest records them (its key does not change:
    it keys on their digests like on any upstream)."""
    return dataclasses.replace(plan, reused=dict(reused))


def make_config(stage: str, values: dict[str, Any] | None = None) -> Any:
    """The stage's config object from a dict of field values (strictly checked)."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages are {list(STAGES)}")
    return config_from_dict(STAGES[stage].config_cls(), values or {})


def content_digest(value: str, part: str) -> str | None:
    """sha256 of what a config field names: a local file's bytes, or a local directory's files (under `part`) by
    relative path and content. None for "" and URLs (those are keyed by the value itself)."""
    if not value or "://" in value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return sha256_file(path)
    root = path / part if part else path
    if path.is_dir() and root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return sha256_json({p.relative_to(root).as_posix(): sha256_file(p) for p in files})
    raise ConfigError(f"{value!r} does not exist (no such file or directory{f' {root}' if part else ''})")


def identity_config(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    """The config as it enters the key and the manifest: each content field (a local path) replaced by the
    sha256 of what it names, so that where a file lies is not part of what a stage is."""
    out = dict(config)
    for name, part in STAGES[stage].content_fields:
        try:
            digest = content_digest(config.get(name, ""), part)
        except ConfigError as e:
            raise ConfigError(f"{stage}.{name}: {e}") from None
        if digest is not None:
            out[name] = f"sha256:{digest}"
    return out


def plan_stage(stage: str, config: Any, inputs: dict[str, ArtifactRef], store: str,
               code_modules: dict[str, str] | None = None) -> StagePlan:
    """The stage's plan. `code_modules` (identity.module_hashes of the stage's module) may be passed when the caller
    plans many stages, so the source is read once per run."""
    spec = STAGES[stage]
    missing = [flag for flag in spec.inputs if flag not in inputs]
    if missing:
        raise ValueError(f"stage {stage} needs inputs {missing}")
    cfg = config if isinstance(config, dict) else config_to_dict(config)
    ident = identity_config(stage, cfg)
    upstream = {flag: inputs[flag].digest for flag in spec.inputs}
    modules = code_modules if code_modules is not None else identity.module_hashes(spec.module)
    code = identity.code_version(modules)
    key = identity.cache_key(stage, ident, upstream, code)
    input_uris = {flag: inputs[flag].uri for flag in spec.inputs}
    return StagePlan(stage, key, artifacts.join_uri(store, stage, key), artifacts.staging_dir(store, stage, key),
                     code, cfg, upstream, input_uris, modules, ident)


def find_done(plan: StagePlan, deep: bool = False) -> ArtifactRef | None:
    """The finished artifact of this plan if the store has it intact (file sizes; sha256 too when deep)."""
    return damage(plan, deep)[0]


def damage(plan: StagePlan, deep: bool = False) -> tuple[ArtifactRef | None, str | None]:
    """(the intact artifact, None), or (None, why it is not usable: missing, incomplete or damaged)."""
    try:
        return artifacts.verify_artifact(plan.uri, deep=deep), None
    except ArtifactError as e:
        return None, str(e)


def stage_command(plan: StagePlan, input_dirs: dict[str, Path], config_path: Path, nproc: int,
                  nodes: Nodes | None = None) -> list[str]:
    spec = STAGES[plan.stage]
    args = ["--out", str(plan.work_dir), "--config", str(config_path)]
    for flag in spec.inputs:
        args += [f"--{flag}", str(input_dirs[flag])]
    if spec.distributed:
        return torchrun_command(spec.module, args, nproc, nodes)
    if nodes is not None and nodes.nnodes > 1:
        raise ValueError(f"stage {plan.stage} runs in one process; it cannot be spread over {nodes.nnodes} nodes")
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
    store = artifacts.store_of(plan.uri)
    inputs = {flag: artifacts.relative_to_store(uri, store) for flag, uri in plan.input_uris.items()}
    digest = artifacts.write_manifest(plan.work_dir, plan.stage, plan.identity_config, plan.upstream,
                                      plan.code_version, metrics, inputs=inputs, code_modules=plan.code_modules,
                                      reused=plan.reused)
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


def run_process(plan: StagePlan, inputs: dict[str, ArtifactRef], nproc: int = 1,
                on_line: Callable[[str], None] | None = None, timeout: float | None = None,
                nodes: Nodes | None = None) -> None:
    """The stage's process (this node's torchrun, for a distributed stage) computing into plan.work_dir."""
    input_dirs = {flag: artifacts.materialize(ref) for flag, ref in inputs.items()}
    fd, cfg_path = tempfile.mkstemp(prefix=f"nanochat-{plan.stage}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(plan.config, f)
    try:
        spec = STAGES[plan.stage]
        nproc = nproc if spec.distributed else 1
        cmd = stage_command(plan, input_dirs, Path(cfg_path), nproc, nodes)
        kwargs = {"on_line": on_line} if on_line else {}
        run_streaming(cmd, env=thread_env(nproc), timeout=timeout, **kwargs)
    finally:
        os.unlink(cfg_path)


def execute(
    plan: StagePlan,
    inputs: dict[str, ArtifactRef],
    nproc: int = 1,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
    nodes: Nodes | None = None,
) -> ArtifactRef:
    """Run the stage's process into plan.work_dir and commit the artifact. In a multi-node stage this is
    node 0's part (the other nodes run `run_process` with their node_rank; node 0 alone commits)."""
    if nodes is not None and nodes.node_rank != 0:
        raise ValueError("only node 0 commits a stage; run the other nodes with run_process")
    lock = _lock_work_dir(plan.work_dir)
    try:
        (plan.work_dir / artifacts.MANIFEST).unlink(missing_ok=True)  # being (re)computed: incomplete
        # so that a checkpoint in this directory can be traced to its inputs (the tokenizer) before it is done
        store = artifacts.store_of(plan.uri)
        recorded = {flag: {"uri": artifacts.relative_to_store(ref.uri, store), "digest": ref.digest}
                    for flag, ref in inputs.items()}
        artifacts.atomic_write_bytes(plan.work_dir / artifacts.INPUTS, json.dumps(recorded).encode())
        if not (artifacts.is_remote(plan.uri) and plan.stage in MODEL_STAGES):
            run_process(plan, inputs, nproc, on_line, timeout, nodes)
            return commit(plan)
        # a remote store holds the stage's checkpoints too: resume from them on any machine
        from nanochat_core.pipeline import remote_checkpoints  # torch comes with it: only for training stages

        say = on_line or print
        fetched = remote_checkpoints.fetch_newest(plan.uri, plan.work_dir, say)
        if fetched is not None:
            say(f"{plan.stage}: resuming from checkpoint {fetched.name}, downloaded from {plan.uri}")
        mirror = remote_checkpoints.CheckpointMirror(plan.uri, plan.work_dir, say)
        try:
            run_process(plan, inputs, nproc, mirror.watching(on_line), timeout, nodes)
        finally:
            mirror.close()
        return commit(plan)
    finally:
        lock.close()


def run_stage(stage: str, config: Any, inputs: dict[str, ArtifactRef], store: str, nproc: int = 1,
              on_line: Callable[[str], None] | None = None) -> ArtifactRef:
    """Plain-Python entry: return the finished artifact, computing it only if the store lacks it."""
    plan = plan_stage(stage, config, inputs, store)
    return find_done(plan) or execute(plan, inputs, nproc=nproc, on_line=on_line)


# ---------------------------------------------------------------------------------------------
# models in a store (what the evaluate flow looks at)

MODEL_STAGES = ("base", "mid", "sft", "rl")


def find_models(store: str) -> list[str]:
    """Every model in a store (local or remote): each training stage's finished model and the complete
    checkpoints of finished and still-running stages, oldest step first within a stage directory."""
    if artifacts.is_remote(store):
        return _find_remote_models(store)
    from nanochat_core.checkpoint import complete_checkpoints

    root = artifacts.local_path(store)
    found = []
    for stage in MODEL_STAGES:
        for work in sorted(p for p in (root / stage).glob("*") if p.is_dir()):
            found += [str(p) for p in complete_checkpoints(work)]
            if (work / artifacts.MANIFEST).is_file() and (work / "model.pt").is_file():
                found.append(str(work))
    return found


def _find_remote_models(store: str) -> list[str]:
    """find_models of an s3:// (or other remote) store, from one listing per training stage."""
    from nanochat_core.checkpoint import CHECKPOINTS
    from nanochat_core.pipeline.remote_checkpoints import complete_in_listing

    fs = artifacts.filesystem(store)
    found = []
    for stage in MODEL_STAGES:
        stage_uri = artifacts.join_uri(store, stage)
        with artifacts.store_errors(store, f"listing the {stage} models"):
            objects = [rel.split("/") for rel in artifacts.remote_listing(fs, stage_uri)]
        files = {tuple(parts) for parts in objects}
        in_checkpoints: dict[str, list[str]] = {}  # stage key -> paths under its checkpoints/
        for key, *rest in objects:
            if rest[:1] == [CHECKPOINTS]:
                in_checkpoints.setdefault(key, []).append("/".join(rest[1:]))
        finished = {k for k, *rest in objects if rest == [artifacts.MANIFEST] and (k, "model.pt") in files}
        for key in sorted(set(in_checkpoints) | finished):
            key_uri = artifacts.join_uri(stage_uri, key)
            found += [artifacts.join_uri(key_uri, CHECKPOINTS, name)
                      for _, name in complete_in_listing(in_checkpoints.get(key, []))]
            if key in finished:
                found.append(key_uri)
    return found


def is_checkpoint(model: str | Path) -> bool:
    """A training checkpoint (<stage dir>/checkpoints/step_N), as opposed to a stage's finished model."""
    from nanochat_core.checkpoint import CHECKPOINTS

    parts = str(model).rstrip("/").split("/")
    return len(parts) >= 2 and parts[-2] == CHECKPOINTS


def model_exists(model: str | Path) -> bool:
    """Whether a model (local or remote; a finished model or a checkpoint) is in its store now."""
    from nanochat_core.checkpoint import COMPLETE

    if not artifacts.is_remote(str(model)):
        return Path(artifacts.local_path(str(model))).is_dir()
    marker = COMPLETE if is_checkpoint(model) else artifacts.MANIFEST
    return artifacts.read_artifact_file(str(model), marker) is not None


def local_model(model: str | Path) -> Path:
    """A local directory holding the model: itself when local, else a checked download (reused while intact)."""
    model = str(model)
    if not artifacts.is_remote(model):
        return Path(artifacts.local_path(model))
    if is_checkpoint(model):
        from nanochat_core.pipeline.remote_checkpoints import cached_checkpoint

        return cached_checkpoint(model)
    return artifacts.materialize(artifacts.verify_artifact(model))


def model_ref(model: str | Path, local: Path | None = None) -> ArtifactRef:
    """A stage's finished model by its manifest; a checkpoint by the content of its weights and meta (read from
    `local`, its local copy, for a remote one)."""
    model = str(model)
    if not is_checkpoint(model) and artifacts.read_manifest_bytes(model) is not None:
        return artifacts.verify_artifact(model if artifacts.is_remote(model) else str(Path(model).resolve()))
    return artifacts.checkpoint_ref(local or local_model(model))


def model_tokenizer(model: str | Path) -> ArtifactRef:
    """The tokenizer a model was trained with: from its artifact's manifest or, for a checkpoint inside a
    stage's directory (finished or not), from that stage's manifest or inputs record."""
    model = str(model).rstrip("/")
    places = [model]
    if is_checkpoint(model):
        places.append(model.rsplit("/", 2)[0])
    store = artifacts.store_of(model)
    for place in places:
        m = artifacts.manifest_or_none(place, warn=False)
        if m is not None and "tokenizer" in m.get("inputs", {}) and "tokenizer" in m.get("upstream", {}):
            return ArtifactRef(artifacts.resolve_in_store(m["inputs"]["tokenizer"], store), m["upstream"]["tokenizer"])
        recorded = artifacts.read_artifact_file(place, artifacts.INPUTS)
        try:
            tok = json.loads(recorded)["tokenizer"] if recorded is not None else None
        except (ValueError, TypeError, KeyError):
            tok = None
        if isinstance(tok, dict) and isinstance(tok.get("uri"), str) and isinstance(tok.get("digest"), str):
            return ArtifactRef(artifacts.resolve_in_store(tok["uri"], store), tok["digest"])
    raise ArtifactError(f"cannot tell which tokenizer {model} was trained with: no manifest or "
                        f"{artifacts.INPUTS} naming one beside it; is it a model of a nanochat store?")
