"""Which scenes the refinement's training images come from, and what spanning the scenes would
change, from runs' saved images and embeddings (no generation):
`python research/toyworld-v2/span.py RUN_DIR ...`.

Image j of an iteration draws prompt variation (scene) j mod 5. Per iteration, for the cluster
the loop chose and for alternatives computed here:

- `core`: the preset's training set, the chosen cluster's densest 5 (`densest_core`);
- `span`: in the chosen cluster, the member at the centre of that core, then its nearest member
  of each other scene, then the next nearest of each scene in turn (a core spanning the scenes);
- `centred`: the embeddings centred per scene (each scene's mean removed), clustered again
  with the loop's k and seed, and the densest 5 of the cluster chosen on them;
- `centred-span`: the same clustering, with the spanning core.

Each cell: the selection's distinct scenes, the images of its most frequent creature (read by
the probe) / its size, and whether that creature is iteration 0's chosen one (`=`) or not (`!`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import yaml

from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
from consistent_char.clusterers.selection import choose_cluster, densest_core
from consistent_char.eval.drift import iteration_readings
from consistent_char.eval.run import load_probe
from consistent_char.extractor import stage_seed
from consistent_char.rundir import RunDirectory
from consistent_char.toy.world import IDENTITY_ATTRIBUTES

SCENES = 5
CORE = 5


def spanning_core(
    x: np.ndarray, members: np.ndarray, groups: np.ndarray, centre: int
) -> np.ndarray:
    """`centre`, then members by (rank within their group by distance to the centre, distance)."""
    d = np.linalg.norm(x[members] - x[centre], axis=1)
    order = np.argsort(d, kind="stable")
    seen: Counter[int] = Counter()
    rank = np.empty(len(members), dtype=np.int64)
    for i in order:
        rank[i] = seen[int(groups[members[i]])]
        seen[int(groups[members[i]])] += 1
    keys = np.lexsort((d, rank))
    return members[keys[:CORE]]


def centre_of(x: np.ndarray, members: np.ndarray) -> int:
    _, core = densest_core(x, members, CORE)
    d = np.linalg.norm(x[core][:, None] - x[core][None], axis=-1)
    return int(core[np.argmin(d.sum(axis=1))])


def main(paths: list[str]) -> None:
    probe = load_probe()
    totals: dict[str, list[tuple[int, float, bool]]] = {}
    for path in paths:
        run = RunDirectory(path)
        seed = int(yaml.safe_load((run.root / "config.yaml").read_text())["seed"])
        d_min = int(yaml.safe_load((run.root / "config.yaml").read_text())["d_min_c"])
        history = json.loads((run.root / "state.json").read_text())["history"]
        reference = None
        lines = []
        for reading in iteration_readings(path, probe):
            i = reading.iteration
            if i >= len(history) or history[i].get("chosen_cluster") is None:
                break
            x = run.load_embeddings(i).astype(np.float64)
            ids = [tuple(r[a] for a in IDENTITY_ATTRIBUTES) for r in reading.records]
            groups = np.arange(len(x)) % SCENES
            k = len(history[i]["cluster_cohesions"])
            members = np.asarray(reading.members)
            _, core = densest_core(x, members, CORE)
            if reference is None:
                reference = Counter(ids[j] for j in core).most_common(1)[0][0]
            sel = {"core": core, "span": spanning_core(x, members, groups, centre_of(x, members))}
            xc = x.copy()
            for g in range(SCENES):
                xc[groups == g] -= xc[groups == g].mean(axis=0)
            labels, centroids = FaissKMeansClusterer().cluster(
                xc.astype(np.float32), k, stage_seed(seed, i, "cluster")
            )
            choice = choose_cluster(xc, labels, centroids, d_min, CORE)
            cm = np.flatnonzero(labels == choice.index)
            sel["centred"] = np.asarray(choice.core)
            sel["centred-span"] = spanning_core(xc, cm, groups, centre_of(xc, cm))
            cells = []
            for name, s in sel.items():
                top, n = Counter(ids[j] for j in s).most_common(1)[0]
                scenes = len(set(groups[s].tolist()))
                same = top == reference
                totals.setdefault(name, []).append((scenes, n / len(s), same))
                cells.append(f"{name} {scenes}sc {n}/{len(s)}{'=' if same else '!'}")
            lines.append(f"  it{i}: " + " | ".join(cells))
        print(path.split("runs/")[-1], "(chosen " + "-".join(v[:4] for v in reference or ()) + ")")
        print("\n".join(lines))
    for name, rows in totals.items():
        print(
            f"{name}: {len(rows)} iterations, mean scenes {np.mean([r[0] for r in rows]):.2f}, "
            f"mean purity {np.mean([r[1] for r in rows]):.2f}, iteration 0's creature on "
            f"{sum(r[2] for r in rows)}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
