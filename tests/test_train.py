"""Training stages end to end on tiny models: base under torchrun (1 and 2 ranks), exact resume after SIGKILL
and after SIGTERM (also when the launcher itself was SIGKILLed), a diverging run stopping with nothing saved,
mid and SFT, plus the schedule/batch math and bits per byte."""

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

import psutil
import pytest
import torch

from nanochat_core.checkpoint import (
    CheckpointError,
    checkpoint_meta,
    complete_checkpoints,
    latest_checkpoint,
    load_model,
)
from nanochat_core.config import ConfigError
from nanochat_core.errors import UserError
from nanochat_core.gpt import GPT, config_for_depth
from nanochat_core.loss_eval import evaluate_bpb, unigram_bpb
from nanochat_core.progress import emit_checkpoint, emit_progress, parse_structured_line, print0
from nanochat_core.stage_cli import PREEMPTED_EXIT_CODE
from nanochat_core.train import base, mid, sft
from nanochat_core.train.common import (
    grad_accum_steps,
    lr_multiplier,
    mid_lr_multiplier,
    muon_momentum,
    sft_lr_multiplier,
)

TINY_BASE = {"depth": 2, "max_seq_len": 64, "device_batch_size": 4, "total_batch_size": 512,
             "num_iterations": 30, "eval_every": 15, "eval_tokens": 1024, "save_every": 5, "device_type": "cpu"}


def flags(values: dict) -> list[str]:
    """CLI flags for config values (strings as they are, everything else as JSON)."""
    out = []
    for k, v in values.items():
        out += [f"--{k.replace('_', '-')}", v if isinstance(v, str) else json.dumps(v)]
    return out


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def base_command(shards, tokenizer, out, nproc: int | None = 1, **overrides) -> list[str]:
    args = ["--shards", str(shards), "--tokenizer", str(tokenizer), "--out", str(out),
            *flags({**TINY_BASE, **overrides})]
    if nproc is None:  # plain python, world size 1
        return [sys.executable, "-m", "nanochat_core.train.base", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "nanochat_core.train.base", *args]


def run_ok(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def interrupt_after_first_checkpoint(cmd: list[str], sig: int) -> tuple[int, str]:
    """Start cmd in its own process group, send `sig` to the group once a checkpoint is announced."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("NANOCHAT_CHECKPOINT"):
                os.killpg(proc.pid, sig)
                break
        lines += proc.stdout.readlines()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, "".join(lines)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def shards_dir(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    for i, name in enumerate(["shard_00000.parquet", "shard_00001.parquet", "shard_00011.parquet"]):
        (out / f"shard_{i:05d}.parquet").symlink_to(shared_data / "pretrain" / name)
    return out


@pytest.fixture(scope="module")
def base_ref(shards_dir, tiny_tokenizer_dir, tmp_path_factory):
    """An uninterrupted base run under torchrun (1 process): the reference for the resume tests."""
    out = tmp_path_factory.mktemp("base_ref")
    run_ok(base_command(shards_dir, tiny_tokenizer_dir, out))
    return out


# ---------------------------------------------------------------------------------------------
# math

def test_schedules():
    assert [lr_multiplier(i, 10, warmup_ratio=0.2) for i in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_multiplier(8, 10) == 1.0 and lr_multiplier(9, 10) == 0.5 and lr_multiplier(10, 10) == 0.0
    assert lr_multiplier(10, 10, final_lr_frac=0.1) == pytest.approx(0.1)
    assert mid_lr_multiplier(7, 10) == 1.0 and mid_lr_multiplier(9, 10) == pytest.approx(0.5)
    assert [sft_lr_multiplier(i, 4) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert muon_momentum(0) == 0.85 and muon_momentum(150) == pytest.approx(0.90) and muon_momentum(900) == 0.95


def test_grad_accum_is_exact_or_a_clear_error():
    assert grad_accum_steps(524288, 32, 2048, 8) == 1
    assert grad_accum_steps(524288, 32, 2048, 1) == 8
    with pytest.raises(ConfigError, match=r"4 \* 64 \* 3 = 768"):
        grad_accum_steps(1024, 4, 64, 3)
    with pytest.raises(ConfigError, match="num_iterations"):
        base.BaseTrainConfig(num_iterations=-1, target_param_data_ratio=0).validate()
    with pytest.raises(ConfigError, match="device_type"):
        mid.MidTrainConfig(device_type="tpu").validate()
    with pytest.raises(ConfigError, match="examples_per_step=10"):
        sft.SFTConfig(device_batch_size=4, examples_per_step=10).grad_accum(1)


def test_bits_per_byte_of_a_uniform_model_and_unigram():
    """A fresh GPT has a zero lm_head: uniform logits, so its bpb is ln(V) per scored token / ln 2 / bytes,
    and so is an add-one unigram model that has seen no training tokens."""
    V = 64
    torch.manual_seed(0)
    model = GPT(config_for_depth(1, V, 8))
    model.init_weights()
    token_bytes = torch.randint(0, 4, (V,), dtype=torch.int32)
    x = torch.randint(0, V, (2, 3, 8))
    y = torch.randint(-1, V, (2, 3, 8))  # includes ignored targets
    nb = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
    expected = (nb > 0).sum().item() * math.log(V) / (math.log(2) * nb.sum().item())
    assert evaluate_bpb(model, list(zip(x, y, strict=True)), 2, token_bytes) == pytest.approx(expected, rel=1e-5)
    assert unigram_bpb(torch.zeros(V), y, token_bytes) == pytest.approx(expected, rel=1e-9)
    counts = torch.zeros(V)
    counts[y[y >= 0]] += 1000  # a unigram that has seen these tokens does better
    assert unigram_bpb(counts, y, token_bytes) < expected


# ---------------------------------------------------------------------------------------------
# base training

def test_base_under_torchrun_learns_and_writes_its_files(base_ref):
    metrics = json.loads((base_ref / "metrics.json").read_text())
    assert set(metrics) == {"val_bpb", "unigram_bpb", "steps", "tokens", "params", "train_seconds", "tok_per_s",
                            "resumed_from_step", "precision"}
    assert metrics["precision"] == "fp32"
    assert metrics["steps"] == 30 and metrics["tokens"] == 30 * 512 and metrics["resumed_from_step"] == 0
    assert metrics["val_bpb"] < metrics["unigram_bpb"]  # the model learned more than token frequencies
    model, meta = load_model(base_ref, "cpu")
    assert model.num_params() == metrics["params"] and meta["model_config"]["n_layer"] == 2
    steps = sorted(p.name for p in (base_ref / "checkpoints").iterdir())
    assert steps == ["step_000025", "step_000030"]  # keep_checkpoints=2


def test_sigkill_then_sigterm_then_rerun_ends_bitwise_equal(base_ref, shards_dir, tiny_tokenizer_dir, tmp_path):
    """Run 1 (torchrun) is SIGKILLed after its first checkpoint; run 2 (plain python) resumes and gets SIGTERM
    after its first checkpoint: it saves and exits 143; run 3 finishes. The weights equal base_ref's."""
    cmd = base_command(shards_dir, tiny_tokenizer_dir, tmp_path)
    code, out = interrupt_after_first_checkpoint(cmd, signal.SIGKILL)
    killed_at = latest_checkpoint(tmp_path)
    assert code != 0 and killed_at is not None and not (tmp_path / "metrics.json").exists(), out[-2000:]

    code, out = interrupt_after_first_checkpoint(base_command(shards_dir, tiny_tokenizer_dir, tmp_path, nproc=None),
                                                 signal.SIGTERM)
    assert code == PREEMPTED_EXIT_CODE, out[-2000:]
    assert f"resuming from {killed_at}" in out
    stopped = latest_checkpoint(tmp_path)
    assert stopped != killed_at and f"preempted at step {int(stopped.name.split('_')[1])}" in out
    assert "Traceback" not in out and not (tmp_path / "metrics.json").exists()

    run_ok(cmd)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == int(stopped.name.split("_")[1]) and metrics["steps"] == 30
    assert same_weights(tmp_path, base_ref)


def test_a_damaged_checkpoint_is_refused_and_an_older_one_resumed(base_ref, shards_dir, tiny_tokenizer_dir,
                                                                  tmp_path):
    """A byte flipped in the newest checkpoint's weights: the resume names the damaged file, passes over it
    for the one before, retrains from there and still ends bitwise equal to the uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(base_ref, run)
    for name in ("metrics.json", "model.pt", "meta.json"):  # as if the run had died after its last checkpoint
        (run / name).unlink()
    weights = run / "checkpoints" / "step_000030" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(weights.parent, "cpu")
    result = subprocess.run(base_command(shards_dir, tiny_tokenizer_dir, run), capture_output=True, text=True,
                            env=env(), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{weights} is damaged" in result.stderr
    assert "resuming from" in result.stdout and "step_000025" in result.stdout
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 25
    assert same_weights(run, base_ref)


def test_two_ranks_under_torchrun_write_every_shard(shards_dir, tiny_tokenizer_dir, tmp_path):
    run_ok(base_command(shards_dir, tiny_tokenizer_dir, tmp_path, nproc=2, num_iterations=4, save_every=2,
                        eval_every=-1))
    ckpt = latest_checkpoint(tmp_path)
    files = {p.name for p in ckpt.iterdir()}
    assert {"optim_rank0.pt", "optim_rank1.pt", "loader_rank1.json", "state_rank1.pt", "COMPLETE"} <= files
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_two_ranks_sigterm_then_resume_is_bitwise(shards_dir, tiny_tokenizer_dir, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    overrides = {"num_iterations": 12, "save_every": 4, "eval_every": 6}
    run_ok(base_command(shards_dir, tiny_tokenizer_dir, ref, nproc=2, **overrides))
    cmd = base_command(shards_dir, tiny_tokenizer_dir, out, nproc=2, **overrides)
    code, log = interrupt_after_first_checkpoint(cmd, signal.SIGTERM)
    assert code != 0 and latest_checkpoint(out) is not None, log[-2000:]
    run_ok(cmd)
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] > 0
    assert same_weights(out, ref)


# ---------------------------------------------------------------------------------------------
# the launcher killed outright (issue 13)

ORCHESTRATOR = """
import json, sys
from nanochat_core.pipeline.launch import run_streaming, torchrun_command
run_streaming(torchrun_command("nanochat_core.train.base", json.loads(sys.argv[1]), 1),
              on_line=lambda line: print(line, flush=True))
"""


def closed_pipe() -> TextIO:
    """A text stream whose reader is gone, like a trainer's stdout once its launcher was SIGKILLed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return os.fdopen(write_end, "w")


def wait_exited(procs: list[psutil.Process], timeout: float) -> None:
    """Wait for processes that are not our children (not ours to reap): gone or a zombie counts as exited."""
    def running(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + timeout
    while any(running(p) for p in procs):
        assert time.time() < deadline, f"still running after {timeout}s: {[p.cmdline() for p in procs if running(p)]}"
        time.sleep(0.1)


def test_reporting_into_a_pipe_without_a_reader_never_raises_and_then_goes_to_devnull(monkeypatch):
    with closed_pipe() as stdout, closed_pipe() as stderr:
        with pytest.raises(BrokenPipeError):
            os.write(stdout.fileno(), b"x")  # the pipe really is broken
        monkeypatch.setattr(sys, "stdout", stdout)
        emit_progress(1, 2, loss=3.0)
        emit_checkpoint("/tmp/step_000001", 1, "base")
        print0("a line")
        print0("a warning", file=stderr)
        monkeypatch.undo()
        for stream in (stdout, stderr):  # what comes next (and the flush at exit) goes nowhere, without error
            assert os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))


def test_launcher_sigkilled_during_base_the_trainer_saves_at_its_next_step_and_the_rerun_resumes_there(
        shards_dir, tiny_tokenizer_dir, tmp_path):
    """The process running the stage (launch.run_streaming -> torchrun, the trainer's stdout piped to it, as in the
    flow) is SIGKILLed two steps after the periodic checkpoint of step 5. The kernel SIGTERMs torchrun
    (PR_SET_PDEATHSIG), which passes it on; the trainer, whose stdout now has no reader, saves at its next step
    boundary, and the rerun resumes from that step, not from step 5."""
    overrides = {"num_iterations": 15, "save_every": 5, "eval_every": -1}
    args = base_command(shards_dir, tiny_tokenizer_dir, tmp_path, nproc=None, **overrides)[3:]
    launcher = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, json.dumps(args)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env())
    periodic, seen, lines, stage = [], 0, [], []
    try:
        for line in launcher.stdout:
            lines.append(line)
            kind, payload = parse_structured_line(line.rstrip("\n")) or (None, {})
            if kind == "checkpoint":
                periodic.append(payload["step"])
            elif kind == "progress" and periodic and payload["step"] >= periodic[-1] + 2:
                seen = payload["step"]
                break
        assert periodic == [5] and seen >= 7, "".join(lines[-30:])
        stage = psutil.Process(launcher.pid).children(recursive=True)  # torchrun and its worker
        launcher.kill()
        wait_exited([p for p in stage if "torch.distributed.run" not in p.cmdline()], timeout=60)  # the trainer
        saved = checkpoint_meta(latest_checkpoint(tmp_path))["step"]
        assert saved >= seen and saved % 5 != 0, f"saved at {saved}, seen {seen}"  # its own save, after step 5
        assert not (tmp_path / "model.pt").exists() and not (tmp_path / "metrics.json").exists()

        config = base.BaseTrainConfig(**{**TINY_BASE, **overrides})
        metrics = base.train(config, shards_dir, tiny_tokenizer_dir, tmp_path)
        assert metrics["resumed_from_step"] == saved and metrics["steps"] == 15
        wait_exited(stage, timeout=60)  # torchrun too: nothing is left behind
    finally:
        for p in [psutil.Process(launcher.pid), *stage] if launcher.poll() is None else stage:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        launcher.wait()


# ---------------------------------------------------------------------------------------------
# divergence: learning rates of 1e30 are finite (so valid), but with weight decay 0.1 each update multiplies the
# AdamW weights by 1 - 1e29: they overflow in the second update and the loss is NaN from step 3.

HUGE_LR = {"embedding_lr": 1e30, "unembedding_lr": 1e30, "matrix_lr": 1e30, "weight_decay": 0.1}


def assert_nothing_saved_from(out: Path, step: int) -> list[Path]:
    """No final model, no metrics, and only checkpoints from before `step` (where training diverged), all finite;
    returns those checkpoints."""
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    checkpoints = complete_checkpoints(out)
    for ckpt in checkpoints:
        model, meta = load_model(ckpt, "cpu")
        assert meta["step"] < step and all(p.isfinite().all() for p in model.parameters()), ckpt
    return checkpoints


def test_a_diverging_base_run_exits_2_naming_the_step_and_saves_nothing(shards_dir, tiny_tokenizer_dir, tmp_path,
                                                                       capsys):
    """With a checkpoint due at step 2, the weights are caught before it is written; without, the loss at step 3."""
    for save_every, found in ((2, r"the weights \(.+\) became non-finite .* at step 2;"),
                              (-1, r"the training loss became non-finite \(nan\) at step 3;")):
        out = tmp_path / f"save_every_{save_every}"
        argv = ["--shards", str(shards_dir), "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out),
                *flags({**TINY_BASE, **HUGE_LR, "num_iterations": 6, "eval_every": -1, "save_every": save_every})]
        with pytest.raises(SystemExit) as exc:
            base.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, err[-2000:]
        assert re.search(r"error: training diverged: " + found + " .*Lower the learning rates", err), err[-2000:]
        assert assert_nothing_saved_from(out, step=2) == []


def test_diverging_mid_and_sft_stop_with_a_user_error_and_save_nothing(base_ref, mid_out, tiny_tokenizer_dir,
                                                                       tmp_path):
    for train, config, upstream, step in ((mid.train, MID, base_ref, 3), (sft.train, SFT, mid_out, 2)):
        out = tmp_path / config.__class__.__name__
        with pytest.raises(UserError, match=rf"training diverged: .* at step {step};"):
            train(dataclasses.replace(config, **HUGE_LR), upstream, tiny_tokenizer_dir, out)
        assert assert_nothing_saved_from(out, step) == []


def test_bad_input_exits_2_with_a_one_line_error(shards_dir, tiny_tokenizer_dir, tmp_path, capsys):
    cases = [
        (["--shards", str(tmp_path / "missing")], "does not exist"),
        (["--shards", str(shards_dir), "--total-batch-size", "1000"], "total_batch_size=1000"),
        (["--shards", str(shards_dir), "--depth", "zero"], "BaseTrainConfig.depth"),
    ]
    for extra, message in cases:
        argv = ["--tokenizer", str(tiny_tokenizer_dir), "--out", str(tmp_path / "out"), *extra,
                "--device-type", "cpu", "--max-seq-len", "64", "--device-batch-size", "4", "--num-iterations", "2"]
        with pytest.raises(SystemExit) as exc:
            base.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# mid and SFT (in-process: the plain-Python entry points)

MID = mid.MidTrainConfig(num_iterations=6, max_seq_len=64, device_batch_size=4, total_batch_size=512,
                         eval_every=3, eval_steps=2, save_every=3, max_examples=120, device_type="cpu")
SFT = sft.SFTConfig(num_iterations=4, max_seq_len=64, device_batch_size=4, examples_per_step=8,
                    eval_every=2, eval_steps=2, save_every=2, max_examples=60, device_type="cpu")


def rewind_to_first_checkpoint(src: Path, dst: Path) -> None:
    """dst = src as it was after its first checkpoint: later checkpoints and the final files removed."""
    shutil.copytree(src, dst)
    for later in sorted((dst / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    for name in ("model.pt", "meta.json", "metrics.json"):
        (dst / name).unlink()


@pytest.fixture(scope="module")
def mid_out(base_ref, tiny_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mid")
    mid.train(MID, base_ref, tiny_tokenizer_dir, out)
    return out


def test_mid_finishes_and_writes_its_files(mid_out):
    metrics = json.loads((mid_out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and math.isfinite(metrics["val_loss"])
    assert sorted(p.name for p in (mid_out / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    _, meta = load_model(mid_out, "cpu")
    assert meta["stage"] == "mid" and meta["loop_state"]["val_bpb"] == metrics["val_bpb"]


def test_mid_resumes_bitwise(base_ref, mid_out, tiny_tokenizer_dir, tmp_path):
    rewind_to_first_checkpoint(mid_out, tmp_path / "mid")
    assert mid.train(MID, base_ref, tiny_tokenizer_dir, tmp_path / "mid")["resumed_from_step"] == 3
    assert same_weights(tmp_path / "mid", mid_out)


def test_sft_finishes_and_resumes_bitwise(mid_out, tiny_tokenizer_dir, tmp_path):
    out, again = tmp_path / "sft", tmp_path / "again"
    metrics = sft.train(SFT, mid_out, tiny_tokenizer_dir, out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == 4 and metrics["examples"] == 32 and math.isfinite(metrics["val_loss"])
    assert not same_weights(out, mid_out)
    assert load_model(out, "cpu")[1]["stage"] == "sft"
    rewind_to_first_checkpoint(out, again)
    assert sft.train(SFT, mid_out, tiny_tokenizer_dir, again)["resumed_from_step"] == 2
    assert same_weights(again, out)


def test_sft_with_only_masked_targets_does_not_nan(mid_out, tiny_tokenizer_dir, tmp_path):
    """max_seq_len 4 keeps only BOS + the user's first tokens: every target is masked. Upstream divided
    0 by 0 here; we take no step instead of poisoning the weights with NaN."""
    config = sft.SFTConfig(num_iterations=2, max_seq_len=4, device_batch_size=2, examples_per_step=2,
                           eval_steps=1, max_examples=10, device_type="cpu")
    metrics = sft.train(config, mid_out, tiny_tokenizer_dir, tmp_path)
    assert metrics["val_loss"] == float("inf")  # nothing to score
    assert json.loads((tmp_path / "metrics.json").read_text())["val_loss"] is None
    assert same_weights(tmp_path, mid_out)
