#!/usr/bin/env bash
# The checks that need a GPU, in one go, for a CUDA machine (bf16 autocast, torch.compile, MFU, the real
# training stage and the chat server on CUDA). Each step is time-limited and logged to OUT/<step>.log; a
# failing step does not stop the others. Run from the repository root:
#
#   NANOCHAT_DATA=../shared/data bash bench/gpu.sh OUT [STEP ...]
#
# On a lent GPU machine with its own PyTorch (no internet), carry what it lacks: the pretraining shards (copy
# ../shared/data/pretrain into an ignored folder and point NANOCHAT_DATA at it) and wheels for Python 3.12 of
# fastapi, starlette, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions,
# opentelemetry-api, uvicorn, httptools, and this project's own (maturin build --release, abi3: rustbpe),
# installed with `pip install --no-deps --target /tmp/site` and PYTHONPATH=$PWD:/tmp/site.
#
# Steps (default: all, in this order): serve train12 train12c train20 stage. train12 compares eager with
# torch.compile at batch 16 (eager at batch 32 does not fit in 80 GB: its fp32 logits alone are 16 GiB a copy).
#
# Issue 14 (fp8 matmuls, the 2026 recipe): `bash bench/gpu.sh "$OUT" issue14` = fp8mm train12nov train12r26
# train12r26fp8 summary, about 9 minutes on one H100/H200 (BUDGET_S=120 s of wall clock per training run, so
# that the whole group fits one device call's 10-minute limit; each part has its own timeout). Results: one JSON
# object a line in OUT/issue14.jsonl, logs in OUT/<step>.log. For longer budgets run the steps over several calls
# then the summary step on the fetched logs (no GPU needed: copy them into DIR; bash bench/gpu.sh DIR summary).
#   fp8mm          Float8Linear vs bf16 nn.Linear (fp32 master weights under bf16 autocast, as in training) on
#                  the d12 MLP (65536 tokens x 768 -> 3072 -> 768), fwd+bwd, eager and compiled; error vs fp32
#   train12nov     d12, November recipe (today's defaults, bf16), BUDGET_S seconds    (flags: NOV_FLAGS)
#   train12r26     d12, 2026 recipe (the d12-2026 preset's base config), bf16, the same budget (flags: R26_FLAGS)
#   train12r26fp8  d12, 2026 recipe, fp8 matmuls, the same budget                               (flags: R26_FLAGS)
#   summary        per run: val bpb reached (and at which step), median tok/s and MFU (bf16-equivalent), steps
# A run stops at its budget by SIGTERM, which training treats as preemption (checkpoint, exit 143): its last val
# bpb is the last one of every EVAL_EVERY steps. The budget includes torch.compile's warm-up, as a real run's does.
# What the GPU machine needs, prepared here once and carried (about 10 MiB; .gpu must be git-ignored):
#   mkdir -p .gpu && cp -r ../shared/data/pretrain .gpu/ && echo /.gpu/ >> .git/info/exclude
#   .venv/bin/python -m nanochat_core.tok_train --shards .gpu/pretrain --out .gpu/tok --vocab-size 32768
#   run(command='NANOCHAT_DATA=.gpu bash bench/gpu.sh "$OUT" issue14', carry=[".gpu"], timeout_s=590)
# (TOKENIZER defaults to $NANOCHAT_DATA/tok; the stand-in shards are ~6M tokens, so d12 at 524K tokens a step
# sees them several times over: compare the runs with each other, not with published d12 numbers.)
set -u
OUT=${1:?usage: bash bench/gpu.sh OUT [STEP ...]}
shift
STEPS=${*:-serve train12 train12c train20 stage}
STEPS=${STEPS//issue14/fp8mm train12nov train12r26 train12r26fp8 summary}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NANOCHAT_DATA=${NANOCHAT_DATA:-../shared/data}
export PY=${PY:-python3} WORK=$(mktemp -d)
export TOKENIZER=${TOKENIZER:-$NANOCHAT_DATA/tok} BUDGET_S=${BUDGET_S:-120} EVAL_EVERY=${EVAL_EVERY:-15}
export NOV_FLAGS=${NOV_FLAGS:-} R26_FLAGS=${R26_FLAGS:---config $WORK/d12-2026.json}
export OUT RESULTS=$OUT/issue14.jsonl

run_step() {  # run_step NAME LIMIT_S CMD...: run, log, print the exit code, the time and the log's tail
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name: $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "--- $name: rc=$rc in $(($(date +%s) - start)) s"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}

stage_on_cuda() {  # tokenizer, then a short real base-training stage on CUDA (bf16, compiled), then the chat CLI
    $PY -m nanochat_core.tok_train --shards "$NANOCHAT_DATA/pretrain" --out "$WORK/tok" \
        --vocab-size 8192 --max-chars 20000000 || return
    torchrun --standalone --nproc_per_node=1 -m nanochat_core.train.base --shards "$NANOCHAT_DATA/pretrain" \
        --tokenizer "$WORK/tok" --out "$WORK/base" --depth 8 --max-seq-len 1024 --device-batch-size 32 \
        --total-batch-size 65536 --num-iterations 60 --eval-every 30 --eval-tokens 262144 --save-every 20 \
        --device-type cuda || return
    $PY -m nanochat_core.serve.chat_cli --model "$WORK/base" --tokenizer "$WORK/tok" -p "The capital of France is" \
        -m 32 --seed 0 --device-type cuda
}

train_d12() {  # train_d12 FLAGS...: d12 base training for BUDGET_S s of wall clock, then SIGTERM (= preemption)
    local rc
    timeout -k 60 "$BUDGET_S" $PY -m nanochat_core.train.base --shards "$NANOCHAT_DATA/pretrain" \
        --tokenizer "$TOKENIZER" --out "$(mktemp -d -p "$WORK")" --depth 12 --max-seq-len 2048 \
        --device-batch-size 32 --eval-every "$EVAL_EVERY" --eval-tokens 1048576 --device-type cuda "$@"
    rc=$?
    echo "TRAIN_EXIT $rc"  # 143 or 124: stopped at the budget, as planned; 0: finished early; else: failed
}

preset_config() {  # preset_config PRESET FILE: the preset's base-stage values as a BaseTrainConfig JSON file
    $PY -c 'import json, sys; from nanochat_core.pipeline.presets import preset_values
print(json.dumps(preset_values(sys.argv[1])["base"]))' "$1" >"$2"
}

fp8_microbench() {  # Float8Linear vs bf16 nn.Linear on the d12 MLP; one JSON line per variant into RESULTS
    # (FP8MM_DEVICE=cpu FP8MM_TOKENS=256 FP8MM_COMPILE=0 runs it on a CPU: a smoke test of this code, no timing)
    $PY - "$RESULTS" <<'PY'
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_core.device import describe_device, resolve_precision
from nanochat_core.fp8 import count_fp8, enable_fp8

DEVICE = torch.device(os.environ.get("FP8MM_DEVICE", "cuda"))
TOKENS = int(os.environ.get("FP8MM_TOKENS", 32 * 2048))  # d12 at device batch 32, sequence 2048
COMPILE = os.environ.get("FP8MM_COMPILE", "1") == "1"
WIDTH = 768


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
        self.c_proj = nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


def fwd_bwd(model, x, grad):
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = model(x)
    y.backward(grad)
    return y


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, iters=20):
    for _ in range(3):  # warm-up: compilation, cuBLAS handles, the allocator
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(results_path):
    torch.manual_seed(0)
    rows = [{"kind": "device", "device": describe_device(DEVICE), "torch": torch.__version__,
             "precision_for_fp8": resolve_precision("fp8", DEVICE, allow_cpu_fp8=DEVICE.type == "cpu")}]
    base = MLP().to(DEVICE)
    x = torch.randn(TOKENS, WIDTH, device=DEVICE, requires_grad=True)
    grad = torch.randn(TOKENS, WIDTH, device=DEVICE)
    ref_y = base(x)  # fp32 reference of the same step, for the error of each variant
    ref_y.backward(grad)
    ref = (ref_y.detach(), x.grad.clone(), base.c_fc.weight.grad.clone())
    flops = 2 * 6 * TOKENS * WIDTH * 4 * WIDTH  # two matmuls, fwd + bwd = 6 FLOPs per weight and token
    timings = {}
    for impl in ("bf16", "fp8"):
        model = MLP().to(DEVICE)
        model.load_state_dict(base.state_dict())
        if impl == "fp8":
            assert enable_fp8(model) == 2 and count_fp8(model) == 2
        for compiled in (False, True) if COMPILE else (False,):
            fn = torch.compile(model) if compiled else model
            x.grad = None
            model.zero_grad(set_to_none=True)
            y = fwd_bwd(fn, x, grad)
            errors = {"out": rel_err(y, ref[0]), "grad_x": rel_err(x.grad, ref[1]),
                      "grad_w_fc": rel_err(model.c_fc.weight.grad, ref[2])}
            ms = median_ms(lambda fn=fn: fwd_bwd(fn, x, grad))
            timings[impl, compiled] = ms
            rows.append({"kind": "fp8mm", "impl": impl, "compiled": compiled, "shape": [TOKENS, WIDTH, 4 * WIDTH],
                         "ms_fwd_bwd": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                         "rel_err": {k: round(v, 5) for k, v in errors.items()}})
    for compiled in sorted({c for _, c in timings}):
        rows.append({"kind": "fp8mm_speedup", "compiled": compiled,
                     "bf16_over_fp8": round(timings["bf16", compiled] / timings["fp8", compiled], 3)})
    with open(results_path, "a") as f:
        for row in rows:
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
PY
}

summarize_runs() {  # one JSON line per training run from its log into RESULTS, then the ratios between runs
    $PY - "$RESULTS" "$OUT" <<'PY'
import json
import re
import statistics
import sys
from pathlib import Path

PROGRESS = "NANOCHAT_PROGRESS "
VAL = re.compile(r"step (\d+)/\d+: val bpb ([0-9.]+)")
RUNS = {"train12nov": "d12 November bf16", "train12r26": "d12 2026 bf16", "train12r26fp8": "d12 2026 fp8"}
SKIP = 5  # the first steps compile and warm up: left out of the medians


def summarize(name, log):
    progress, val, exit_code = [], [], None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(PROGRESS):
            progress.append(json.loads(line[len(PROGRESS):]))
        elif (m := VAL.search(line)):
            val.append([int(m[1]), float(m[2])])
        elif line.startswith("TRAIN_EXIT "):
            exit_code = int(line.split()[1])
    steady = progress[SKIP:] or progress
    mfu = [p["mfu"] for p in steady if "mfu" in p]
    return {"kind": "train", "run": RUNS[name], "exit": exit_code, "steps": progress[-1]["step"] if progress else 0,
            "val_bpb": val[-1][1] if val else None, "val_bpb_step": val[-1][0] if val else None, "val_curve": val,
            "tok_per_s": round(statistics.median(p["tok_per_s"] for p in steady)) if steady else None,
            "mfu_bf16_equiv": round(statistics.median(mfu), 2) if mfu else None,
            "train_seconds": round(sum(p["dt"] for p in progress), 1)}


def main(results_path, out):
    rows = {name: summarize(name, Path(out) / f"{name}.log") for name in RUNS if (Path(out) / f"{name}.log").exists()}
    lines = list(rows.values())
    a, b = rows.get("train12r26", {}), rows.get("train12r26fp8", {})
    if a.get("tok_per_s") and b.get("tok_per_s"):
        lines.append({"kind": "ratio", "what": "fp8 over bf16 tok/s, d12 2026",
                      "value": round(b["tok_per_s"] / a["tok_per_s"], 3)})
    with open(results_path, "a") as f:
        for row in lines:
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
PY
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
for step in $STEPS; do
    case $step in
        serve) run_step serve 240 $PY bench/serve.py --device cuda --depth 12 --clients 1,4,8,16 --requests 3 \
                   --max-tokens 128 --repeats 3 ;;
        train12) run_step train12 180 $PY bench/train.py --depth 12 --seq-len 2048 --batch 16 --steps 10 \
                     --device cuda --compare compile ;;
        train12c) run_step train12c 180 $PY bench/train.py --depth 12 --seq-len 2048 --batch 32 --steps 10 \
                      --device cuda --compile ;;
        train20) run_step train20 180 $PY bench/train.py --depth 20 --seq-len 2048 --batch 32 --steps 10 \
                     --device cuda --compile ;;
        stage) export -f stage_on_cuda; run_step stage 240 bash -c stage_on_cuda ;;
        fp8mm) export -f fp8_microbench; run_step fp8mm 150 bash -c fp8_microbench ;;
        train12nov) export -f train_d12; run_step train12nov $((BUDGET_S + 90)) bash -c 'train_d12 $NOV_FLAGS' ;;
        train12r26 | train12r26fp8)
            [ -s "$WORK/d12-2026.json" ] || preset_config d12-2026 "$WORK/d12-2026.json"
            precision=bf16; [ "$step" = train12r26fp8 ] && precision=fp8
            export -f train_d12
            run_step "$step" $((BUDGET_S + 90)) bash -c "train_d12 \$R26_FLAGS --precision $precision" ;;
        summary) export -f summarize_runs; run_step summary 60 bash -c summarize_runs ;;
        *) echo "unknown step $step" ;;
    esac
done
rm -rf "$WORK"
