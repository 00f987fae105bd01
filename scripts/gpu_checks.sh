#!/usr/bin/env bash
# The checks that need a GPU, in one short run (a GPU machine is lent for minutes, not hours):
#   1. bench/inference.py on CUDA, float32 and bfloat16 (dense and svd-llm at 0.2/0.4/0.6);
#   2. SoCo's learn stage with DeepSpeed ZeRO-3 over NCCL against the same run on the CPU (gloo),
#      as configured by default and with the options the default leaves off (SOCO_OPTIONS,
#      default: those of configs/soco-levers.yaml that a tiny model takes, hidden-state
#      distillation, U trained from the sparsify stage, the hard stage's decaying step, the
#      longer Polyak average, U's anchor and U's Adam without its idle steps counted), with
#      ZeRO-3 and with ZeRO-2 (the stage the quality rows use on one GPU);
#   3. the decompose stage's SVDs on the GPU against the CPU.
# Each step has its own time limit, so that one that hangs costs only its own figures.
# Results and one log go to $OUT (default bench/results/gpu). Run from the repository root:
#     OUT=bench/results/gpu bash scripts/gpu_checks.sh [MODEL]
# MODEL (default bundled:smollm2-135m) is the inference bench's model. Without its weights
# (a GPU machine that cannot reach them), give a folder holding its config and tokenizer and set
# RANDOM_WEIGHTS=1: the bench then times random weights of the same shapes (bench/inference.py).
# SKIP="decompose ..." leaves steps out; T_INF, T_SOCO, T_SOCO_OPT, T_SOCO_OPT2, T_INF16, T_DEC set
# their time limits.
set -u
OUT=${OUT:-bench/results/gpu}
MODEL=${1:-bundled:smollm2-135m}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_checks.log"
WORK=${WORK:-/tmp/soco-gpu-checks}
extra=()
[ "${RANDOM_WEIGHTS:-0}" = 1 ] && extra=(--random-weights --calib-samples 8)

step() {  # name, time limit (s), command...
  local name=$1 limit=$2 start rc
  shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped (SKIP)" | tee -a "$LOG"; return;; esac
  start=$(date +%s)
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
}

{ nvidia-smi -L; "$PY" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"; } >>"$LOG" 2>&1
tail -n 2 "$LOG"
step inference-fp32 ${T_INF:-200} "$PY" bench/inference.py --model "$MODEL" "${extra[@]}" --device cuda --dtype float32 \
  --workdir "$WORK/inference" --results "$OUT/inference-gpu"
step soco-zero3-nccl ${T_SOCO:-200} "$PY" bench/cuda_vs_cpu.py --method soco --zero-stage 3 --out "$OUT"
opts=()
for o in ${SOCO_OPTIONS:-hidden_layers=2 hidden_weight=4 factor_lr=1e-4 factor_from=sparsify schedule.hard_lr_end=0.1 average_decay=0.97 factor_anchor=100 factor_counts_idle_steps=false}; do
  opts+=(--soco "$o")
done
step soco-options ${T_SOCO_OPT:-200} "$PY" bench/cuda_vs_cpu.py --method soco --zero-stage 3 --out "$OUT/zero3" "${opts[@]}"
step soco-options-zero2 ${T_SOCO_OPT2:-150} "$PY" bench/cuda_vs_cpu.py --method soco --zero-stage 2 --out "$OUT/zero2" "${opts[@]}"
step inference-bf16 ${T_INF16:-90} "$PY" bench/inference.py --model "$MODEL" "${extra[@]}" --device cuda --dtype bfloat16 \
  --workdir "$WORK/inference" --results "$OUT/inference-gpu-bf16"
step decompose ${T_DEC:-90} "$PY" bench/cuda_vs_cpu.py --method svd-llm --out "$OUT"
grep -E "^== |Error|error:" "$LOG" | tail -n 30
