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
set -u
OUT=${1:?usage: bash bench/gpu.sh OUT [STEP ...]}
shift
STEPS=${*:-serve train12 train12c train20 stage}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NANOCHAT_DATA=${NANOCHAT_DATA:-../shared/data}
export PY=${PY:-python3} WORK=$(mktemp -d)

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
        *) echo "unknown step $step" ;;
    esac
done
rm -rf "$WORK"
