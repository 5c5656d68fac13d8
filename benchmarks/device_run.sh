#!/usr/bin/env bash
# One-shot GPU run of benchmarks/iteration.py on the device machine (H200 or H100), in at most
# ~6 minutes of wall time: wheel install (~10 s) + the benchmark under a hard timeout (330 s).
#
# Needs the wheels in .whl/ (benchmarks/README.md says which and how to download them), carried
# with the call. From the repository root:
#
#     bash benchmarks/device_run.sh            # extra arguments go to iteration.py
#
# Writes to $OUT: iteration.json (also rewritten after every part, so a run cut short keeps what
# it measured), iteration.log (progress and the closing table), iteration.stdout.json (the JSON as
# printed) and nvidia-smi.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/consistent_char_bench}"
mkdir -p "$OUT"
TIMEOUT_S="${BENCH_TIMEOUT_S:-330}"  # hard limit of the benchmark process
BUDGET_S="${BENCH_BUDGET_S:-310}"    # optional parts (UNet variants, graphed/batch-4/compiled training, compile) that would end later are skipped

t0=$(date +%s)
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "device_run: wheel install failed" >&2; exit 3; }
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
echo "device_run: wheels installed in $(( $(date +%s) - t0 ))s" >&2
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
cat "$OUT/nvidia-smi.csv" >&2

# stderr (progress) to the console and the log; stdout (the JSON) to a file.
timeout -k 10 "$TIMEOUT_S" python3 benchmarks/iteration.py --reduced --compile \
    --time-budget-s "$BUDGET_S" --out "$OUT/iteration.json" "$@" \
    2>&1 >"$OUT/iteration.stdout.json" | tee "$OUT/iteration.log"
rc=${PIPESTATUS[0]}
echo "device_run: exit $rc after $(( $(date +%s) - t0 ))s (124 = hit the ${TIMEOUT_S}s timeout;" \
     "iteration.json holds every part finished before it)" >&2
exit "$rc"
