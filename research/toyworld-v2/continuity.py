"""Which cluster would a later iteration learn from if it chose by nearness to iteration 0's
chosen core (continuity) instead of by the densest core? From saved runs, no generation:
`python research/toyworld-v2/continuity.py RUN_DIR ...`.

For every clustered iteration i >= 1 it prints, for the cluster the run chose (the densest core)
and for the eligible cluster whose core's centroid lies nearest the centroid of iteration 0's
chosen core: the core's most frequent creature (read by the probe), how many of the core draw
it, and whether it is iteration 0's chosen creature.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import yaml

from consistent_char.clusterers.selection import densest_core
from consistent_char.eval.drift import iteration_readings
from consistent_char.eval.run import load_probe
from consistent_char.rundir import RunDirectory
from consistent_char.toy.world import IDENTITY_ATTRIBUTES


def creature(record: dict[str, str]) -> tuple[str, ...]:
    return tuple(record[a] for a in IDENTITY_ATTRIBUTES)


def main(paths: list[str]) -> None:
    probe = load_probe()
    same = {"densest": 0, "nearest": 0}
    total = 0
    for path in paths:
        run = RunDirectory(path)
        cfg = yaml.safe_load((run.root / "config.yaml").read_text())
        m, d_min = int(cfg["core_size"]), int(cfg["d_min_c"])
        readings = list(iteration_readings(path, probe))
        x0 = run.load_embeddings(0).astype(np.float64)
        core0 = json.loads((run.iter_dir(0) / "clusters.json").read_text())["core"]
        anchor = x0[core0].mean(axis=0)
        target = Counter(creature(readings[0].records[j]) for j in core0).most_common(1)[0][0]
        print(f"{path}: iteration 0's creature {'/'.join(target)}")
        for reading in readings[1:]:
            i = reading.iteration
            path_c = run.iter_dir(i) / "clusters.json"
            if not path_c.exists():
                continue
            saved = json.loads(path_c.read_text())
            labels = np.asarray(saved["labels"])
            x = run.load_embeddings(i).astype(np.float64)
            cores = {}
            for c in range(labels.max() + 1):
                members = np.flatnonzero(labels == c)
                if len(members) >= max(d_min, m):
                    cores[c] = densest_core(x, members, m)
            nearest = min(cores, key=lambda c: np.linalg.norm(x[cores[c][1]].mean(0) - anchor))
            total += 1
            cells = []
            for name, c in (("densest", saved["chosen"]), ("nearest", nearest)):
                ids = Counter(creature(reading.records[j]) for j in cores[c][1])
                top, n = ids.most_common(1)[0]
                same[name] += top == target
                cells.append(f"{name} {'/'.join(top)} {n}/{m}{' =' if top == target else ''}")
            print(f"  {i}: " + " | ".join(cells))
    print(f"cores drawing iteration 0's creature: {same} of {total} clustered iterations")


if __name__ == "__main__":
    main(sys.argv[1:])
