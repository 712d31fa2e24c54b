"""Checkpoints: atomic, sharded per rank, resumable; plus the final model files every later stage loads.

Layout of a training stage's output directory:

    <out>/checkpoints/step_000300/     a committed checkpoint (only these count)
        model.pt                       rank 0: the model's state_dict
        meta.json                      rank 0: step, model_config, world_size, loop state, ...
        optim_rank{r}.pt               every rank: [opt.state_dict() for opt in optimizers] (Muon/AdamW shard per rank)
        loader_rank{r}.json            every rank: its data loader position
        state_rank{r}.pt               every rank: RNG states + whatever else the loop keeps per rank
        COMPLETE                       written last, just before the rename: step, world size, every file's sha256
    <out>/checkpoints/.tmp-step_000400/  being written (or left by a crash): ignored, removed at the next save
    <out>/model.pt, <out>/meta.json    the final model (save_final_model / load_model)

Every rank creates the temporary directory itself (upstream only rank 0 did, so the other ranks could not
write their optimizer shards). Files load with weights_only=True (no pickle) after their sha256 is checked
against COMPLETE's list; a damaged file is a CheckpointError that names it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat_core.common import DistInfo
from nanochat_core.errors import UserError
from nanochat_core.fileio import sha256_file
from nanochat_core.gpt import GPT, GPTConfig

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or model file is missing, truncated or inconsistent; the message names the file."""


# ---------------------------------------------------------------------------------------------
# small file helpers

def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _atomic(path: Path, write) -> None:
    """write(tmp_path) into a temp name beside path, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_torch(path: Path, device: torch.device | str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a truncated/corrupt archive
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {e}") from e


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {e}") from e


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without torch.compile's `_orig_mod.` prefix."""
    return {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# RNG state (so that a resumed run draws the same random numbers as an uninterrupted one)

def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ---------------------------------------------------------------------------------------------
# training checkpoints

def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory name (step_NNNNNN), None for any other name."""
    m = STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Committed checkpoint directories, oldest step first (`.tmp-*` and unmarked dirs ignored)."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = step_of(p.name)
        if step is not None and p.is_dir() and (p / COMPLETE).is_file():
            found.append((step, p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under out_dir/checkpoints, or None."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    meta: dict,
    dist_info: DistInfo,
    loader_state: dict | None,
    rank_state: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write out_dir/checkpoints/step_{step:06d}/ atomically; collective: every rank must call it.

    rank_state: extra tensors/values of this rank (e.g. token counts), stored with its RNG state.
    keep: how many complete checkpoints to keep (older ones are deleted; <= 0 keeps all)."""
    root = checkpoints_dir(out_dir)
    tmp, final = root / f".tmp-{step_dir_name(step)}", root / step_dir_name(step)
    rank = dist_info.rank
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed attempt at this step
    _barrier()
    tmp.mkdir(parents=True, exist_ok=True)  # every rank: a rank must never depend on rank 0 having done it
    _write_torch(tmp / f"optim_rank{rank}.pt", [opt.state_dict() for opt in optimizers])
    _write_torch(tmp / f"state_rank{rank}.pt", {"rng": rng_state(dist_info.device), **(rank_state or {})})
    if loader_state is not None:
        _write_json(tmp / f"loader_rank{rank}.json", loader_state)
    if rank == 0:
        _write_torch(tmp / "model.pt", model_state_dict(model))
        _write_json(tmp / "meta.json", {**meta, "step": step, "world_size": dist_info.world_size})
    _barrier()  # every shard is on disk
    if rank == 0:  # the marker lists every file's sha256, so a damaged file is refused, never loaded
        digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / COMPLETE, {"step": step, "world_size": dist_info.world_size, "sha256": digests})
        if final.exists():  # the same step saved again (e.g. preempted right after resuming)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    _barrier()  # nobody moves on (or exits) before the commit
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete leftovers of crashed saves and all but the newest `keep` complete checkpoints."""
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)
    done = complete_checkpoints(root.parent)
    if keep > 0:
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint_files(ckpt_dir: str | Path, names: list[str]) -> None:
    """Check these files of a committed checkpoint against the sha256 its COMPLETE marker lists."""
    ckpt_dir = Path(ckpt_dir)
    listed = _load_json(ckpt_dir / COMPLETE).get("sha256")
    if not isinstance(listed, dict):
        raise CheckpointError(f"{ckpt_dir / COMPLETE} lists no file digests: it cannot be verified")
    for name in names:
        path = ckpt_dir / name
        if name not in listed or not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        if sha256_file(path) != listed[name]:
            raise CheckpointError(f"checkpoint file {path} is damaged: its sha256 differs from the one recorded "
                                  "when it was saved")


def rank_files(ckpt_dir: str | Path, rank: int) -> list[str]:
    """The files one rank reads when it resumes from this checkpoint."""
    names = ["model.pt", "meta.json", f"optim_rank{rank}.pt", f"state_rank{rank}.pt"]
    return names + ([f"loader_rank{rank}.json"] if (Path(ckpt_dir) / f"loader_rank{rank}.json").exists() else [])


def checkpoint_meta(ckpt_dir: str | Path) -> dict:
    """meta.json of a checkpoint (or of a final model directory)."""
    return _load_json(Path(ckpt_dir) / "meta.json")


def load_checkpoint(
    ckpt_dir: str | Path, device: torch.device | str, rank: int = 0, load_optimizer: bool = True,
) -> tuple[dict, list[dict] | None, dict, dict | None]:
    """(model_state, optimizer states of `rank` or None, meta, loader state of `rank` or None)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt_dir} is not a complete checkpoint (no {COMPLETE} marker)")
    meta = _load_json(ckpt_dir / "meta.json")
    world = meta.get("world_size", 1)
    if rank >= world and load_optimizer:
        raise CheckpointError(f"{ckpt_dir} was written by {world} rank(s); it has no shard for rank {rank}")
    model_state = _load_torch(ckpt_dir / "model.pt", device)
    optim_states = _load_torch(ckpt_dir / f"optim_rank{rank}.pt", device) if load_optimizer else None
    loader_path = ckpt_dir / f"loader_rank{rank}.json"
    loader_state = _load_json(loader_path) if loader_path.exists() else None
    return model_state, optim_states, meta, loader_state


def load_rank_state(ckpt_dir: str | Path, rank: int = 0) -> dict:
    """The per-rank state saved with a checkpoint: {"rng": ..., **rank_state} (tensors on CPU)."""
    return _load_torch(Path(ckpt_dir) / f"state_rank{rank}.pt", "cpu")


# ---------------------------------------------------------------------------------------------
# final model files

def save_final_model(out_dir: str | Path, model: torch.nn.Module, meta: dict) -> None:
    """out_dir/model.pt (weights) + out_dir/meta.json (must hold "model_config"), each written atomically."""
    if "model_config" not in meta:
        raise ValueError("meta must contain 'model_config' (the GPTConfig fields) so load_model can rebuild the model")
    out = Path(out_dir)
    _atomic(out / "model.pt", lambda p: _write_torch(p, model_state_dict(model)))
    _atomic(out / "meta.json", lambda p: _write_json(p, meta))


def load_model(model_dir: str | Path, device: torch.device | str, phase: str = "eval") -> tuple[GPT, dict]:
    """Build the GPT described by model_dir/meta.json and load model_dir/model.pt into it (no pickle).

    Works on a stage output directory and on a checkpoint directory alike. On CPU/MPS bf16 weights are
    upcast to fp32."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    model_dir, device = Path(model_dir), torch.device(device)
    if (model_dir / COMPLETE).is_file():  # a training checkpoint: refuse damaged weights
        verify_checkpoint_files(model_dir, ["model.pt", "meta.json"])
    meta = _load_json(model_dir / "meta.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{model_dir / 'meta.json'} has no 'model_config' object")
    try:
        config = GPTConfig.from_dict(meta["model_config"])
        config.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{model_dir / 'meta.json'}: model_config does not fit GPTConfig: {e}") from e
    state = _load_torch(model_dir / "model.pt", device)
    if device.type in ("cpu", "mps"):
        state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also fills the non-persistent buffers (rotary tables)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{model_dir / 'model.pt'} does not match its meta.json model_config: {e}") from e
    model.train(phase == "train")
    return model, meta
