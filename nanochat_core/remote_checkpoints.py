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
tried: the mirror is a convenience for resuming elsewhere, never a reason to stop a stage.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from nanochat_core.artifacts import ArtifactError, filesystem, join_uri, store_errors
from nanochat_core.checkpoint import (
    CHECKPOINTS,
    COMPLETE,
    STEP_DIR_RE,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    verify_checkpoint_files,
)
from nanochat_core.common import parse_structured_line


def remote_checkpoints(uri: str) -> list[tuple[int, str]]:
    """(step, directory name) of each complete checkpoint in the store under artifact `uri`, oldest first."""
    fs, root = filesystem(uri), join_uri(uri, CHECKPOINTS)
    with store_errors(uri, "listing its checkpoints"):
        try:
            markers = fs.glob(join_uri(root, "step_*", COMPLETE))
        except FileNotFoundError:
            return []
    found = []
    for marker in markers:
        name = marker.rstrip("/").split("/")[-2]
        m = STEP_DIR_RE.match(name)
        if m:
            found.append((int(m.group(1)), name))
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
        for n in names:
            stored, size = fs.size(join_uri(dest, n)), (local / n).stat().st_size
            if stored != size:
                raise ArtifactError(f"checkpoint file {local.name}/{n} did not land whole ({stored} of {size} bytes)")
        fs.put_file(str(local / COMPLETE), join_uri(dest, COMPLETE))


def prune_remote(uri: str, keep: set[str], newest: int) -> None:
    """Remove the store's checkpoints older than step `newest` whose directory name is not in `keep`."""
    fs = filesystem(uri)
    with store_errors(uri, "removing old checkpoints"):
        for step, name in remote_checkpoints(uri):
            if step < newest and name not in keep:
                fs.rm(join_uri(uri, CHECKPOINTS, name), recursive=True)


def fetch_newest(uri: str, work_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """Download the store's newest intact checkpoint into work_dir/checkpoints when it is newer than every
    local one; its local path, or None when there is nothing newer (or only damaged checkpoints)."""
    local = latest_checkpoint(work_dir)
    local_step = -1 if local is None else int(STEP_DIR_RE.match(local.name).group(1))
    for step, name in reversed(remote_checkpoints(uri)):
        if step <= local_step:
            return None
        try:
            return download_checkpoint(uri, name, Path(work_dir) / CHECKPOINTS)
        except (ArtifactError, CheckpointError) as e:
            warn(f"checkpoint {name} in {uri} is not usable, trying an older one: {e}")
    return None


def download_checkpoint(uri: str, name: str, dest_root: Path) -> Path:
    """Fetch one checkpoint into dest_root/name: the files COMPLETE lists, each checked, then moved into place."""
    fs, src = filesystem(uri), join_uri(uri, CHECKPOINTS, name)
    with store_errors(uri, f"reading checkpoint {name}"):
        marker = fs.cat_file(join_uri(src, COMPLETE))
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


class CheckpointMirror:
    """Uploads the checkpoints a stage announces (its NANOCHAT_CHECKPOINT lines) on a thread of its own."""

    def __init__(self, uri: str, work_dir: Path, say: Callable[[str], None] = print):
        self.uri, self.work_dir, self.say = uri, Path(work_dir), say
        self.waiting: Path | None = None
        self.closing = False
        self.uploaded: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="nanochat-checkpoint-mirror", daemon=True)
        self.thread.start()

    def watching(self, on_line: Callable[[str], None] | None) -> Callable[[str], None]:
        """on_line, also handing each checkpoint line's path to the mirror."""
        def handle(line: str) -> None:
            parsed = parse_structured_line(line)
            if parsed is not None and parsed[0] == "checkpoint" and "path" in parsed[1]:
                self.push(Path(parsed[1]["path"]))
            (on_line or self.say)(line)
        return handle

    def push(self, checkpoint: Path) -> None:
        with self.cond:
            self.waiting = checkpoint  # a checkpoint still waiting is superseded: only the newest matters
            self.cond.notify()

    def close(self) -> None:
        """Finish the upload in progress and the one waiting (a failed stage resumes from it), then stop."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.waiting is None and not self.closing:
                    self.cond.wait()
                checkpoint, self.waiting = self.waiting, None
            if checkpoint is None:
                return
            self._mirror(checkpoint)

    def _mirror(self, checkpoint: Path) -> None:
        try:
            upload_checkpoint(checkpoint, self.uri)
            keep = {p.name for p in complete_checkpoints(self.work_dir)}
            prune_remote(self.uri, keep, int(STEP_DIR_RE.match(checkpoint.name).group(1)))
        except Exception as e:  # noqa: BLE001 - whatever broke, the stage goes on and the next checkpoint is tried
            self.say(f"warning: checkpoint {checkpoint.name} was not copied to the store {self.uri}: {e}")
            return
        self.uploaded.append(checkpoint.name)
        self.say(f"checkpoint {checkpoint.name} copied to the store {self.uri}")
