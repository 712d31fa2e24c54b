"""Serving: the speedrun's final task starts the chat server as a detached process and returns its URL;
the `serve` flow holds a server in the foreground for as long as its flow run lives (cancel it to stop).

A detached server records itself in `<store>/runs/server-<port>.json` (pid, model, url). Running the
speedrun again reuses a live server of the same model on that port, replaces one of another model, and
refuses a port held by some other program. Port 0 is a free port the server picks; the record (server-0.json)
keeps the URL with the real port, and the next run reuses that server the same way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from uuid import UUID

from prefect import flow, task
from prefect.artifacts import create_link_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from prefect.states import Cancelling

from nanochat_core.pipeline import artifacts, stages
from nanochat_core.pipeline.artifacts import ArtifactError, ArtifactRef
from nanochat_core.pipeline.launch import python_command, run_streaming, stop_group


class ServerError(RuntimeError):
    pass


def health(url: str, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return json.loads(r.read())
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def model_dirs(model: ArtifactRef) -> tuple[Path, Path]:
    """Local (model dir, tokenizer dir) of a chat model artifact (its manifest names its tokenizer)."""
    model_dir = artifacts.materialize(model)
    try:
        tokenizer = stages.model_tokenizer(model.uri)  # recorded relative to the store: found where the store is now
    except ArtifactError as e:
        raise ServerError(f"{model.uri} does not name its tokenizer in its manifest; is it a model artifact?") from e
    artifacts.verify_artifact(tokenizer.uri, tokenizer.digest)
    return model_dir, artifacts.materialize(tokenizer)


def server_command(model: ArtifactRef, host: str, port: int) -> list[str]:
    model_dir, tok_dir = model_dirs(model)
    return python_command("nanochat_core.serve", ["--model", str(model_dir), "--tokenizer", str(tok_dir),
                                                   "--host", host, "--port", str(port)])


def server_base_url(host: str, port: int) -> str:
    """http://host:port for a server bound there, as a client on this machine reaches it (IPv6 in brackets)."""
    from nanochat_core.serve.server import server_url

    return server_url(host, port).rstrip("/")


BOUND_URL = re.compile(r"serving at (http://\S+?)/?(?:\s|$)")


def bound_url_from_log(log_path: Path, offset: int) -> str | None:
    """The URL a server started with --port 0 logged once it listened (nanochat_core.serve.server.ChatServer logs
    "serving at <url>" with the port it bound), reading its log from `offset`; None until it has."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            found = BOUND_URL.search(f.read().decode(errors="replace"))
    except OSError:
        return None
    return found.group(1) if found else None


def start_detached(model: ArtifactRef, host: str, port: int, state_dir: Path, wait: float = 180.0) -> dict:
    """Start (or reuse) a detached chat server for `model`; returns {"url", "port", "pid", "reused"}. Port 0: a free
    port, chosen by the server and recorded, so that the next run reuses that server."""
    state_path = state_dir / f"server-{port}.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    url = state["url"] if port == 0 and state else server_base_url(host, port)
    if state and pid_alive(state["pid"]) and health(url):
        if state["model"] == model.digest:
            return {"url": url, "port": url_port(url), "pid": state["pid"], "reused": True}
        os.killpg(state["pid"], signal.SIGTERM)  # our server, an older model: replace it
        deadline = time.time() + 30
        while time.time() < deadline and health(url):
            time.sleep(0.5)
    if port != 0 and health(url):
        raise ServerError(f"port {port} on {host} is already served by another program; choose another --port")
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"server-{port}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
    offset = log.tell()
    proc = subprocess.Popen(server_command(model, host, port), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + wait
        while time.time() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"chat server exited with code {proc.returncode}; see {log_path}")
            if port == 0:
                url = bound_url_from_log(log_path, offset) or url
            if (port != 0 or url_port(url) != 0) and health(url):
                artifacts.atomic_write_bytes(state_path, json.dumps(
                    {"pid": proc.pid, "model": model.digest, "url": url}).encode())
                return {"url": url, "port": url_port(url), "pid": proc.pid, "reused": False}
            time.sleep(0.5)
        raise ServerError(f"chat server did not answer {url}/health within {wait:.0f}s; see {log_path}")
    except BaseException:  # failed, timed out or interrupted: not recorded anywhere, so it must not outlive us
        stop_group(proc, grace=5.0)
        raise


def url_port(url: str) -> int:
    return urllib.parse.urlsplit(url).port or 0


def flow_run_state(flow_run_id: str):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).state


def start_serve_run(deployment: str, model: ArtifactRef, host: str, port: int, state_dir: Path,
                    wait: float = 300.0) -> dict:
    """Start (or reuse) the serve deployment's flow run for `model`: that run is the server, so cancelling
    it (in the UI) stops it. Returns {"url", "port", "flow_run_id", "reused"} once /health answers."""
    url = server_base_url(host, port)
    state_path = state_dir / f"server-{port}.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state and state.get("flow_run_id") and health(url):
        run_state = flow_run_state(state["flow_run_id"])
        if run_state is not None and run_state.is_running():
            if state["model"] == model.digest:
                return {"url": url, "port": port, "flow_run_id": state["flow_run_id"], "reused": True}
            with get_client(sync_client=True) as client:  # our server, an older model: cancel its run
                client.set_flow_run_state(UUID(state["flow_run_id"]), Cancelling(), force=True)
            deadline = time.time() + 60
            while time.time() < deadline and health(url):
                time.sleep(0.5)
    if health(url):
        raise ServerError(f"port {port} on {host} is already served by another program; choose another --port")
    run = run_deployment(deployment, parameters={"checkpoint": model.uri, "host": host, "port": port}, timeout=0,
                         as_subflow=False)
    deadline = time.time() + wait
    while time.time() < deadline:
        run_state = flow_run_state(str(run.id))
        if run_state is not None and run_state.is_final():
            raise ServerError(f"serve run {run.name} ended {run_state.name} before the server answered: "
                              f"{run_state.message}")
        if health(url):
            state_dir.mkdir(parents=True, exist_ok=True)
            artifacts.atomic_write_bytes(state_path, json.dumps(
                {"flow_run_id": str(run.id), "model": model.digest, "url": url}).encode())
            return {"url": url, "port": port, "flow_run_id": str(run.id), "reused": False}
        time.sleep(1.0)
    raise ServerError(f"the {deployment} run {run.name} did not answer {url}/health within {wait:.0f}s; is a worker "
                      "(or `nanochat deploy --serve`) serving that deployment?")


@task(name="serve", task_run_name="serve")
def start_server_task(model: dict[str, str], host: str, port: int, state_dir: str,
                      deployment: str | None = None) -> dict:
    """The speedrun's last task: the chat server for `model`, as a run of the serve `deployment` when one is
    named (cancel that run to stop it), else as a detached process (no Prefect worker needed)."""
    logger = get_run_logger()
    ref = ArtifactRef.from_dict(model)
    if deployment:
        info = start_serve_run(deployment, ref, host, port, Path(state_dir))
        holder = f"flow run {info['flow_run_id']}"
    else:
        info = start_detached(ref, host, port, Path(state_dir))
        holder = f"pid {info['pid']}"
    verb = "reusing" if info["reused"] else "started"
    logger.info(f"{verb} chat server ({holder}) at {info['url']}")
    create_link_artifact(link=info["url"], link_text="nanochat chat server", key="chat-server",
                         description=f"Chat UI and OpenAI-compatible API for model {model['uri']}")
    return info


@flow(name="serve", log_prints=True)
def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Hold a chat server for `checkpoint` (a model artifact URI) until this flow run is cancelled."""
    ref = artifacts.verify_artifact(checkpoint, deep=True)
    cmd = server_command(ref, host, port)
    create_link_artifact(link=server_base_url(host, port), link_text="nanochat chat server", key="chat-server")
    run_streaming(cmd, on_line=lambda line: print(line, file=sys.stdout, flush=True))
