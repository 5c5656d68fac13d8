"""Replays finished runs' stopping with other convergence thresholds (`d_conv_relative`) and,
optionally, the anchor guard (`convergence.max_anchor_ratio`), from their recorded history, and
reads with the probe how good the iteration each would return is:
`python research/toyworld-v2/replay_threshold.py [--anchor RATIO] RUN_DIR ...`.

The loop is deterministic up to the iteration where it stops, so a replayed stop that comes no
later than the run's own last iteration is exact; one that would come later is reported as
"past". Per iteration the probe gives the pair consistency of the loop's images (pairs whose
five identity attributes agree), their validity, and the share of them that draw iteration 0's
chosen creature (the modal identity of the images the first refinement trained on); the
evaluation's own figures come from the identity's fresh images, so these are proxies.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from consistent_char.convergence import stalled
from consistent_char.eval.drift import iteration_readings
from consistent_char.eval.run import load_probe
from consistent_char.toy.evaluate import validity
from consistent_char.toy.world import IDENTITY_ATTRIBUTES

THRESHOLDS = (0.45, 0.5, 0.55, 0.6)


def replay(
    spreads: list[float], anchors: list[float | None], threshold: float, ratio: float | None
) -> tuple[int, int | None] | None:
    """(stop, returned iteration) under the preset's rule (threshold, patience 2, the best
    admitted iteration), or None if it would run past the recorded iterations."""

    def admitted(i: int) -> bool:
        return ratio is None or (anchors[i] is not None and anchors[i] <= ratio)

    for i in range(1, len(spreads)):
        done = admitted(i) and spreads[i] < threshold * spreads[0]
        if done or stalled(spreads[1 : i + 1], 2):
            ok = [j for j in range(1, i + 1) if admitted(j)]
            return i, (min(ok, key=lambda j: spreads[j]) if ok else None)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--anchor", type=float, default=None)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    probe = load_probe()
    totals: dict[float, list[float]] = {t: [] for t in THRESHOLDS}
    for path in args.runs:
        history = json.loads(Path(path, "state.json").read_text())["history"]
        spreads = [h["spread"] for h in history]
        cohesion0 = history[0]["chosen_cohesion"]
        anchors = [
            None if h.get("anchor_distance") is None else h["anchor_distance"] / cohesion0
            for h in history
        ]
        cons, valid, share = [], [], []
        reference = None
        for reading in iteration_readings(path, probe):
            ids = [tuple(r[a] for a in IDENTITY_ATTRIBUTES) for r in reading.records]
            if reference is None:
                members = reading.members or list(range(len(ids)))
                reference = Counter(ids[j] for j in members).most_common(1)[0][0]
            counts = Counter(ids)
            n = len(ids)
            cons.append(sum(k * (k - 1) for k in counts.values()) / (n * (n - 1)))
            valid.append(validity(probe, reading.images))
            share.append(counts[reference] / n)
        n_read = min(len(cons), len(spreads))
        cells = []
        for t in THRESHOLDS:
            result = replay(spreads[:n_read], anchors[:n_read], t, args.anchor)
            if result is None:
                cells.append(f"{t}: past")
                continue
            stop, best = result
            if best is None:
                cells.append(f"{t}: {stop}->none")
                continue
            totals[t].append(cons[best])
            cells.append(f"{t}: {stop}->{best} c{cons[best]:.2f} v{valid[best]:.2f}")
        print(f"{path} (chosen {'-'.join(v[:4] for v in reference or ())})")
        print(
            "  spread/anchor/cons/valid/share: "
            + ", ".join(
                f"{spreads[i] / spreads[0]:.2f}/"
                + ("-" if anchors[i] is None else f"{anchors[i]:.1f}")
                + f"/{cons[i]:.2f}/{valid[i]:.2f}/{share[i]:.2f}"
                for i in range(n_read)
            )
        )
        print("  " + " | ".join(cells))
    for t, values in totals.items():
        if values:
            print(
                f"threshold {t}: {len(values)} runs, mean pair consistency "
                f"{sum(values) / len(values):.3f}, min {min(values):.3f}"
            )


if __name__ == "__main__":
    main()
