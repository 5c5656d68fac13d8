"""Write your own stage: an agglomerative (average-linkage) clusterer in plain numpy.

A stage is any object with the right method (`consistent_char.interfaces.Clusterer`:
``cluster(embeddings, k, seed) -> (labels, centroids)``); no base class. Before using it, run it
through the conformance suite, which checks shapes, dtypes, determinism, edge cases (k = 1,
k = N) and that well separated blobs are found: the same checks the built-in stages pass.

    python examples/custom_clusterer.py --tiny        # seconds on CPU
    python examples/custom_clusterer.py               # ToyWorld
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import add_model_arguments, default_stages, load

from consistent_char import IterativeIdentityExtractor
from consistent_char.testing.conformance import check_stage


class AgglomerativeClusterer:
    """Average-linkage agglomerative clustering: start with one cluster per point, merge the
    two closest clusters (mean pairwise Euclidean distance) until `k` are left.

    Deterministic, so `seed` is unused. O(N^3) merges in numpy: fine for N in the hundreds.
    """

    def cluster(self, embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(embeddings, dtype=np.float64)
        n = x.shape[0]
        if x.ndim != 2 or not 1 <= k <= n:
            raise ValueError(f"need (N, D) embeddings and 1 <= k <= N, got {x.shape} and k={k}")
        distances = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        clusters: list[list[int]] = [[i] for i in range(n)]
        # linkage[a, b]: mean distance between the members of clusters a and b.
        linkage = distances.copy()
        np.fill_diagonal(linkage, np.inf)
        while len(clusters) > k:
            a, b = np.unravel_index(np.argmin(linkage), linkage.shape)
            a, b = min(a, b), max(a, b)
            size_a, size_b = len(clusters[a]), len(clusters[b])
            # Average linkage of the merged cluster to every other: size-weighted mean.
            merged = (size_a * linkage[a] + size_b * linkage[b]) / (size_a + size_b)
            clusters[a] += clusters.pop(b)
            linkage[a, :] = merged
            linkage[:, a] = merged
            linkage[a, a] = np.inf
            linkage = np.delete(np.delete(linkage, b, axis=0), b, axis=1)
        labels = np.empty(n, dtype=np.int64)
        for label, members in enumerate(sorted(clusters, key=min)):  # stable label order
            labels[members] = label
        centroids = np.stack([x[labels == c].mean(0) for c in range(k)]).astype(np.float32)
        return labels, centroids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="a creature")
    args = parser.parse_args()

    # 1. The conformance suite: raises AssertionError "[check name] what is wrong" on a failure.
    checks = check_stage(AgglomerativeClusterer())
    print(f"AgglomerativeClusterer passed {len(checks)} conformance checks")

    # 2. The loop with it, every other stage the default.
    pipe, config = load(args)
    stages = default_stages(pipe, config)
    from consistent_char.embedders import PixelEmbedder

    embedder = PixelEmbedder() if args.tiny else _default_embedder(config)
    extractor = IterativeIdentityExtractor(
        stages["generator"],
        embedder,
        AgglomerativeClusterer(),
        stages["refiner"],
        stages["criterion"],
        config=config,
    )
    result = extractor.extract(args.prompt, run_dir=args.out)
    for r in result.history:
        print(f"iteration {r.iteration}: clusters {r.cluster_sizes}, chosen {r.chosen_cluster}")


def _default_embedder(config):  # type: ignore[no-untyped-def]
    from consistent_char.embedders import DINOv2Embedder
    from consistent_char.stages import resolve_model

    source = config.embedder.model or "facebook/dinov2-large"
    return DINOv2Embedder.from_pretrained(resolve_model(source, kind="embedder"))


if __name__ == "__main__":
    main()
