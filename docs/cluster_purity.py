"""Does the most cohesive cluster hold one identity? Cohesion against the probe, per iteration.

    python docs/cluster_purity.py runs/demo [--split ITERATION] [--embedder DIR]

For every iteration of a finished ToyWorld run, the probe reads the five identity attributes of
all its images. The script prints how many images show the most common identity and how many
identities there are, then, for each of the iteration's clusters: its size, its cohesion (the
mean distance of its members to their centroid, the loop's criterion) and its purity (the share
of its members that show its most common identity). ``*`` marks the cluster the loop chose,
and the three identities it holds most often follow.

With ``--split I`` it also runs the run's own k-means again inside the cluster chosen at
iteration I, with 2, 3 and 4 clusters, to see whether a finer split of the embeddings finds a
purer subset, and how many of its images the probe reads each attribute of with a confidence
below 0.9. With ``--embedder DIR`` every iteration's images are embedded again with that
DINOv2 folder and clustered again as the loop clusters (the run's k, seed and `d_min_c`), to see
which cluster another embedder would have chosen from the same images. The probe is the
evaluation's judge; the loop never sees its answers.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from consistent_char.clusterers import FaissKMeansClusterer
from consistent_char.clusterers.selection import choose_cluster
from consistent_char.config import ExtractorConfig
from consistent_char.embedders.dinov2 import DINOv2Embedder
from consistent_char.eval.run import load_probe
from consistent_char.extractor import stage_seed
from consistent_char.rundir import RunDirectory
from consistent_char.toy.world import IDENTITY_ATTRIBUTES


def _identity(record: dict[str, str]) -> tuple[str, ...]:
    return tuple(record[a] for a in IDENTITY_ATTRIBUTES)


def _describe(members: np.ndarray, embeddings: np.ndarray, records: list[dict[str, str]]) -> str:
    points = embeddings[members]
    cohesion = float(np.linalg.norm(points - points.mean(axis=0), axis=1).mean())
    counts = Counter(_identity(records[j]) for j in members)
    purity = counts.most_common(1)[0][1] / len(members)
    scenes = len({records[j]["scene"] for j in members})
    return (
        f"{len(members)} (cohesion {cohesion:.2f}, purity {purity:.2f}, "
        f"{scenes} scene{'' if scenes == 1 else 's'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished ToyWorld run directory")
    parser.add_argument("--split", type=int, help="re-cluster the cluster chosen at this iteration")
    parser.add_argument("--embedder", help="embed and cluster again with this DINOv2 folder")
    args = parser.parse_args()

    run = RunDirectory(args.run)
    history = run.read_state().history
    config = ExtractorConfig.from_file(run.config_path)
    probe = load_probe(None)
    embedder = None
    if args.embedder is not None:
        embedder = DINOv2Embedder.from_pretrained(args.embedder, device="cpu")
    chosen: dict[int, tuple[np.ndarray, np.ndarray, list[dict[str, str]]]] = {}
    for i, entry in enumerate(history):
        images = run.load_images(i, len(entry["seeds"]))
        records = probe.predict(images)
        counts = Counter(_identity(r) for r in records)
        line = (
            f"iteration {i}: spread {entry['spread']:.2f}; the most common identity on "
            f"{counts.most_common(1)[0][1]} of {len(records)} images, {len(counts)} identities"
        )
        if entry.get("chosen_cluster") is not None:
            labels = np.asarray(run.load_clusters(i)["labels"])
            embeddings = run.load_embeddings(i)
            if embedder is not None:
                embeddings = embedder.embed(images)
                clusterer = FaissKMeansClusterer(**config.clusterer.model_dump())
                labels, centroids = clusterer.cluster(
                    embeddings, config.num_clusters, stage_seed(config.seed, i, "cluster")
                )
                index = choose_cluster(embeddings, labels, centroids, config.d_min_c).index
                entry = {**entry, "chosen_cluster": index}
            parts = []
            for k in range(int(labels.max()) + 1):
                members = np.flatnonzero(labels == k)
                if len(members):
                    mark = "*" if k == entry["chosen_cluster"] else " "
                    parts.append(f"{mark}{_describe(members, embeddings, records)}")
            line += "\n    " + "\n    ".join(parts)
            members = np.flatnonzero(labels == entry["chosen_cluster"])
            chosen[i] = (members, embeddings, records)
            common = Counter(_identity(records[j]) for j in members).most_common(3)
            line += "\n    chosen: " + "; ".join(f"{n} {' '.join(ident)}" for ident, n in common)
        print(line)

    if args.split is not None:
        if args.split not in chosen:
            raise SystemExit(f"{args.run} chose no cluster at iteration {args.split}")
        members, embeddings, records = chosen[args.split]
        print(f"\nthe cluster chosen at iteration {args.split}, split again:")
        for k in (2, 3, 4):
            labels, _ = FaissKMeansClusterer().cluster(embeddings[members], k, seed=0)
            parts = [
                _describe(members[labels == c], embeddings, records)
                for c in range(k)
                if np.any(labels == c)
            ]
            print(f"  k={k}: " + "; ".join(parts))
        # Is the judge unsure, or the embedding? The probe's own confidence on those images.
        images = run.load_images(args.split, len(history[args.split]["seeds"]))
        with torch.no_grad():
            logits = probe(probe.to_pixels([images[j] for j in members]))
        for attribute in IDENTITY_ATTRIBUTES:
            top = torch.softmax(logits[attribute], dim=-1).max(dim=-1).values
            unsure = int((top < 0.9).sum())
            print(f"  the probe's confidence in {attribute} is below 0.9 on {unsure} of {len(top)}")


if __name__ == "__main__":
    main()
