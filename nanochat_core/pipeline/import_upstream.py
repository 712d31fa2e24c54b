"""`nanochat import --upstream CKPT_DIR`: a checkpoint written by upstream nanochat as a model artifact of the store.

Two artifacts are written, each the store's usual way (files first, MANIFEST.json last; for a remote store computed
in the local staging dir and published, the manifest uploaded last):

    <store>/import-tokenizer/<key>/   the tokenizer in this project's files (tokenizer.json, tokenizer.tiktoken)
    <store>/import/<key>/             model.pt + meta.json (stage = the phase, step, model_config), like a trained
                                      model's final files; its manifest names the tokenizer as trained models' do

so `serve`, `chat`, `evaluate`, the SFT/RL stages and nanochat_core.load_model take the model like any other. The
manifests record the provenance: upstream format, source directory, step, and each source file's sha256. The keys
hash the source files' content and the conversion code (nanochat_core.upstream_checkpoint and the model and
tokenizer code it uses), so importing the same files again finds the artifacts already there, and a damaged one
is written anew.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat_core import upstream_checkpoint as upstream
from nanochat_core.checkpoint import save_final_model
from nanochat_core.config import ConfigError
from nanochat_core.fileio import sha256_json
from nanochat_core.pipeline import artifacts, identity
from nanochat_core.pipeline.artifacts import ArtifactRef

MODEL_STAGE = "import"
TOKENIZER_STAGE = "import-tokenizer"
CODE_MODULE = "nanochat_core.upstream_checkpoint"  # with what it imports: the code that computes both artifacts


@dataclass(frozen=True)
class Imported:
    model: ArtifactRef
    tokenizer: ArtifactRef
    format: str
    step: int
    phase: str


def _lock(work_dir: Path):
    """An exclusive lock on the directory an artifact is computed in (hidden: not part of the artifact)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    handle = open(work_dir / ".lock", "a+")  # noqa: SIM115 - held while the artifact is written
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _clear(work_dir: Path) -> None:
    """Make the directory an incomplete artifact with no files: the manifest first, so no reader trusts it."""
    (work_dir / artifacts.MANIFEST).unlink(missing_ok=True)
    for p in work_dir.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def commit_artifact(store: str, stage: str, key: str, write: Callable[[Path], None], config: dict[str, Any],
                    code_modules: dict[str, str], metrics: dict[str, Any],
                    upstream_digests: dict[str, str] | None = None,
                    inputs: dict[str, str] | None = None) -> ArtifactRef:
    """The artifact <store>/<stage>/<key>: found intact (sha256 checked), or written by `write(dir)` and committed."""
    found = artifacts.find_artifact(store, stage, key, deep=True)
    if found is not None:
        return found
    work = artifacts.staging_dir(store, stage, key)
    lock = _lock(work)
    try:
        found = artifacts.find_artifact(store, stage, key, deep=True)  # another import finished it meanwhile
        if found is not None:
            return found
        _clear(work)
        write(work)
        digest = artifacts.write_manifest(work, stage, config, upstream_digests or {},
                                          identity.code_version(code_modules), metrics, inputs=inputs,
                                          code_modules=code_modules)
        uri = artifacts.join_uri(store, stage, key)
        artifacts.publish(work, uri)
        return ArtifactRef(uri, digest)
    finally:
        lock.close()


def import_upstream(ckpt_dir: str | Path, store: str, tokenizer_dir: str | Path | None = None, step: int | None = None,
                    phase: str | None = None, say: Callable[[str], None] = print) -> Imported:
    """Import upstream's checkpoint of `step` (default: the newest) in `ckpt_dir` with its tokenizer (default:
    upstream_checkpoint.default_tokenizer_dir) into `store`. Everything is read and checked before the store is
    touched; a bad input is a UserError naming it."""
    if phase is not None and phase not in upstream.PHASES:
        raise ConfigError(f"--phase must be one of {', '.join(upstream.PHASES)}, got {phase!r}")
    ckpt_dir = Path(ckpt_dir).expanduser()
    step, model_path, meta_path = upstream.checkpoint_files(ckpt_dir, step)
    if tokenizer_dir is None:
        tok_dir = upstream.default_tokenizer_dir(ckpt_dir)
    else:
        tok_dir = Path(tokenizer_dir).expanduser()
        if not tok_dir.is_dir():
            raise upstream.UpstreamError(f"tokenizer directory {tok_dir} does not exist (or is not a directory)")
    pkl = tok_dir / upstream.TOKENIZER_PKL
    tokenizer = upstream.read_tokenizer_pkl(pkl)
    model_in = upstream.read_upstream_model(ckpt_dir, step)
    if model_in.config.vocab_size != tokenizer.get_vocab_size():
        raise upstream.UpstreamError(f"{meta_path} gives a vocabulary of {model_in.config.vocab_size} tokens but "
                                     f"{pkl} has {tokenizer.get_vocab_size()}: not the checkpoint's tokenizer")
    phase = phase or upstream.phase_of(ckpt_dir)
    store = store if artifacts.is_remote(store) else str(artifacts.local_path(store).expanduser().resolve())
    artifacts.check_store(store)

    modules = identity.module_hashes(CODE_MODULE)
    code = identity.code_version(modules)
    pkl_sha = upstream.source_digests({"tokenizer": pkl})
    tok_ref = commit_artifact(
        store, TOKENIZER_STAGE, sha256_json({"sha256": pkl_sha, "code": code})[:20], tokenizer.save,
        {"source": str(pkl.resolve()), "sha256": pkl_sha}, modules,
        {"vocab_size": tokenizer.get_vocab_size()})
    say(f"tokenizer: {pkl} -> {tok_ref.uri}")

    model_sha = upstream.source_digests(model_in.files)
    provenance = {"format": model_in.format, "source": str(ckpt_dir.resolve()), "step": step, "phase": phase,
                  "sha256": {**model_sha, **pkl_sha}}
    meta = {"stage": phase, "step": step, "model_config": model_in.config.to_dict(), "imported_from": provenance}

    def write_model(out: Path) -> None:
        save_final_model(out, upstream.build_model(model_in), meta)

    metrics = {"format": model_in.format, "step": step, "phase": phase,
               **({"upstream_val_bpb": model_in.meta["val_bpb"]}
                  if isinstance(model_in.meta.get("val_bpb"), (int, float)) else {})}
    key = sha256_json({"sha256": model_sha, "phase": phase, "tokenizer": tok_ref.digest, "code": code})[:20]
    model_ref = commit_artifact(
        store, MODEL_STAGE, key, write_model, provenance, modules, metrics,
        upstream_digests={"tokenizer": tok_ref.digest},
        inputs={"tokenizer": artifacts.relative_to_store(tok_ref.uri, store)})
    say(f"model: {model_path} ({upstream.FORMATS[model_in.format]}, step {step}, phase {phase}) -> {model_ref.uri}")
    return Imported(model_ref, tok_ref, model_in.format, step, phase)

