"""Peak-FLOPs lookup and MFU, the optional W&B logger when it is off, the loader's background tokenizer
thread going away with its loader, and a bench/train.py smoke run."""

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_core.common import DistInfo
from nanochat_core.dataloader import PretrainLoader
from nanochat_core.device import GPU_PEAK_BF16_FLOPS, gpu_peak_flops, mfu_percent, peak_flops
from nanochat_core.tokenizer import Tokenizer
from nanochat_core.wandb_log import WandbLog

REPO = Path(__file__).resolve().parents[1]
TABLE = dict(GPU_PEAK_BF16_FLOPS)


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA GH200 480GB", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
])
def test_gpu_names_find_their_own_entry(name, key):
    assert gpu_peak_flops(name) == TABLE[key]


def test_unknown_devices_have_no_peak_and_no_mfu():
    assert gpu_peak_flops("NVIDIA Tesla T4") is None  # no bf16 tensor cores: not in the table
    assert peak_flops("cpu") is None and peak_flops(torch.device("meta")) is None
    assert mfu_percent(1e9, 1000, 1.0, None) is None


def test_mfu_is_achieved_over_peak_flops_of_all_devices():
    assert TABLE["H100"] == 989e12  # the figure upstream hard-coded for every device
    flops_per_token, tokens, seconds = 6e9, 500_000, 2.0
    one = mfu_percent(flops_per_token, tokens, seconds, TABLE["H100"])
    assert one == pytest.approx(100 * 6e9 * 500_000 / 2.0 / 989e12)
    assert mfu_percent(flops_per_token, tokens, seconds, TABLE["H100"], world_size=8) == pytest.approx(one / 8)


MASTER = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
WORKER = DistInfo(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))


@pytest.mark.parametrize("mode", [None, "disabled", "DISABLED", ""])
def test_wandb_off_logs_nothing(monkeypatch, capsys, mode):
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    with WandbLog.start("nanochat-test", {"depth": 2}, MASTER) as log:
        assert not log.enabled
        log.log(1, loss=1.0)
    assert capsys.readouterr().err == ""


def test_wandb_only_on_rank_0_and_unknown_modes_warn(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not WandbLog.start("nanochat-test", {}, WORKER).enabled
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("WANDB_MODE", "onlin")
    assert not WandbLog.start("nanochat-test", {}, MASTER).enabled
    assert "WANDB_MODE='onlin'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_asked_for_but_missing_warns_once_and_goes_on(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = WandbLog.start("nanochat-test", {}, MASTER)
    assert not log.enabled
    log.log(3, loss=2.0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb is not installed" in err


def test_loader_prefetch_thread_stops_with_its_loader(shared_data, tiny_tokenizer_dir):
    loader = PretrainLoader(shared_data / "pretrain", Tokenizer.load(tiny_tokenizer_dir), 2, 32, "val")
    first = next(loader)
    thread = loader._prefetcher.thread
    assert thread.is_alive()  # reading ahead, or blocked on the full queue
    state = loader.state_dict()
    assert state["cursor"] == 0 and state["offset"] == 2 * 32 + 1  # the batch handed out, not the read-ahead
    del loader
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert first[0].shape == (2, 32)


def test_bench_train_smoke_on_real_shards(shared_data, tiny_tokenizer_dir):
    cmd = [sys.executable, str(REPO / "bench" / "train.py"), "--depth", "1", "--seq-len", "32", "--batch", "2",
           "--steps", "2", "--warmup", "1", "--device", "cpu", "--compare", "threads", "--threads", "2",
           "--shards", str(shared_data / "pretrain"), "--tokenizer", str(tiny_tokenizer_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary["runs"]) == ["1 thread", "2 threads"] and summary["speedup"] > 0
    for run in summary["runs"].values():
        assert run["tok_per_s"] > 0 and run["mfu"] is None and run["comm_ms"] == 0
        assert sum(run[f"{k}_share"] for k in ("data", "fwd_bwd", "optim", "comm")) == pytest.approx(1, abs=1e-3)


def test_bench_train_under_torchrun_measures_communication():
    """2 gloo ranks: the sharded optimizers' blocked time on collectives is measured, not estimated."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "bench" / "train.py"), "--depth", "1", "--seq-len", "32", "--batch", "2", "--vocab", "512",
           "--steps", "2", "--warmup", "1", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    run = summary["runs"]["eager"]
    assert summary["world_size"] == 2 and run["comm_ms"] > 0 and run["comm_share"] > 0
    assert sum(run[f"{k}_share"] for k in ("data", "fwd_bwd", "optim", "comm")) == pytest.approx(1, abs=1e-3)
