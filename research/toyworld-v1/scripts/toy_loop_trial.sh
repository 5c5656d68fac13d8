#!/usr/bin/env bash
# One trial of the loop on ToyWorld: extract from "a creature" (or $PROMPT) with the given --set
# overrides, then score the identity with the probe (5 scenes x 8 seeds). Prints one summary line.
#   [PROMPT="a creature wearing a hat"] scripts/toy_loop_trial.sh NAME SEED [key=value ...]
# Writes runs/trials/NAME/ (the run) and runs/trials/NAME.json (the evaluation).
set -euo pipefail
name=$1; seed=$2; shift 2
bin=${BIN:-.venv/bin}
out=runs/trials/$name
sets=(--set "seed=$seed")
for kv in "$@"; do sets+=(--set "$kv"); done
rm -rf "$out"
mkdir -p runs/trials
start=$(date +%s)
HF_HUB_OFFLINE=1 "$bin/consistent-char" extract "${PROMPT:-a creature}" --model toy --out "$out" "${sets[@]}" \
    > "$out.log" 2>&1
HF_HUB_OFFLINE=1 "$bin/consistent-char" eval run "$out" --seeds-per-scene 8 --out "$out.json" \
    >> "$out.log" 2>&1
"$bin/python" - "$name" "$out.json" "$(( $(date +%s) - start ))" "$@" <<'PY'
import json, sys
name, path, secs, *sets = sys.argv[1:]
r = json.load(open(path))
brief = {k: r[k] for k in ("iterations", "converged")}
for which in ("identity", "vanilla"):
    s = r[which]
    brief[which] = {k: s.get(k) for k in ("identity_consistency", "prompt_adherence", "attribute_agreement")}
print(json.dumps({"name": name, "sets": sets, "seconds": int(secs), **brief}))
PY
