"""`--store s3://bucket/prefix` against a real S3 endpoint: moto_server on 127.0.0.1 (never a mocked filesystem).

1. bad input: a missing bucket or refused credentials fail in the CLI with one error naming the store, and
   nothing is written;
2. publish, deep checks and materialize: a deep check hashes each object once per machine (ETag memo) and
   still catches a flipped byte; a cache hit re-checks the store's manifest and the local copy;
3. fault: the S3 endpoint goes down in the middle of a stage's upload and comes back: the publish fails with a
   clear error, the partial artifact has no MANIFEST.json so readers treat it as incomplete, the retry succeeds;
4. the tiny speedrun on S3 against a real Prefect server: every artifact, the run's report and summary and
   Prefect's result records land in S3, and a second run in a fresh process with empty local directories (a
   second machine) is fully Cached; that machine chats with the trained model, downloaded from S3.

About 2 to 2.5 minutes on 2 cores, almost all of it the speedrun.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from test_flows import MICRO, STAGES, free_port

from nanochat_core.checkpoint import COMPLETE, load_checkpoint, save_checkpoint
from nanochat_core.common import DistInfo
from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.pipeline import artifacts, remote_checkpoints, stages
from nanochat_core.pipeline.artifacts import ArtifactError, StoreError
from nanochat_core.pipeline.launch import StageFailed

BUCKET = "nanochat-test"
# a failed upload leaves s3fs coroutines that fsspec created for files it never started
pytestmark = pytest.mark.filterwarnings("ignore:coroutine 'S3FileSystem._put_file' was never awaited")


@contextmanager
def env_vars(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """moto_server on a free port, the AWS variables pointing at it, the test bucket, and local staging and
    download dirs of this module's own."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - the server's output
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(f"{url}/moto-api/data.json", timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None and time.time() < deadline, "moto_server did not start"
            time.sleep(0.2)
    local = tmp_path_factory.mktemp("local")
    with env_vars(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                  AWS_DEFAULT_REGION="us-east-1", NANOCHAT_STAGING=str(local / "staging"),
                  NANOCHAT_CACHE=str(local / "cache")):
        artifacts.filesystem(f"s3://{BUCKET}").mkdir(BUCKET)
        yield {"url": url, "port": port, "local": local}
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def set_flags(overrides: dict[str, dict]) -> list[str]:
    return [a for stage, fields in overrides.items() for k, v in fields.items()
            for a in ("--set", f"{stage}.{k}={json.dumps(v)}")]


# ---------------------------------------------------------------------------------------------
# bad input


def set_moto_auth(url: str, on: bool) -> None:
    """moto checks credentials (it knows none, so every key is refused) after this many more requests."""
    r = httpx.post(f"{url}/moto-api/reset-auth", content=b"0" if on else b"inf",
                   headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("case", ["missing bucket", "bad credentials"])
def test_bad_store_is_refused_with_one_clear_error(moto, tmp_path, case):
    store = f"s3://no-such-bucket-{os.getpid()}/runs" if case == "missing bucket" else f"s3://{BUCKET}/refused"
    fresh = {"NANOCHAT_STAGING": str(tmp_path / "staging"), "NANOCHAT_CACHE": str(tmp_path / "cache")}
    if case == "bad credentials":
        fresh.update(AWS_ACCESS_KEY_ID="AKIANOTAKEY", AWS_SECRET_ACCESS_KEY="wrong")
        set_moto_auth(moto["url"], on=True)
    try:
        result = cli("speedrun", "--preset", "tiny", "--store", store, "--no-serve", env=fresh)
    finally:
        set_moto_auth(moto["url"], on=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("nanochat: error:")]
    assert len(errors) == 1 and f"store {store} is not writable" in errors[0], result.stderr[-2000:]
    assert ("bucket does not exist" if case == "missing bucket" else "Access Key Id") in errors[0]
    assert "Traceback" not in result.stderr
    fs = artifacts.filesystem(f"s3://{BUCKET}")
    assert [b.rstrip("/") for b in fs.ls("")] == [BUCKET]  # no bucket made
    if case == "bad credentials":
        assert fs.find(store) == []  # no probe left behind
    assert not (tmp_path / "staging").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# publish, deep checks and materialize on S3


def local_artifact(root: Path, files: dict[str, bytes], metrics: dict | None = None) -> str:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return artifacts.write_manifest(root, "demo", {"x": 1}, {}, "code1", metrics or {})


def test_deep_check_hashes_each_object_once_per_machine_and_catches_a_flipped_byte(moto, tmp_path, monkeypatch):
    digest = local_artifact(tmp_path / "a", {"w.bin": os.urandom(300_000), "sub/meta.json": b"{}"})
    uri = f"s3://{BUCKET}/unit/demo/deep"
    artifacts.publish(tmp_path / "a", uri)
    hashed = []
    real = artifacts._sha256_remote
    monkeypatch.setattr(artifacts, "_sha256_remote", lambda fs, path: hashed.append(path) or real(fs, path))
    assert artifacts.verify_artifact(uri, digest, deep=True).digest == digest
    assert hashed == []  # the uploaded objects' ETags match the local bytes: nothing to download
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path / "machine2"))  # another machine hashes each object once
    artifacts.verify_artifact(uri, digest, deep=True)
    artifacts.verify_artifact(uri, digest, deep=True)
    assert sorted(p.rsplit("/", 1)[-1] for p in hashed) == ["meta.json", "w.bin"]

    fs = artifacts.filesystem(uri)
    data = bytearray(fs.cat_file(f"{uri}/w.bin"))
    data[1000] ^= 0x01  # same size: only a hash can tell, and the rewrite gave the object a new ETag
    fs.pipe_file(f"{uri}/w.bin", bytes(data))
    artifacts.verify_artifact(uri, digest)
    with pytest.raises(ArtifactError, match="w.bin is corrupt"):
        artifacts.verify_artifact(uri, digest, deep=True)
    fs.rm_file(f"{uri}/sub/meta.json")
    with pytest.raises(ArtifactError, match="meta.json is missing"):
        artifacts.verify_artifact(uri, digest)


def test_materialize_rechecks_the_store_and_the_local_copy(moto, tmp_path):
    payload = os.urandom(100_000)
    digest = local_artifact(tmp_path / "a", {"w.bin": payload})
    uri = f"s3://{BUCKET}/unit/demo/mat"
    artifacts.publish(tmp_path / "a", uri)
    ref = artifacts.ArtifactRef(uri, digest)
    local = artifacts.materialize(ref, cache_root=tmp_path / "cache")
    assert (local / "w.bin").read_bytes() == payload
    (local / "w.bin").write_bytes(bytes(len(payload)))  # the local copy damaged: fetched again
    assert artifacts.materialize(ref, cache_root=tmp_path / "cache") == local
    assert (local / "w.bin").read_bytes() == payload

    new_digest = local_artifact(tmp_path / "b", {"w.bin": payload}, metrics={"m": 1})
    artifacts.publish(tmp_path / "b", uri)  # the store's artifact replaced: the old ref no longer holds
    with pytest.raises(ArtifactError, match="changed"):
        artifacts.materialize(ref, cache_root=tmp_path / "cache")
    assert artifacts.materialize(artifacts.ArtifactRef(uri, new_digest), cache_root=tmp_path / "cache") != local
    artifacts.filesystem(uri).rm_file(f"{uri}/{artifacts.MANIFEST}")
    with pytest.raises(ArtifactError, match="incomplete"):
        artifacts.materialize(ref, cache_root=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# a training stage's checkpoints in the store: a crashed stage resumes on another machine


def save_tiny_checkpoint(work: Path, step: int) -> Path:
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    optimizers = model.setup_optimizers()
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    return save_checkpoint(work, step, model, optimizers, {"model_config": model.config.to_dict()}, info,
                           {"step": step}, keep=2)


def checkpoint_line(path: Path, step: int) -> str:
    return "NANOCHAT_CHECKPOINT " + json.dumps({"path": str(path), "step": step, "stage": "base"})


def test_checkpoints_mirror_into_the_store_and_come_back_on_a_fresh_machine(moto, tmp_path):
    uri = f"s3://{BUCKET}/unit/base/mirror"
    work, said = tmp_path / "work", []
    mirror = remote_checkpoints.CheckpointMirror(uri, work, said.append)
    on_line = mirror.watching(said.append)
    for step in (5, 10, 15):
        on_line(checkpoint_line(save_tiny_checkpoint(work, step), step))
    mirror.close()  # finishes the newest upload
    stored = remote_checkpoints.remote_checkpoints(uri)
    assert stored[-1] == (15, "step_000015") and {n for _, n in stored} <= {"step_000010", "step_000015"}
    announced = [json.loads(line.split(" ", 1)[1]) for line in said if line.startswith("NANOCHAT_CHECKPOINT")]
    assert announced[-1] == {"path": f"{uri}/checkpoints/step_000015", "step": 15, "stage": "base"}
    assert all(a["path"].startswith(f"{uri}/checkpoints/") for a in announced)  # the store's URI, never staging

    fresh = remote_checkpoints.fetch_newest(uri, tmp_path / "machine2")
    assert fresh == tmp_path / "machine2" / "checkpoints" / "step_000015"
    local = work / "checkpoints" / "step_000015"
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in local.iterdir())
    assert all((fresh / p.name).read_bytes() == p.read_bytes() for p in local.iterdir())
    assert remote_checkpoints.fetch_newest(uri, work) is None  # nothing newer than the local ones

    remote_checkpoints.upload_checkpoint(work / "checkpoints" / "step_000010", uri)
    fs = artifacts.filesystem(uri)
    data = bytearray(fs.cat_file(f"{uri}/checkpoints/step_000015/model.pt"))
    data[-100] ^= 0x01  # same size, one bit: only the sha256 in COMPLETE can tell
    fs.pipe_file(f"{uri}/checkpoints/step_000015/model.pt", bytes(data))
    warnings = []
    older = remote_checkpoints.fetch_newest(uri, tmp_path / "machine3", warnings.append)
    assert older.name == "step_000010" and load_checkpoint(older, "cpu")[2]["step"] == 10
    assert len(warnings) == 1 and "step_000015" in warnings[0] and "model.pt" in warnings[0]
    assert not any(p.name.startswith("step_000015") for p in (tmp_path / "machine3" / "checkpoints").iterdir())

    set_moto_auth(moto["url"], on=True)  # an outage is not damage: no silent restart from scratch
    try:
        with pytest.raises(StoreError, match=uri):
            remote_checkpoints.fetch_newest(uri, tmp_path / "machine4")
    finally:
        set_moto_auth(moto["url"], on=False)

    fs.rm_file(f"{uri}/checkpoints/step_000015/{COMPLETE}")  # an upload cut off before its marker
    assert remote_checkpoints.remote_checkpoints(uri) == [(10, "step_000010")]


def test_mirror_failures_are_reported_and_the_stage_goes_on(moto, tmp_path):
    said = []
    mirror = remote_checkpoints.CheckpointMirror(f"s3://no-such-bucket-{os.getpid()}/base/x", tmp_path, said.append)
    mirror.push(save_tiny_checkpoint(tmp_path, 3))
    mirror.close()
    assert mirror.uploaded == [] and len(said) == 1
    assert said[0].startswith("warning: checkpoint step_000003 was not copied to the store s3://no-such-bucket")


@pytest.fixture(scope="module")
def resumed_on_s3(moto, shared_data, tmp_path_factory):
    """A base stage on an S3 store killed at its first checkpoint, then run again on a "second machine" (empty
    staging): (the killed run's plan, the finished artifact, the second run's output lines)."""
    tmp = tmp_path_factory.mktemp("resume")
    local_store = str(tmp / "local")
    shards = stages.run_stage("shards", stages.make_config("shards", {"source": str(shared_data)}), {}, local_store)
    tok = stages.run_stage("tokenizer", stages.make_config("tokenizer", MICRO["tokenizer"]), {"shards": shards},
                           local_store)
    inputs, store = {"shards": shards, "tokenizer": tok}, f"s3://{BUCKET}/resume"
    plan = stages.plan_stage("base", stages.make_config("base", MICRO["base"]), inputs, store)

    def kill_at_first_checkpoint(line: str) -> None:
        if line.startswith("checkpoint step_"):  # the mirror's note that the stage saved one
            for proc in psutil.Process().children():
                if "nanochat_core.train.base" in " ".join(proc.cmdline()):
                    os.killpg(proc.pid, signal.SIGKILL)  # torchrun leads its own process group

    with pytest.raises(StageFailed):
        stages.execute(plan, inputs, on_line=kill_at_first_checkpoint)
    killed = {"checkpoints": remote_checkpoints.remote_checkpoints(plan.uri),
              "manifest": artifacts.read_manifest_bytes(plan.uri)}
    with env_vars(NANOCHAT_STAGING=str(tmp / "machine2" / "staging")):  # another machine
        plan2 = stages.plan_stage("base", stages.make_config("base", MICRO["base"]), inputs, store)
        assert plan2.work_dir != plan.work_dir and not plan2.work_dir.exists()
        lines = []
        ref = stages.execute(plan2, inputs, on_line=lines.append)
    return {"plan": plan, "killed": killed, "ref": ref, "lines": lines, "tokenizer": tok, "store": store}


def test_base_stage_killed_resumes_on_a_fresh_machine_from_the_stores_checkpoint(resumed_on_s3):
    plan, ref, lines = resumed_on_s3["plan"], resumed_on_s3["ref"], resumed_on_s3["lines"]
    assert resumed_on_s3["killed"] == {"checkpoints": [(10, "step_000010")], "manifest": None}  # still incomplete
    assert any("resuming from checkpoint step_000010" in line for line in lines)
    metrics = json.loads(artifacts.read_artifact_file(ref.uri, "metrics.json"))
    assert metrics["resumed_from_step"] == 10 and metrics["steps"] == MICRO["base"]["num_iterations"]
    assert artifacts.verify_artifact(ref.uri, ref.digest, deep=True).digest == ref.digest
    announced = [json.loads(line.split(" ", 1)[1])["path"] for line in lines if line.startswith("NANOCHAT_CHECKPOINT")]
    assert announced[-1] == f"{plan.uri}/checkpoints/step_000030"


def test_models_in_an_s3_store_are_found_fetched_and_evaluated(resumed_on_s3, prefect_api, tmp_path):
    from flows.evaluate import evaluate

    ref, store = resumed_on_s3["ref"], resumed_on_s3["store"]
    models = stages.find_models(store)
    assert models == [f"{ref.uri}/checkpoints/step_000020", f"{ref.uri}/checkpoints/step_000030", ref.uri]
    assert all(stages.model_tokenizer(m) == resumed_on_s3["tokenizer"] for m in models)
    local = stages.local_model(models[0])
    assert local.name == "step_000020" and stages.local_model(models[0]) == local  # the checked copy is reused
    assert stages.model_ref(models[0], local).digest == artifacts.checkpoint_ref(local).digest
    assert not stages.model_exists(f"{ref.uri}/checkpoints/step_000010")  # pruned, as in staging

    result = evaluate(checkpoint=models[1], store=store, tasks="ARC-Easy", max_per_task=1, device_type="cpu")
    [entry] = result["evaluated"]
    assert entry["step"] == 30 and entry["result"].startswith(f"{store}/eval/") and "ARC-Easy" in entry["metrics"]
    gone = evaluate(checkpoint=f"{ref.uri}/checkpoints/step_000010", store=store, tasks="ARC-Easy", missing_ok=True)
    assert gone == {"evaluated": [], "already": []}


# ---------------------------------------------------------------------------------------------
# a store copied to another prefix: its records are relative, so it serves and resumes from its new place


def test_store_copied_to_another_prefix_is_found_whole_there_and_its_model_loads(moto, shared_data, tmp_path,
                                                                                monkeypatch):
    from flows.serve import model_dirs
    from nanochat_core.checkpoint import load_model
    from nanochat_core.tokenizer import Tokenizer

    a, b = f"s3://{BUCKET}/relocate-a", f"s3://{BUCKET}/relocate-b"
    configs = {"shards": stages.make_config("shards", {"source": str(shared_data)}),
               "tokenizer": stages.make_config("tokenizer", MICRO["tokenizer"]),
               # a few steps: what is checked here is where things are found, not training
               "base": stages.make_config("base", {**MICRO["base"], "num_iterations": 6, "eval_every": 6,
                                                   "save_every": 6})}
    t0 = time.time()
    at_a: dict[str, artifacts.ArtifactRef] = {}
    for stage, config in configs.items():
        at_a[stage] = stages.run_stage(stage, config, {f: at_a[f] for f in stages.STAGES[stage].inputs}, a)
    built_seconds = time.time() - t0

    fs = artifacts.filesystem(a)
    src_root, dst_root = fs._strip_protocol(a), fs._strip_protocol(b)
    objects = fs.find(a)
    for path in objects:
        fs.copy(path, dst_root + path[len(src_root):])
    fs.rm(a, recursive=True)  # nothing can quietly use the original
    assert fs.find(a) == [] and len(fs.find(b)) == len(objects)
    monkeypatch.setenv("NANOCHAT_STAGING", str(tmp_path / "staging"))  # another machine: no staged copies,
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path / "cache"))  # no downloads, no ETag memo

    def executed(*args, **kwargs):
        raise AssertionError(f"a stage was recomputed: {args[0].stage}")

    monkeypatch.setattr(stages, "execute", executed)
    at_b: dict[str, artifacts.ArtifactRef] = {}
    for stage, config in configs.items():
        inputs = {f: at_b[f] for f in stages.STAGES[stage].inputs}
        plan = stages.plan_stage(stage, config, inputs, b)
        key = at_a[stage].uri.rsplit("/", 1)[-1]
        assert plan.key == key and plan.uri == f"{b}/{stage}/{key}", stage
        at_b[stage] = stages.find_done(plan, deep=True)
        assert at_b[stage] == artifacts.ArtifactRef(f"{b}/{stage}/{key}", at_a[stage].digest), stage
        assert stages.run_stage(stage, config, inputs, b) == at_b[stage]  # nothing runs
        manifest = artifacts.read_manifest(at_b[stage].uri)
        assert manifest["inputs"] == {f: f"{f}/{at_b[f].uri.rsplit('/', 1)[-1]}" for f in inputs}, stage

    base_uri = at_b["base"].uri
    tok = stages.model_tokenizer(base_uri)
    assert tok == at_b["tokenizer"] and tok.uri.startswith(f"{b}/")
    model_dir = stages.local_model(base_uri)
    assert model_dir.is_relative_to(tmp_path / "cache")  # downloaded from B, checked against its manifest
    model, meta = load_model(model_dir, torch.device("cpu"))
    tok_dir = artifacts.materialize(tok)
    tokenizer = Tokenizer.load(tok_dir)
    ids = tokenizer.encode("The store moved.", prepend="<|bos|>")
    assert tokenizer.decode(ids[1:]) == "The store moved."
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert logits.shape[:2] == (1, len(ids)) and torch.isfinite(logits).all()
    # how `nanochat serve` / `chat` find a model's tokenizer: through the manifest's store-relative record
    assert model_dirs(at_b["base"]) == (model_dir, tok_dir)

    records = [p for p in fs.find(b) if p.rsplit("/", 1)[-1] in (artifacts.MANIFEST, artifacts.INPUTS)]
    assert len(records) >= len(configs)
    for path in records:
        text = fs.cat_file(path).decode()
        assert "relocate-a" not in text and str(moto["local"]) not in text, (path, text[:2000])
    print(f"built on {a} in {built_seconds:.1f}s; {len(objects)} objects moved to {b}, {len(records)} records")


# ---------------------------------------------------------------------------------------------
# the S3 endpoint stops during an upload


class FlakyEndpoint:
    """A TCP front for moto_server that goes down and comes back on the same port: an S3 outage (connections
    cut, new ones refused) while the data behind it survives. Stopping moto itself would lose the partial
    upload this test wants to look at: moto keeps its state in memory only. `stop_after_puts(n)` takes the
    endpoint down right after the n-th successful PUT response has reached the client."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.puts_left: int | None = None
        self.up = False
        self.start()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        with self.lock:
            self.socks, self.up = [listener], True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self.lock:
            socks, self.socks, self.puts_left, self.up = self.socks, [], None, False
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def stop_after_puts(self, n: int) -> None:
        with self.lock:
            self.puts_left = n

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.socks += [client, upstream]
            put_pending = threading.Event()  # this connection sent a PUT whose response has not come back
            threading.Thread(target=self._pump, args=(client, upstream, put_pending, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, put_pending, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, put_pending: threading.Event, responses: bool) -> None:
        # HTTP/1.1 without pipelining: each request and response head starts a fresh read on loopback
        while True:
            try:
                data = src.recv(1 << 16)
                if not data:
                    break
                if not responses and data.startswith(b"PUT "):
                    put_pending.set()
                dst.sendall(data)
            except OSError:
                break
            if responses and put_pending.is_set() and data.startswith(b"HTTP/1.1 200"):
                put_pending.clear()
                with self.lock:
                    if self.puts_left is not None:
                        self.puts_left -= 1
                    last = self.puts_left == 0
                if last:
                    self.stop()
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_endpoint_stopped_during_upload_then_restarted(moto, monkeypatch):
    endpoint = FlakyEndpoint(moto["port"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)  # the store is reached through the flaky endpoint
    store = f"s3://{BUCKET}/fault"
    config = stages.make_config("shards", {})
    plan = stages.plan_stage("shards", config, {}, store)
    try:
        endpoint.stop_after_puts(1)
        t0 = time.time()
        with pytest.raises(StoreError) as failed:
            stages.run_stage("shards", config, {}, store)
        failed_after = time.time() - t0
        assert not endpoint.up, "the endpoint never went down: no upload started?"
        message = str(failed.value)
        assert f"publishing {plan.work_dir} to {plan.uri} failed" in message and "stays incomplete" in message
        assert "run the stage again" in message

        endpoint.start()  # S3 is back, with whatever the upload left
        fs = artifacts.filesystem(store)
        landed = {name.rsplit("/", 1)[-1] for name in fs.find(plan.uri)}
        assert landed and artifacts.MANIFEST not in landed, landed  # part of the artifact, never its manifest
        assert len(landed) < len(json.loads((plan.work_dir / artifacts.MANIFEST).read_text())["files"])
        with pytest.raises(ArtifactError, match="incomplete"):
            artifacts.verify_artifact(plan.uri)
        assert stages.find_done(plan, deep=True) is None
        assert artifacts.find_artifact(store, "shards", plan.key) is None

        ref = stages.run_stage("shards", config, {}, store)  # the retry: recomputed and published whole
        assert ref.uri == plan.uri
        assert artifacts.verify_artifact(ref.uri, ref.digest, deep=True) == ref
        fresh = artifacts.default_cache_root() / "fresh"
        monkeypatch.setenv("NANOCHAT_STAGING", str(fresh / "staging"))  # another machine: must download
        local = artifacts.materialize(ref, cache_root=fresh / "cache")
        assert local.parent == fresh / "cache" and artifacts.verify_artifact(str(local), ref.digest, deep=True)
        print(f"publish failed {failed_after:.1f}s after the stage started; {len(landed)} objects had landed")
    finally:
        endpoint.stop()


# ---------------------------------------------------------------------------------------------
# the speedrun on S3, then a second run on a "second machine"


@pytest.mark.slow  # ~100 s: the whole tiny pipeline twice against moto (make test-slow)
def test_speedrun_on_s3_then_fresh_process_fully_cached(moto, prefect_api, tmp_path, monkeypatch):
    from prefect.filesystems import RemoteFileSystem

    from flows.speedrun import speedrun

    store = f"s3://{BUCKET}/speedrun"
    fs = artifacts.filesystem(store)
    downloaded = []  # (file hashes, whole artifacts) fetched from S3 by this process
    hash_remote, download = artifacts._sha256_remote, artifacts._download
    monkeypatch.setattr(artifacts, "_sha256_remote", lambda fs, path: downloaded.append(path) or hash_remote(fs, path))
    monkeypatch.setattr(artifacts, "_download", lambda uri, *a: downloaded.append(uri) or download(uri, *a))
    t0 = time.time()
    first = speedrun(preset="tiny", store=store, overrides=MICRO, serve=False)
    first_seconds = time.time() - t0
    # the machine that computed and uploaded the artifacts never downloads one: its deep checks use the ETags
    # recorded at upload, and each stage reads its inputs from the staging dirs they were computed in
    assert downloaded == []
    assert list(first["stages"]) == STAGES and not any(i["cached"] for i in first["stages"].values())
    for name, info in first["stages"].items():
        assert info["uri"].startswith(f"{store}/"), (name, info["uri"])
        assert artifacts.MANIFEST in {p.rsplit("/", 1)[-1] for p in fs.ls(info["uri"])}, name
        assert artifacts.verify_artifact(info["uri"], info["digest"], deep=True).digest == info["digest"]
    run_dir = f"{store}/runs/{first['run_id']}"
    assert json.loads(fs.cat_file(f"{run_dir}/summary.json"))["stages"] == first["stages"]
    assert fs.cat_file(f"{run_dir}/report.md").startswith(b"# nanochat training report")
    assert fs.cat_file(f"{run_dir}/base_loss.png")[:4] == b"\x89PNG"
    records = fs.find(f"{store}/.prefect-results")
    assert len(records) >= len(STAGES), records
    block = RemoteFileSystem.load(f"nanochat-results-{hashlib.sha256(store.encode()).hexdigest()[:12]}")
    assert block.basepath == f"{store}/.prefect-results" and "key" not in block.settings

    # a fresh process with empty local dirs (another machine): it can only find its records and artifacts in S3
    machine2 = {"PREFECT_API_URL": prefect_api, "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect"),
                "NANOCHAT_STAGING": str(tmp_path / "staging"), "NANOCHAT_CACHE": str(tmp_path / "cache")}
    t0 = time.time()
    result = cli("speedrun", "--preset", "tiny", "--store", store, "--no-serve", *set_flags(MICRO), env=machine2,
                 timeout=300)
    second_seconds = time.time() - t0
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = [p for p in fs.glob(f"{store}/runs/*/summary.json") if first["run_id"] not in p]
    assert len(summaries) == 1, summaries
    second = json.loads(fs.cat_file(summaries[0]))
    assert {n: i["cached"] for n, i in second["stages"].items()} == dict.fromkeys(STAGES, True)
    assert {n: i["digest"] for n, i in second["stages"].items()} == {n: i["digest"] for n, i in first["stages"].items()}
    assert not list((tmp_path / "staging").rglob("*")), "the second machine computed something"

    # and it can use what the first one trained: `nanochat chat` downloads the model and its tokenizer
    chat = cli("chat", "--checkpoint", second["stages"]["sft"]["uri"], "-p", "Hello", env=machine2)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]
    assert {p.parent.name for p in (tmp_path / "cache").glob("*/MANIFEST.json")} == {
        second["stages"][n]["digest"][:20] for n in ("sft", "tokenizer")}
    print(f"first run {first_seconds:.1f}s, second (fresh process, all Cached) {second_seconds:.1f}s")
