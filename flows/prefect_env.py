"""Prefect defaults for an offline, possibly cold and busy machine, applied without overriding the user; and
`api_server_for_this_command()`, the local API server a `nanochat` command holds when no Prefect API is configured
(see its docstring: issue 13's slow, orphaning shutdown).

`offline_defaults()` sets, for this process and every process it starts (Prefect's ephemeral API server,
workers, torchrun), the settings below, each only when the user has not set it anywhere Prefect reads
settings from: the environment, `.env`, `prefect.toml`, `pyproject.toml` `[tool.prefect]` or the active
profile in `$PREFECT_HOME/profiles.toml`. Environment variables outrank all of those, so a plain
`os.environ.setdefault` would silently override a value the user set with `prefect config set`; instead each
setting is looked up through Prefect's own settings model and only written when no source set it.

Checked against the installed prefect 3.9.1 (paths under site-packages/prefect):

- `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180` (settings/models/server/ephemeral.py:30, default 20).
  With no PREFECT_API_URL the first client starts a uvicorn subprocess (server/api/server.py:1117-1177,
  `SubprocessASGIServer.start`) and polls /health until this many seconds of polling have passed. On a fresh
  machine that subprocess imports prefect.server (compiling it when there is no bytecode yet) and creates and
  migrates `$PREFECT_HOME/prefect.db`; with another process busy on a core that took more than 20 s (issue 12:
  "Timed out while attempting to connect to ephemeral Prefect API server", server.py:1163). The cost of a
  generous value: a server that crashes at start-up is reported after this long instead of 20 s.
- `DO_NOT_TRACK=1` (not a Prefect setting; read from the environment by
  _internal/analytics/enabled.py:24-27). Turns off the SDK's usage events (Amplitude), which prefect checks
  once at import (prefect/__init__.py, `_initialize_sdk_analytics`), hence set before prefect is imported.
- `PREFECT_SERVER_ANALYTICS_ENABLED=false` (settings/models/server/root.py:45, default true). Turns off the
  server's telemetry heartbeat to https://sens-o-matic.prefect.io/ (server/services/telemetry.py:64-114, also
  run by the ephemeral server: `run_in_ephemeral=True`), which offline logs
  "ERROR ... Failed to send telemetry: [Errno -2] Name or service not known"; the SDK analytics service asks the
  server for this value too (_internal/analytics/service.py:156-177), and the V2 UI starts its Amplitude
  client only when it is true (ui-v2 bundle, `server.analytics_enabled` from /admin/settings).
- `PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false` (settings/models/server/ui.py:57, default true): no upgrade
  prompts or marketing banners in the UI of a server started from this environment.

Looked at and deliberately left alone (nothing there waits on, or logs errors about, the internet):
- `PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED` (settings/models/client.py:100): one GET /admin/version to the
  Prefect API in use (the local ephemeral server, or the user's server), not to the internet; keeping it keeps
  the client/server compatibility check.
- Prefect 3.9.1 has no "check for updates" call (no pypi.org or GitHub release lookup in prefect/ or its UI
  bundles). The collection registry (server/api/collections.py:17-25, raw.githubusercontent.com) is fetched only
  when someone opens the UI's block or work-pool catalogue; there is no setting for it, and the ephemeral server
  serves no UI (server.py `_run_uvicorn_command`: PREFECT_UI_ENABLED=0).
- `PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS` and `PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY`: OpenTelemetry
  metrics/spans that are exported only to an OTEL_EXPORTER_OTLP_* endpoint the user configured or to Prefect
  Cloud (_internal/metrics.py:17-47, telemetry/run_telemetry.py:54-57); offline nothing is sent.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from nanochat_core.pipeline.launch import new_group_dying_with_parent, stop_group

# Prefect settings (their accessor path in prefect.settings.Settings) and the value used when nobody set them.
PREFECT_DEFAULTS: dict[str, str] = {
    "server.ephemeral.startup_timeout_seconds": "180",
    "server.analytics_enabled": "false",
    "server.ui.show_promotional_content": "false",
}
# Environment-only switches (not Prefect settings): set when absent from the environment.
ENV_DEFAULTS: dict[str, str] = {"DO_NOT_TRACK": "1"}


def env_name(accessor: str) -> str:
    """The environment variable of a Prefect setting: server.ui.show_promotional_content ->
    PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT."""
    return "PREFECT_" + accessor.upper().replace(".", "_")


def offline_defaults() -> dict[str, str]:
    """Apply the defaults above (see the module docstring for why each is there) to os.environ, leaving every
    setting the user made alone; returns the environment variables it set. Call it before prefect is imported
    so that DO_NOT_TRACK is seen by prefect's import-time analytics check; it imports prefect itself (to read
    the user's settings through Prefect's own sources) and refreshes Prefect's global settings, so the values
    also hold in this process. Idempotent."""
    applied: dict[str, str] = {}
    for name, value in ENV_DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = applied[name] = value

    from prefect.settings import Settings

    settings = Settings()
    for accessor, value in PREFECT_DEFAULTS.items():
        *parents, field = accessor.split(".")
        model = settings
        for part in parents:
            model = getattr(model, part)
        if field in model.model_fields_set:  # set by the environment, .env, a toml file or the profile
            continue
        name = env_name(accessor)
        os.environ[name] = applied[name] = value
    if any(name.startswith("PREFECT_") for name in applied):
        # prefect built its global settings when it was imported (above, or earlier): rebuild them from the
        # environment as prefect does after its plugins set variables.
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    return applied


@contextlib.contextmanager
def api_server_for_this_command() -> Iterator[str | None]:
    """When no Prefect API is configured, hold Prefect's ephemeral API server for the length of a command (its
    URL in PREFECT_API_URL while it lasts); with a configured API, do nothing (yields None).

    Prefect would start the same server itself on its first client call (server/api/server.py:1117-1205,
    `SubprocessASGIServer`), but in this process's group and stopped only by `atexit`. Measured (issue 13): Ctrl-C
    or SIGTERM to the group then killed the server first, and every later state update, log and event of the
    crashing run retried against the dead server for 218-235 s; SIGTERM to this process alone ended it by
    Prefect re-sending SIGTERM to itself (utilities/engine capture_sigterm) with no atexit, leaving the server
    running. Started here, with the command line Prefect uses, it has its own session (a group signal does not
    reach it), gets SIGTERM from the kernel if this process dies, and is stopped after Prefect's log and event
    workers have drained into it."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        yield None
        return
    proc, url = _start_api_server(settings)
    os.environ["PREFECT_API_URL"] = url
    refresh_settings()
    try:
        yield url
    finally:
        try:
            drain_prefect_workers()
        finally:
            os.environ.pop("PREFECT_API_URL", None)
            refresh_settings()
            stop_group(proc, grace=5.0)


def refresh_settings() -> None:
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def _start_api_server(settings) -> tuple[subprocess.Popen, str]:
    """Prefect's ephemeral server (its uvicorn command and environment, server.py:1177-1205) on a free port, in
    its own session; returns (process, API URL) once /health answers."""
    import httpx
    import prefect

    timeout = settings.server.ephemeral.startup_timeout_seconds
    for _ in range(5):  # exit code 3: the port was taken between choosing and binding it
        port = free_local_port()
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
               "error", "--lifespan", "on"]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **settings.to_environment_variables(exclude_unset=True)}
        proc = subprocess.Popen(cmd, env=env, preexec_fn=new_group_dying_with_parent)
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                        return proc, url
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        except BaseException:
            stop_group(proc, grace=5.0)
            raise
        if proc.poll() != 3:
            break
    stop_group(proc, grace=5.0)
    raise RuntimeError(f"the local Prefect API server did not answer within {timeout} s (exit code {proc.poll()}); "
                       "set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or PREFECT_API_URL to a server")


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain_prefect_workers() -> None:
    """Send the logs and events Prefect still buffers (as prefect.testing.utilities.prefect_test_harness does
    before it stops its server)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())
