"""How pure the images a refinement would train on are, for the chosen cluster of iteration 0
and for smaller selections from it, from a run's saved images and embeddings (no generation):
`python research/toyworld-v2/core.py RUN_DIR ...`.

- `cluster`: the chosen cluster's members (what the loop trains on);
- `core m`: the m members nearest the chosen cluster's centroid;
- `knn m`: over all images, the one whose m - 1 nearest neighbours lie closest (a density
  peak), with those neighbours;
- `peak m`: the same peak sought among the chosen cluster's members only;
- `by-peak m`: of the clusters with at least d_min_c members, the one whose own peak of m is
  tightest, and that peak; `by-peak-all m`: that cluster's members, all of them.

Each cell: images of the selection's most frequent creature (read by the probe) / its size,
and whether that creature has a hat.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import yaml

from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
from consistent_char.eval.drift import iteration_readings
from consistent_char.eval.run import load_probe
from consistent_char.extractor import stage_seed
from consistent_char.rundir import RunDirectory
from consistent_char.toy.world import IDENTITY_ATTRIBUTES


def purity(ids: list[tuple[str, ...]], members: np.ndarray) -> tuple[int, int, tuple[str, ...]]:
    top, n = Counter(ids[j] for j in members).most_common(1)[0]
    return n, len(members), top


def peak(d: np.ndarray, pool: np.ndarray, m: int) -> tuple[float, np.ndarray]:
    """Among `pool`, the image whose m - 1 nearest neighbours in `pool` lie closest: their
    mean distance and the m images."""
    sub = d[np.ix_(pool, pool)]
    knn = np.sort(sub, axis=1)[:, 1:m].mean(axis=1)
    best = int(np.argmin(knn))
    return float(knn[best]), pool[np.argsort(sub[best])[:m]]


def main(paths: list[str]) -> None:
    probe = load_probe()
    scores: dict[str, list[float]] = {}
    found: dict[str, set[tuple[str, ...]]] = {}
    for path in paths:
        run = RunDirectory(path)
        x = run.load_embeddings(0).astype(np.float64)
        h0 = json.loads((run.root / "state.json").read_text())["history"][0]
        reading = next(iteration_readings(path, probe))
        ids = [tuple(r[a] for a in IDENTITY_ATTRIBUTES) for r in reading.records]
        members = np.asarray(reading.members)
        centroid = x[members].mean(axis=0)
        near = members[np.argsort(np.linalg.norm(x[members] - centroid, axis=1))]
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        selections = {"cluster": members}
        seed = int(yaml.safe_load((run.root / "config.yaml").read_text())["seed"])
        labels, _ = FaissKMeansClusterer().cluster(
            x.astype(np.float32), len(h0["cluster_cohesions"]), stage_seed(seed, 0, "cluster")
        )
        assert sorted(np.flatnonzero(labels == h0["chosen_cluster"])) == sorted(members)
        d_min = int(yaml.safe_load((run.root / "config.yaml").read_text())["d_min_c"])
        for m in (3, 5):
            selections[f"core {m}"] = near[:m]
            selections[f"knn {m}"] = peak(d, np.arange(len(x)), m)[1]
            selections[f"peak {m}"] = peak(d, members, m)[1]
            pools = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
            tight = [(*peak(d, p, m), p) for p in pools if len(p) >= max(d_min, m)]
            chosen = min(tight, key=lambda t: t[0])
            selections[f"by-peak {m}"] = chosen[1]
            selections[f"by-peak-all {m}"] = chosen[2]
        cells = []
        for name, sel in selections.items():
            n, size, top = purity(ids, sel)
            scores.setdefault(name, []).append(n / size)
            if "/a-creature/" in path:
                found.setdefault(name, set()).add(top)
            cells.append(f"{name}: {n}/{size} {'-'.join(v[:4] for v in top)}")
        print(f"{path.split('runs/')[-1]} (chosen {h0['chosen_cluster']}): " + " | ".join(cells))
    for name, values in scores.items():
        print(
            f"{name}: mean purity {np.mean(values):.2f}, pure (>= 0.8) on "
            f"{sum(v >= 0.8 for v in values)} of {len(values)}; 'a creature' identities "
            f"{len(found.get(name, ()))} "
            f"(with a hat {sum(t[2] != 'none' for t in found.get(name, ()))})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
