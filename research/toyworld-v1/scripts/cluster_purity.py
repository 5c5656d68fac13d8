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
from PIL import Image

from consistent_char.clusterers import FaissKMeansClusterer
from consistent_char.clusterers.selection import choose_cluster, cohesion
from consistent_char.config import ExtractorConfig
from consistent_char.embedders.dinov2 import DINOv2Embedder
from consistent_char.eval.run import load_probe
from consistent_char.extractor import stage_seed
from consistent_char.rundir import RunDirectory
from consistent_char.toy.evaluate import identity_key
from consistent_char.toy.world import IDENTITY_ATTRIBUTES


def _describe(
    embeddings: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    records: list[dict[str, str]],
    members: np.ndarray,
) -> dict[int, str]:
    """Per non-empty cluster label, a line: size, cohesion (as the loop measures it), purity."""
    cohesions = cohesion(embeddings, labels, centroids)
    lines = {}
    for k in range(len(centroids)):
        inside = members[labels == k]
        if len(inside):
            counts = Counter(identity_key(records[j]) for j in inside)
            purity = counts.most_common(1)[0][1] / len(inside)
            scenes = len({records[j]["scene"] for j in inside})
            lines[k] = (
                f"{len(inside)} (cohesion {cohesions[k]:.2f}, purity {purity:.2f}, "
                f"{scenes} scene{'' if scenes == 1 else 's'})"
            )
    return lines


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
    clusterer = FaissKMeansClusterer(**config.clusterer.model_dump())
    chosen: dict[int, tuple[np.ndarray, np.ndarray, list[Image.Image], list[dict[str, str]]]] = {}
    for i, entry in enumerate(history):
        images = run.load_images(i, len(entry["seeds"]))
        records = probe.predict(images)
        counts = Counter(identity_key(r) for r in records)
        print(
            f"iteration {i}: spread {entry['spread']:.2f}; the most common identity on "
            f"{counts.most_common(1)[0][1]} of {len(records)} images, {len(counts)} identities"
        )
        if entry.get("chosen_cluster") is None:
            continue
        if embedder is None:
            saved = run.load_clusters(i)
            embeddings = run.load_embeddings(i)
            labels = np.asarray(saved["labels"])
            centroids = np.asarray(saved["centroids"], dtype=np.float32)
            index = int(entry["chosen_cluster"])
        else:
            embeddings = embedder.embed(images)
            labels, centroids = clusterer.cluster(
                embeddings, config.num_clusters, stage_seed(config.seed, i, "cluster")
            )
            index = choose_cluster(embeddings, labels, centroids, config.d_min_c).index
        everyone = np.arange(len(images))
        for k, line in _describe(embeddings, labels, centroids, records, everyone).items():
            print(f"    {'*' if k == index else ' '}{line}")
        members = np.flatnonzero(labels == index)
        chosen[i] = (members, embeddings, images, records)
        common = Counter(identity_key(records[j]) for j in members).most_common(3)
        print("    chosen: " + "; ".join(f"{n} {' '.join(ident)}" for ident, n in common))

    if args.split is not None:
        if args.split not in chosen:
            raise SystemExit(f"{args.run} chose no cluster at iteration {args.split}")
        members, embeddings, images, records = chosen[args.split]
        print(f"\nthe cluster chosen at iteration {args.split}, split again:")
        for k in (2, 3, 4):
            labels, centroids = clusterer.cluster(embeddings[members], k, seed=0)
            parts = _describe(embeddings[members], labels, centroids, records, members)
            print(f"  k={k}: " + "; ".join(parts.values()))
        # Is the judge unsure, or the embedding? The probe's own confidence on those images.
        with torch.no_grad():
            logits = probe(probe.to_pixels([images[j] for j in members]))
        for attribute in IDENTITY_ATTRIBUTES:
            top = torch.softmax(logits[attribute], dim=-1).max(dim=-1).values
            unsure = int((top < 0.9).sum())
            print(f"  the probe's confidence in {attribute} is below 0.9 on {unsure} of {len(top)}")


if __name__ == "__main__":
    main()
