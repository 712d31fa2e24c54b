"""A training stage's checkpoints mirrored into its remote store, so that a crashed stage resumes on any machine.

With an `s3://` store a stage computes in a local staging dir, and only the finished artifact is published.
The checkpoints it saves on the way go to the store too, as they commit, under the stage's (still
incomplete) artifact directory: <artifact uri>/checkpoints/step_NNNNNN/, every file first and COMPLETE
last, so there as here a checkpoint without COMPLETE does not exist. Checkpoints the stage has pruned
locally are removed from the store after a newer one has landed.

Before a stage starts, the store's newest complete checkpoint is downloaded when it is newer than any in the
staging dir (a fresh machine has none): each file is checked against the sha256 its COMPLETE lists, and a
damaged checkpoint is passed over for the next older one. The stage's process then resumes from it as it
would from its own.

Uploads run on a thread of their own, so training never waits for the store; when checkpoints come faster
than they upload, only the newest waiting one is sent. A failed upload is reported and the next checkpoint
tried: the mirror is a convenience for resuming elsewhere, never a reason to stop a stage. A checkpoint is
announced (its NANOCHAT_CHECKPOINT line, which the flows turn into the event that triggers an evaluation)
once it is in the store, under its store URI: the staging path means nothing to another machine. The
stage's inputs record goes up first, so that a checkpoint found in the store names its tokenizer.

`cached_checkpoint` is the reader's side: a local, checked copy of a checkpoint in the store, for the
evaluate flow, the chat CLI and the server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from nanochat_core.checkpoint import (
    CHECKPOINTS,
    COMPLETE,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    step_of,
    verify_checkpoint_files,
)
from nanochat_core.pipeline.artifacts import (
    INPUTS,
    ArtifactError,
    StoreError,
    default_cache_root,
    filesystem,
    join_uri,
    remote_listing,
    store_errors,
)
from nanochat_core.progress import checkpoint_line, parse_structured_line


def remote_checkpoints(uri: str) -> list[tuple[int, str]]:
    """(step, directory name) of each complete checkpoint in the store under artifact `uri`, oldest first."""
    fs = filesystem(uri)
    with store_errors(uri, "listing its checkpoints"):
        try:
            return complete_in_listing(remote_listing(fs, join_uri(uri, CHECKPOINTS)))
        except FileNotFoundError:
            return []


def complete_in_listing(paths) -> list[tuple[int, str]]:
    """(step, name) of the checkpoints with a COMPLETE marker among paths relative to a checkpoints directory
    (step_NNNNNN/COMPLETE, ...), oldest first."""
    found = []
    for path in paths:
        name, _, rest = path.partition("/")
        if rest == COMPLETE and (step := step_of(name)) is not None:
            found.append((step, name))
    return sorted(found)


def upload_checkpoint(local: Path, uri: str) -> None:
    """Copy one committed local checkpoint into the store: its files, a size check of each, then COMPLETE."""
    fs, dest = filesystem(uri), join_uri(uri, CHECKPOINTS, local.name)
    names = sorted(p.name for p in local.iterdir() if p.is_file() and p.name != COMPLETE)
    with store_errors(uri, f"uploading checkpoint {local.name}"):
        try:
            fs.rm_file(join_uri(dest, COMPLETE))  # the same step saved again: incomplete while its files change
        except FileNotFoundError:
            pass
        fs.put([str(local / n) for n in names], [join_uri(dest, n) for n in names], batch_size=8)
        stored = remote_listing(fs, dest)
        for n in names:
            landed, size = stored.get(n, {}).get("size"), (local / n).stat().st_size
            if landed != size:
                raise ArtifactError(f"checkpoint file {local.name}/{n} did not land whole ({landed} of {size} bytes)")
        fs.put_file(str(local / COMPLETE), join_uri(dest, COMPLETE))


def prune_remote(uri: str, keep: set[str], newest: int) -> None:
    """Remove the store's checkpoints older than step `newest` whose directory name is not in `keep`."""
    fs = filesystem(uri)
    with store_errors(uri, "removing old checkpoints"):
        for step, name in remote_checkpoints(uri):
            if step < newest and name not in keep:
                fs.rm_file(join_uri(uri, CHECKPOINTS, name, COMPLETE))  # incomplete first, as a save is
                fs.rm(join_uri(uri, CHECKPOINTS, name), recursive=True)


def fetch_newest(uri: str, work_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """Download the store's newest intact checkpoint into work_dir/checkpoints when it is newer than every
    local one; its local path, or None when there is nothing newer (or only damaged checkpoints). A store
    that cannot be read is a StoreError: training from scratch because of an outage would waste the run."""
    local = latest_checkpoint(work_dir)
    local_step = -1 if local is None else step_of(local.name)
    for step, name in reversed(remote_checkpoints(uri)):
        if step <= local_step:
            return None
        try:
            return download_checkpoint(uri, name, Path(work_dir) / CHECKPOINTS)
        except StoreError:
            raise
        except (ArtifactError, CheckpointError) as e:
            warn(f"checkpoint {name} in {uri} is not usable, trying an older one: {e}")
    return None


def download_checkpoint(uri: str, name: str, dest_root: Path) -> Path:
    """Fetch one checkpoint into dest_root/name: the files COMPLETE lists, each checked, then moved into place."""
    fs, src = filesystem(uri), join_uri(uri, CHECKPOINTS, name)
    with store_errors(uri, f"reading checkpoint {name}"):
        try:
            marker = fs.cat_file(join_uri(src, COMPLETE))
        except FileNotFoundError as e:  # pruned since it was listed
            raise CheckpointError(f"checkpoint {name} is gone from the store") from e
    try:
        names = sorted(json.loads(marker)["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{COMPLETE} of checkpoint {name} lists no file digests") from e
    unsafe = [n for n in names if "/" in n or n.startswith(".") or n == COMPLETE]
    if unsafe:
        raise CheckpointError(f"{COMPLETE} of checkpoint {name} names files it cannot hold: {unsafe}")
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".tmp-dl-{name}-"))  # hidden: never taken for a checkpoint
    try:
        with store_errors(uri, f"downloading checkpoint {name}"):
            try:
                fs.get([join_uri(src, n) for n in names], [str(tmp / n) for n in names], batch_size=8)
            except FileNotFoundError as e:
                raise CheckpointError(f"checkpoint {name}: a file its {COMPLETE} lists is missing ({e})") from e
        (tmp / COMPLETE).write_bytes(marker)
        verify_checkpoint_files(tmp, names)
        final = dest_root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_checkpoint(checkpoint_uri: str, cache_root: Path | None = None) -> Path:
    """A local copy of the checkpoint at `checkpoint_uri` (<artifact uri>/checkpoints/step_N): the one already
    downloaded when it still matches the store's COMPLETE and its files their sha256, else a fresh download."""
    artifact, _, name = checkpoint_uri.rstrip("/").rsplit("/", 2)
    root = Path(cache_root or default_cache_root()) / CHECKPOINTS / hashlib.sha256(artifact.encode()).hexdigest()[:20]
    local = root / name
    with store_errors(checkpoint_uri, "reading its COMPLETE marker"):
        try:
            marker = filesystem(checkpoint_uri).cat_file(join_uri(checkpoint_uri, COMPLETE))
        except FileNotFoundError as e:
            raise CheckpointError(f"{checkpoint_uri} is not a complete checkpoint (no {COMPLETE})") from e
    try:
        if (local / COMPLETE).read_bytes() == marker:
            verify_checkpoint_files(local, sorted(json.loads(marker)["sha256"]))
            return local
    except (OSError, ValueError, KeyError, CheckpointError):
        pass  # absent, stale or damaged: download it again
    return download_checkpoint(artifact, name, root)


def upload_inputs_record(work_dir: Path, uri: str) -> None:
    """The stage's inputs record (which tokenizer, ...) into the store, beside the checkpoints."""
    record = Path(work_dir) / INPUTS
    if record.is_file():
        with store_errors(uri, f"writing {INPUTS}"):
            filesystem(uri).pipe_file(join_uri(uri, INPUTS), record.read_bytes())


class CheckpointMirror:
    """Uploads the checkpoints a stage announces (its NANOCHAT_CHECKPOINT lines) on a thread of its own."""

    def __init__(self, uri: str, work_dir: Path, say: Callable[[str], None] = print):
        self.uri, self.work_dir, self.say = uri, Path(work_dir), say
        self.waiting: tuple[Path, dict] | None = None
        self.closing = False
        self.uploaded: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="nanochat-checkpoint-mirror", daemon=True)
        self.thread.start()

    def watching(self, on_line: Callable[[str], None] | None) -> Callable[[str], None]:
        """on_line, with each checkpoint line handed to the mirror instead (it is announced once uploaded)."""
        forward = on_line or self.say

        def handle(line: str) -> None:
            parsed = parse_structured_line(line)
            if parsed is None or parsed[0] != "checkpoint" or "path" not in parsed[1]:
                forward(line)
                return
            forward(f"checkpoint {Path(parsed[1]['path']).name} saved; copying it to the store {self.uri}")
            self.push(Path(parsed[1]["path"]), parsed[1])
        return handle

    def push(self, checkpoint: Path, announcement: dict | None = None) -> None:
        with self.cond:
            self.waiting = (checkpoint, announcement or {})  # a checkpoint still waiting is superseded
            self.cond.notify()

    def close(self) -> None:
        """Finish the upload in progress and the one waiting (a failed stage resumes from it), then stop."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()

    def _loop(self) -> None:
        try:
            upload_inputs_record(self.work_dir, self.uri)
        except ArtifactError as e:
            self.say(f"warning: {INPUTS} was not copied to the store {self.uri}: {e}")
        while True:
            with self.cond:
                while self.waiting is None and not self.closing:
                    self.cond.wait()
                waiting, self.waiting = self.waiting, None
            if waiting is None:
                return
            self._mirror(*waiting)

    def _mirror(self, checkpoint: Path, announcement: dict) -> None:
        try:
            upload_checkpoint(checkpoint, self.uri)
            keep = {p.name for p in complete_checkpoints(self.work_dir)}
            prune_remote(self.uri, keep, step_of(checkpoint.name))
        except Exception as e:  # noqa: BLE001 - whatever broke, the stage goes on and the next checkpoint is tried
            self.say(f"warning: checkpoint {checkpoint.name} was not copied to the store {self.uri}: {e}")
            return
        self.uploaded.append(checkpoint.name)
        step = announcement.get("step", step_of(checkpoint.name))
        self.say(checkpoint_line(join_uri(self.uri, CHECKPOINTS, checkpoint.name), step, announcement.get("stage", "")))
