"""Issue 13, "bad values caught late": everything a speedrun can be checked for is checked before its first stage
(nanochat_core.pipeline.preflight), each mistake named in one line; and `--port 0` serves on a free port that the
run reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_serve_flow import commit_chat_model

from nanochat_core.config import ConfigError
from nanochat_core.gpt import GPT, config_for_depth
from nanochat_core.pipeline import artifacts, preflight
from nanochat_core.pipeline.launch import Nodes
from nanochat_core.pipeline.presets import stage_configs

REPO = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))


def check(tmp_path: Path, overrides: dict | None = None, nproc: int = 1, serve=("127.0.0.1", 0), preset="tiny",
          rl: bool = False) -> Path:
    """The speedrun's preflight for these arguments, into a store under tmp_path (returned)."""
    store = tmp_path / "store"
    configs = stage_configs(preset, overrides or {}, os.environ["NANOCHAT_DATA"], rl=rl)
    preflight.check_speedrun(configs, str(store), nproc, Nodes(), [], rl, serve=serve)
    return store


@pytest.mark.parametrize("overrides, nproc, serve, message", [
    ({}, 1, ("127.0.0.1", 70000), "--port 70000 is not a TCP port"),
    ({}, 1, ("127.0.0.1", -1), "--port -1 is not a TCP port"),
    ({}, 1, ("203.0.113.7", 8000), "cannot serve on --host 203.0.113.7 --port 8000: Cannot assign requested address"),
    ({}, 1, ("no-such-host.invalid", 8000), "--host 'no-such-host.invalid' does not resolve"),
    ({"sft": {"examples_per_step": 10}}, 1, None, "SFTConfig.examples_per_step=10 must be a multiple of "
                                                  "device_batch_size * world_size = 8 * 1"),
    ({"base": {"total_batch_size": 4000}}, 1, None, "base: total_batch_size=4000 must be a positive multiple"),
    ({"mid": {"identity_conversations": "/nonexistent/me.jsonl"}}, 1, None,
     "mid.identity_conversations: '/nonexistent/me.jsonl' does not exist"),
    ({"base": {"depth": 100000}}, 1, None, "base.depth=100000 does not fit"),
    ({}, CORES + 1, None, f"--nproc {CORES + 1} is more than this machine has: {CORES} CPU cores"),
    ({}, 0, None, "nproc must be an integer >= 1, got 0"),
])
def test_bad_values_are_refused_before_anything_runs(tmp_path, overrides, nproc, serve, message):
    with pytest.raises(ConfigError) as e:
        check(tmp_path, overrides, nproc, serve)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "store").exists(), "the preflight created the store before refusing the run"


def test_cross_stage_rules_use_the_world_size(tmp_path):
    """tiny's base takes one 16 x 256 micro-batch per 4096-token step: two ranks need total_batch_size 8192. sft's 16
    examples per step divide over 8 x 2 ranks but not 8 x 3 (3 nodes of 1); rl's 2 not over 4 ranks."""
    configs = stage_configs("tiny", {}, os.environ["NANOCHAT_DATA"], rl=True)
    with pytest.raises(ConfigError, match=r"base: .* = 16 \* 256 \* 2 = 8192 \(world_size = nproc 2 x nnodes 1\)"):
        preflight.check_batch_division(configs, nproc=2, nnodes=1)
    preflight.check_batch_division({"sft": configs["sft"]}, nproc=2, nnodes=1)
    with pytest.raises(ConfigError, match=r"sft: .* = 8 \* 3 \(world_size = nproc 1 x nnodes 3\)"):
        preflight.check_batch_division({"sft": configs["sft"]}, nproc=1, nnodes=3)
    with pytest.raises(ConfigError, match="rl: RLConfig.examples_per_step=2 must be a multiple of the world size 4"):
        preflight.check_batch_division({"rl": configs["rl"]}, nproc=4, nnodes=1)


def test_a_good_run_passes_and_names_what_it_would_use(tmp_path):
    doubled = {"base": {"total_batch_size": 4096 * CORES}, "mid": {"total_batch_size": 4096 * CORES},
               "sft": {"examples_per_step": 8 * CORES}, "rl": {"examples_per_step": 2 * CORES}}
    store = check(tmp_path, doubled, nproc=CORES, serve=("127.0.0.1", 0), rl=True)
    assert store.is_dir()  # the store check (last) ran: it makes the store
    assert not [p for p in store.iterdir() if p.name != ".prefect-results"], "a stage directory was created"
    # the 8xH100 tier's model fits the RAM of a 24 GiB machine (weights + optimizer ~9 GiB) and is checked on cpu
    check(tmp_path, {s: {"device_type": "cpu"} for s in ("base", "mid", "sft", "rl", "eval")}, preset="d20",
          serve=None)


def test_a_port_in_use_passes(tmp_path):
    """An earlier run's own server may hold the port (the serve step reuses or replaces it), so in use is not an
    error here; a host that is not this machine's is."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        preflight.check_serve_address("127.0.0.1", s.getsockname()[1])
    preflight.check_serve_address("localhost", 0)


@pytest.mark.parametrize("depth, vocab", [(1, 512), (2, 4096), (3, 1000)])
def test_parameter_count_matches_the_real_model(depth, vocab):
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, vocab, 64))
    matrices, embeddings = preflight.model_params(depth, vocab)
    assert matrices + embeddings == model.num_params()
    assert embeddings == model.transformer.wte.weight.numel() + model.lm_head.weight.numel()


def test_the_cli_refuses_too_many_processes_in_seconds(tmp_path):
    """The run that used to run out of memory with ~49 workers left behind: one line, exit 2, nothing started."""
    store = tmp_path / "store"
    marker = f"NANOCHAT_TEST_PREFLIGHT_{os.getpid()}"
    args = [sys.executable, "-m", "flows.cli", "speedrun", "--store", str(store), "--nproc", "100"]
    start = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, marker: "1"})
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"nanochat: error: --nproc 100 is more than this machine has: {CORES} CPU "
                                          f"cores this process may use (stages on cpu: base, eval, mid, sft); use "
                                          f"--nproc {CORES} or fewer"]
    assert seconds < 30, f"took {seconds:.0f}s"
    assert not store.exists()


# ---------------------------------------------------------------------------------------------
# --port 0


@pytest.fixture
def chat_model(tiny_tokenizer_dir, tmp_path) -> artifacts.ArtifactRef:
    return commit_chat_model(tiny_tokenizer_dir, tmp_path)


def test_the_bound_port_is_read_from_the_server_log(tmp_path):
    """What start_detached reads for --port 0: the "serving at <url>" line nanochat_core.serve.server logs once it
    listens (the slow test below starts a real server), from where this start's lines begin."""
    from flows.serve import bound_url_from_log

    log = tmp_path / "server-0.log"
    log.write_text("2026-01-01 10:00:00 nanochat.server: serving at http://127.0.0.1:40001/\n")
    offset = log.stat().st_size
    assert bound_url_from_log(log, offset) is None  # an earlier start's line does not count
    with open(log, "a") as f:
        f.write("2026-01-01 11:00:00 nanochat.server: loaded /m: 1 replica(s) on cpu\n"
                "2026-01-01 11:00:01 nanochat.server: serving at http://[::1]:40002/ (listening on ::1)\n")
    assert bound_url_from_log(log, offset) == "http://[::1]:40002"


@pytest.mark.slow  # ~9 s: a real server process (the default test above reads the line it logs)
def test_port_zero_serves_on_a_free_port_that_is_reported_and_reused(chat_model, tmp_path):
    from flows.serve import health, start_detached

    info = start_detached(chat_model, "127.0.0.1", 0, tmp_path / "runs")
    try:
        assert info["port"] > 0 and info["url"] == f"http://127.0.0.1:{info['port']}" and not info["reused"]
        assert health(info["url"])["status"] == "ok"
        recorded = json.loads((tmp_path / "runs" / "server-0.json").read_text())
        assert recorded == {"pid": info["pid"], "model": chat_model.digest, "url": info["url"]}
        again = start_detached(chat_model, "127.0.0.1", 0, tmp_path / "runs")
        assert again == {**info, "reused": True}
    finally:
        os.killpg(info["pid"], signal.SIGTERM)
