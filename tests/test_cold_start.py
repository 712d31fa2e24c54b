"""Issue 12, "A cold, busy machine": the first `nanochat` run on a machine with no Prefect home yet, while another
process keeps a core busy, must work on the first try: Prefect's ephemeral API server then has to import itself
and create its SQLite database, which took longer than Prefect's default 20 s start-up timeout. And offline,
nothing may log telemetry errors. The defaults that make it so are in flows/prefect_env.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Lines that must not appear: the start-up timeout, any error log or traceback, and anything about telemetry (offline,
# Prefect's server heartbeat logs "Failed to send telemetry: ..."; on a new database it can also fail with
# "database is locked" in send_telemetry_heartbeat) or the SDK's analytics (Amplitude).
BAD_LINES = ("Timed out", "| ERROR", "Traceback", "telemetry", "sens-o-matic", "amplitude")


@pytest.fixture
def busy_core():
    """Another process spinning on one core for the length of the test."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait()


def fresh_machine_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment as a new user's would be: HOME and PREFECT_HOME empty, no Prefect settings (so no
    PREFECT_API_URL: the ephemeral server starts and creates its database) and no DO_NOT_TRACK, so that what
    the CLI itself sets is what is tested."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    return {**env, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), **extra}


def test_first_run_on_a_cold_busy_machine(tmp_path, busy_core):
    home, store = tmp_path / "home", tmp_path / "store"
    home.mkdir()
    store.mkdir()
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", "--store", str(store)], cwd=REPO,
                            env=fresh_machine_env(home), capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    assert busy_core.poll() is None, "the busy process died early: the machine was not busy"
    assert result.returncode == 0, f"exit {result.returncode} after {seconds:.0f}s:\n{output[-4000:]}"
    assert "no models found" in result.stdout, output[-4000:]
    assert (home / ".prefect" / "prefect.db").is_file(), "the ephemeral server did not create its database here"
    bad = [line for line in output.splitlines() if any(b.lower() in line.lower() for b in BAD_LINES)]
    assert not bad, "\n".join(bad)


def test_defaults_never_override_what_the_user_set(tmp_path):
    """A value from the environment, the profile or prefect.toml wins over the CLI's default; unset ones get it."""
    home = tmp_path / "home"
    (home / ".prefect").mkdir(parents=True)
    (home / ".prefect" / "profiles.toml").write_text(
        'active = "mine"\n[profiles.mine]\nPREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = "77"\n')
    (tmp_path / "prefect.toml").write_text("[server]\nanalytics_enabled = true\n")
    code = ("import json, os; from flows.cli import quiet_prefect_defaults; quiet_prefect_defaults();"
            "from prefect.settings import get_current_settings; s = get_current_settings().server;"
            "print(json.dumps([s.ephemeral.startup_timeout_seconds, s.analytics_enabled,"
            " s.ui.show_promotional_content, os.environ['DO_NOT_TRACK']]))")
    env = fresh_machine_env(home, PYTHONPATH=str(REPO), DO_NOT_TRACK="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [77, True, False, "0"]

    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=fresh_machine_env(tmp_path / "empty"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [180, False, False, "1"]
