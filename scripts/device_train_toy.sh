#!/usr/bin/env bash
# One GPU run of ToyWorld's training on the device machine, continuing from the shipped weights
# (--init-from), with the exported weights brought back as 15 MB tar parts (the device returns at
# most 8 files of at most 16 MiB each).
#
# Needs the wheels in .whl/ (benchmarks/README.md says which), carried with the call. From the
# repository root:
#
#     TOY_TIME_BUDGET=330 bash scripts/device_train_toy.sh
#
# Writes to $OUT: train.log and toy-weights.tar.part-aa, -ab, ... Unpack here with
#     cat toy-weights.tar.part-* | tar -x -C src/consistent_char/toy/weights
# TOY_DEVICE=cpu TOY_SCALE=0.01 TOY_TIME_BUDGET=30 checks this script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/consistent_char_toy}"
BUDGET="${TOY_TIME_BUDGET:-330}"
SHARES="${TOY_TIME_SHARES:-vae=0.2,unet=0.5,dino=0.06,probe=0.05}"
DEVICE="${TOY_DEVICE:-cuda}"
SCALE="${TOY_SCALE:-1}"
WORK="${TOY_WORK:-/tmp/toy_train}"
mkdir -p "$OUT"

t0=$(date +%s)
if [ "$DEVICE" = cuda ] && [ -d .whl ] && ! [ -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "device_train_toy: wheel install failed" >&2; exit 3; }
fi
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
PY="${PYTHON:-python3}"
rm -rf "$WORK"
# Stages stop at their share of the budget; rendering, export and evaluation come on top
# (about a minute on an H200), hence the hard limit's margin.
timeout -k 10 $(( ${BUDGET%.*} + 180 )) "$PY" -m recipes.toyworld.train --out "$WORK" \
    --device "$DEVICE" --scale "$SCALE" --init-from src/consistent_char/toy/weights \
    --time-budget "$BUDGET" --time-shares "$SHARES" 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
if [ -f "$WORK/metrics.json" ]; then
  tar -C "$WORK" -cf - pipeline dinov2 probe metrics.json | split -b 15M - "$OUT/toy-weights.tar.part-"
fi
echo "device_train_toy: exit $rc after $(( $(date +%s) - t0 ))s" >&2
exit "$rc"
