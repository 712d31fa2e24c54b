"""bench/decode.py: the server's decode step timed by batch size, and its argument checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "decode.py"), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_decode_bench_reports_each_batch_against_the_first():
    result = run_bench("--depth", "1", "--seq-len", "64", "--vocab", "512", "--batches", "1,4",
                       "--prompt-tokens", "8", "--steps", "4", "--warmup", "1", "--profile")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "aten::mm" in result.stdout  # the profiler table of the batch-1 step
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary["batches"]) == ["1", "4"]
    one, four = summary["batches"]["1"], summary["batches"]["4"]
    assert one["ratio"] == 1.0 and one["ms_per_step"] > 0
    assert four["ratio"] == round(four["tok_per_s"] / one["tok_per_s"], 2) > 0


def test_decode_bench_names_a_bad_argument():
    result = run_bench("--batches", "1,x")
    assert result.returncode == 2 and "--batches must be comma-separated integers" in result.stderr
    result = run_bench("--seq-len", "32", "--prompt-tokens", "30")
    assert result.returncode == 2 and "must fit in --seq-len" in result.stderr
    result = run_bench("--graphs")
    assert result.returncode == 2 and "--graphs needs a CUDA device" in result.stderr
