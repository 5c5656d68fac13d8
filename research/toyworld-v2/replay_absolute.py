"""Replays the preset's stopping on finished runs with an absolute convergence threshold
(`convergence.d_conv`, the paper's form) in place of 0.45 of iteration 0's spread, from their
recorded history: `python research/toyworld-v2/replay_absolute.py RUN_DIR ...` (runs evaluated
with `consistent-char eval seeds`, which writes each run's evaluation.json).

The threshold is max(T, 0.45 × iteration 0's spread); patience 2, the saturation guard at 0.3
and the best iteration as in the preset. Per run it prints how the replayed loop ends (`conv`,
`stop` by patience or saturation, `past` when it would run beyond the recorded iterations) at
which iteration, the share of that iteration's images that draw iteration 0's chosen creature
and their validity (the probe's, read by `eval seeds`), so these are proxies for the
evaluation of the identity that drew them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from consistent_char.convergence import stalled

FLOORS = (None, 6.0, 6.5, 7.0, 7.5)


def replay(path: Path, floor: float | None) -> str:
    history = json.loads((path / "state.json").read_text())["history"]
    readings = json.loads((path / "evaluation.json").read_text())["per_iteration"]
    spreads = [r["spread"] for r in history]
    rise = [r["saturation"] / history[0]["saturation"] for r in history]
    threshold = 0.45 * spreads[0] if floor is None else max(floor, 0.45 * spreads[0])
    for i in range(1, len(history)):
        washed = rise[i] > 1.3
        if not washed and spreads[i] < threshold:
            how, best = "conv", i
            break
        if washed or stalled(spreads[1 : i + 1], 2):
            ok = [j for j in range(1, i + 1) if rise[j] <= 1.3]
            how, best = "stop", min(ok, key=lambda j: spreads[j])
            break
    else:
        how, best = "past", min(range(1, len(history)), key=lambda j: spreads[j])
    r = readings[best]
    return f"{how} {best} (share {r['identity_share']:.2f}, validity {r['validity']:.2f})"


def main(paths: list[str]) -> None:
    for path in map(Path, paths):
        cells = [f"{'0.45' if f is None else f}: {replay(path, f)}" for f in FLOORS]
        print(f"{path}\n  " + "\n  ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
