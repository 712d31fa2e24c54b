"""Prefect defaults for an offline, possibly cold and busy machine, applied without overriding the user.

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

import os

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
