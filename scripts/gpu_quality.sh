#!/usr/bin/env bash
# Rows of the quality bench (bench/quality.py) on a GPU machine: decompose and SoCo's learn
# stage run on the GPU (DeepSpeed ZeRO over NCCL), calibrate and evaluate on its CPUs. Each row is one
# quality.py invocation, with its own time limit, so that a slow one costs only its own row;
# they start from this checkout's bench/results/quality.json (its dense and baseline figures)
# and write theirs to $OUT/quality.{json,md} as each finishes. Run from the repository root:
#     OUT=/tmp/out T_ROW=300 bash scripts/gpu_quality.sh "--set soco.zero_stage=2 --set soco.seed=1" ...
# Each argument is the options of one row beyond `--methods soco --ratios 0.4` (give --ratios
# inside it to change that). The bundled model must be importable (scripts/gpu_bundle.sh).
# Give every row `--set soco.zero_stage=2`: ZeRO-3 on one GPU gathers each of the 210 scored
# matrices at every forward and backward, and its learn stage did not finish in 230 s where
# ZeRO-2's took 84 s (README, "Checked on a GPU").
# PARALLEL=1 runs the rows side by side (the GPU machine has 16 cores and one GPU that a 135M
# model leaves mostly idle), each with THREADS torch threads (default 3) and a log of its
# own ($OUT/row-N.log); the rows then compute their own calibration. Rows side by side need
# run folders of their own: two rows of one name (the same --label, or the same overrides at
# another ratio) need a --workdir each, or the second finds the folder busy.
set -u
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_quality.log"
cp bench/results/quality.json "$OUT/quality.json"
{ nvidia-smi -L; "$PY" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"; } >>"$LOG" 2>&1
row() {  # options, log
  local start rc
  start=$(date +%s)
  echo "== $1" | tee -a "$2"
  # shellcheck disable=SC2086  # a row is a list of options
  timeout "${T_ROW:-200}" "$PY" bench/quality.py --methods soco --ratios 0.4 --no-ray --launcher local --progress \
    --workdir /tmp/soco-quality --results "$OUT/quality" $1 >>"$2" 2>&1
  rc=$?
  echo "== exit $rc after $(( $(date +%s) - start )) s: $1" | tee -a "$LOG"
  grep -E "r=0\.[0-9]: ppl" "$2" | tail -n 1
}
n=0
for r in "$@"; do
  n=$((n + 1))
  if [ "${PARALLEL:-0}" = 1 ]; then
    OMP_NUM_THREADS=${THREADS:-3} row "$r --set run.threads=${THREADS:-3}" "$OUT/row-$n.log" &
  else
    row "$r" "$LOG"
  fi
done
wait
