"""Replays a finished run's stopping decisions with the spread measured within each prompt
variation (`convergence.per_variation`), from its saved embeddings, and reads with the probe how
consistent the iteration it would return is: `python research/toyworld-v2/replay.py THRESHOLD
RUN_DIR ...`. The trajectory is the run's own, so a replay that would stop later than the run
did is reported as such, not guessed."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np

from consistent_char.convergence import mean_pairwise_distance
from consistent_char.eval.drift import iteration_readings
from consistent_char.eval.run import load_probe
from consistent_char.rundir import RunDirectory
from consistent_char.toy.world import IDENTITY_ATTRIBUTES


def main(threshold: float, paths: list[str], patience: int = 2) -> None:
    probe = load_probe()
    for path in paths:
        run = RunDirectory(path)
        state = json.loads((run.root / "state.json").read_text())
        history = state["history"]
        within, raw, consistency = [], [], []
        for i, reading in enumerate(iteration_readings(path, probe)):
            x = run.load_embeddings(i)
            groups = np.arange(len(x)) % 5
            within.append(np.mean([mean_pairwise_distance(x[groups == g]) for g in range(5)]))
            raw.append(history[i]["spread"])
            ids = Counter(tuple(r[a] for a in IDENTITY_ATTRIBUTES) for r in reading.records)
            n = len(reading.records)
            consistency.append(sum(k * (k - 1) for k in ids.values()) / (n * (n - 1)))
        stop = None
        for i in range(1, len(within)):
            later = within[1 : i + 1]
            stalled = len(later) > patience and min(later[-patience:]) >= min(later[:-patience])
            if within[i] < threshold * within[0] or stalled:
                stop = i
                break
        ran = len(within) - 1
        actual = min(range(1, ran + 1), key=lambda i: raw[i])
        if stop is None:
            verdict = f"would run past iteration {ran}"
        else:
            best = min(range(1, stop + 1), key=lambda i: within[i])
            verdict = f"stops at {stop}, returns {best} (pair consistency {consistency[best]:.2f})"
        print(
            f"{path}: run returned {actual} (pair consistency {consistency[actual]:.2f}); "
            f"per variation {verdict}; within/first "
            + ", ".join(f"{w / within[0]:.2f}" for w in within)
        )


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2:])
