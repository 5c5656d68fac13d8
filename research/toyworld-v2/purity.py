"""How pure the chosen cluster of iteration 0 is for several K and d_min_c, from a run's saved
images and embeddings (no generation): `python research/toyworld-v2/purity.py RUN_DIR ...`."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import yaml

from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
from consistent_char.eval.drift import iteration_readings
from consistent_char.eval.run import load_probe
from consistent_char.extractor import choose_cluster, stage_seed
from consistent_char.rundir import RunDirectory
from consistent_char.toy.world import IDENTITY_ATTRIBUTES


def main(paths: list[str]) -> None:
    probe = load_probe()
    clusterer = FaissKMeansClusterer()
    for path in paths:
        run = RunDirectory(path)
        emb = run.load_embeddings(0)
        seed = int(yaml.safe_load((run.root / "config.yaml").read_text())["seed"])
        records = next(iteration_readings(path, probe)).records
        ids = [tuple(r[a] for a in IDENTITY_ATTRIBUTES) for r in records]
        row = []
        for k, d_min in ((4, 5), (6, 5), (8, 4), (8, 5), (10, 4), (12, 3)):
            labels, centroids = clusterer.cluster(emb, k, stage_seed(seed, 0, "cluster"))
            choice = choose_cluster(emb, labels, centroids, d_min)
            members = [ids[j] for j in np.flatnonzero(labels == choice.index)]
            top, n = Counter(members).most_common(1)[0]
            row.append(f"K{k}/{d_min}: {n}/{len(members)} {top[0][:4]}-{top[1][:4]}-{top[2][:4]}")
        print(path.split("runs/")[-1], " | ".join(row))


if __name__ == "__main__":
    main(sys.argv[1:])
