"""Trial: iteration 0 chooses as the preset does (the densest 5 of the uncentred embeddings, one
creature), and every later iteration clusters the embeddings centred per scene and builds its
core from every scene in turn (`centre_variations` and `core_spans_variations` from iteration 1
on only): once the images draw one creature, the refinement learns it in all five scenes, not
in the one scene k-means would otherwise put in a cluster. Patches the extractor's clustering,
then runs `evaluate_seeds`.

    python research/toyworld-v2/span_after_first.py --out runs/v2/spanlater \
        "a red creature" "a green creature" --seeds 0-3
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import consistent_char.extractor as ex
from consistent_char.clusterers.selection import choose_cluster
from consistent_char.eval.seeds import evaluate_seeds

_original = ex.IterativeIdentityExtractor._cluster


def _cluster(self, run, state, iteration, embeddings, variations):  # type: ignore[no-untyped-def]
    if iteration == 0:
        return _original(self, run, state, iteration, embeddings, variations)
    cfg = self.config
    keys = np.asarray(variations)
    x = np.array(embeddings, dtype=np.float32, copy=True)
    for key in set(variations):
        x[keys == key] -= x[keys == key].mean(axis=0)
    if run is not None and state.done(iteration, "clustered"):
        saved = run.load_clusters(iteration)
        labels = np.asarray(saved["labels"], dtype=np.int64)
        centroids = np.asarray(saved["centroids"], dtype=np.float32)
    else:
        labels, centroids = self.clusterer.cluster(
            x, cfg.num_clusters, ex.stage_seed(cfg.seed, iteration, "cluster")
        )
    choice = choose_cluster(x, labels, centroids, cfg.d_min_c, cfg.core_size, keys)
    if run is not None and not state.done(iteration, "clustered"):
        run.save_clusters(
            iteration,
            {
                "k": cfg.num_clusters,
                "labels": labels.tolist(),
                "centroids": centroids.tolist(),
                "sizes": choice.sizes,
                "cohesions": ex._json_floats(choice.cohesions),
                "chosen": choice.index,
                "reason": choice.reason,
                "core": choice.core,
            },
        )
    return labels, choice


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    ex.IterativeIdentityExtractor._cluster = _cluster  # type: ignore[method-assign]
    for prompt in args.prompts:
        study = evaluate_seeds([prompt], seeds, f"{args.out}/{prompt.replace(' ', '-')}")
        print(json.dumps({prompt: study["prompts"][prompt]["summary"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
