"""Issue 13, "slow, orphaning shutdown": after Ctrl-C or SIGTERM, `nanochat speedrun` exits within 30 s and leaves
nothing running: no Prefect API server, no stage process, no torchrun worker.

Each test runs the real command on Prefect's local (ephemeral) API server, in its own session, with a marker in its
environment; every process it starts inherits the marker, so the ones still alive afterwards are found in /proc
even when they were reparented out of its tree."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXIT_WITHIN = 30.0
# Small stages (tests/test_flows.py MICRO); base long enough to be interrupted, the tokenizer long enough (~2 s)
# to be interrupted while it computes.
MICRO = {
    "tokenizer": {"vocab_size": 4096, "max_chars": 20_000_000},
    "base": {"depth": 2, "max_seq_len": 64, "device_batch_size": 8, "total_batch_size": 512,
             "num_iterations": 5000, "eval_every": 2500, "eval_tokens": 4096, "save_every": 100},
}


def marked_processes(marker: str) -> list[str]:
    """'pid cmdline' of the live processes whose environment holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = b"\0" + (proc / "environ").read_bytes()
            zombie = (proc / "stat").read_text().split(") ")[-1].startswith("Z")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if f"\0{marker}=1\0".encode() in environ and not zombie:
            found.append(f"{proc.name} {cmdline[:200]}")
    return found


class Speedrun:
    """`nanochat speedrun` in its own session, its output lines queued as they come."""

    def __init__(self, tmp_path: Path, marker: str, overrides: dict):
        args = [sys.executable, "-m", "flows.cli", "speedrun", "--preset", "tiny", "--store", str(tmp_path / "store"),
                "--no-serve"]
        for stage, fields in overrides.items():
            args += [a for k, v in fields.items() for a in ("--set", f"{stage}.{k}={json.dumps(v)}")]
        # Prefect's local API server (no PREFECT_API_URL), with this session's database and settings
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        self.proc = subprocess.Popen(args, cwd=REPO, env={**env, marker: "1"}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, "the run ended early:\n" + "\n".join(self.seen[-40:])
                continue
            self.seen.append(line)
            if text in line:
                return
        pytest.fail(f"no line with {text!r} within {timeout:.0f}s:\n" + "\n".join(self.seen[-40:]))

    def exit_after(self, sig: int, to_group: bool) -> tuple[int, float]:
        """Send `sig` (to the command's process group, or to its main process alone); (exit code, seconds)."""
        start = time.monotonic()
        (os.killpg if to_group else os.kill)(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - start
        time.sleep(0.5)  # the reader thread takes the last lines
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, seconds


@pytest.fixture
def marker():
    name = f"NANOCHAT_TEST_SHUTDOWN_{os.getpid()}_{time.monotonic_ns()}"
    yield name
    for line in marked_processes(name):  # never leave a failed test's processes behind
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_stopped_cleanly(run: Speedrun, code: int | None, seconds: float, marker: str, expected_code: int,
                           words: str) -> None:
    left = marked_processes(marker)
    output = "\n".join(run.seen[-40:])
    assert code is not None, f"still running {seconds:.0f}s after the signal:\n{output}"
    assert seconds < EXIT_WITHIN, f"exited after {seconds:.1f}s:\n{output}"
    assert not left, "left running:\n" + "\n".join(left)
    assert code == expected_code, output
    assert words in run.seen[-1], output
    assert not any("Traceback" in line for line in run.seen), output


def test_sigterm_to_the_main_process_alone_stops_everything(tmp_path, marker):
    """The worst case: the API server and the stage process get no signal of their own. Sent while a stage
    process (the tokenizer) computes; the slow tests below do it during pretraining under torchrun."""
    run = Speedrun(tmp_path, marker, MICRO)
    run.wait_for("tokenizer: computing into", timeout=180)
    time.sleep(0.3)
    assert any("nanochat_core.tok_train" in line for line in marked_processes(marker)), "the stage is not running"
    code, seconds = run.exit_after(signal.SIGTERM, to_group=False)
    assert_stopped_cleanly(run, code, seconds, marker, 143, "stopped by SIGTERM")


@pytest.mark.slow  # ~45 s each: up to pretraining under torchrun, then the signal
@pytest.mark.parametrize("sig, to_group, expected_code, words", [
    (signal.SIGINT, True, 130, "interrupted (Ctrl-C)"),
    (signal.SIGTERM, True, 143, "stopped by SIGTERM"),
    (signal.SIGTERM, False, 143, "stopped by SIGTERM"),
])
def test_a_signal_during_pretraining_stops_everything_and_keeps_the_checkpoint(tmp_path, marker, sig, to_group,
                                                                               expected_code, words):
    run = Speedrun(tmp_path, marker, MICRO)
    run.wait_for("base step", timeout=300)
    time.sleep(1.0)
    code, seconds = run.exit_after(sig, to_group=to_group)
    assert_stopped_cleanly(run, code, seconds, marker, expected_code, words)
    assert list((tmp_path / "store").glob("base/*/checkpoints/step_*")), "no checkpoint was kept"
