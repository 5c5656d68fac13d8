"""Trial: iteration 0 chooses the largest cluster (the creature the prompt draws most often)
and trains on its densest 5; later iterations choose as the preset does. On a one-attribute
prompt the preset's densest core is often the prompt's second most popular creature, which
the prompt's own words then pull towards the first. Patches the extractor's clustering, then
runs `evaluate_seeds`.

    python research/toyworld-v2/largest_first.py --out runs/v2/largest \
        "a red creature" "a green creature" --seeds 0-3
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import consistent_char.extractor as ex
from consistent_char.clusterers.selection import ClusterChoice, cohesion, densest_core
from consistent_char.eval.seeds import evaluate_seeds

_original = ex.IterativeIdentityExtractor._cluster


def _cluster(self, run, state, iteration, embeddings, variations):  # type: ignore[no-untyped-def]
    if iteration > 0:
        return _original(self, run, state, iteration, embeddings, variations)
    cfg = self.config
    if run is not None and state.done(iteration, "clustered"):
        saved = run.load_clusters(iteration)
        labels = np.asarray(saved["labels"], dtype=np.int64)
        centroids = np.asarray(saved["centroids"], dtype=np.float32)
    else:
        labels, centroids = self.clusterer.cluster(
            embeddings, cfg.num_clusters, ex.stage_seed(cfg.seed, iteration, "cluster")
        )
    sizes = np.bincount(labels, minlength=centroids.shape[0])
    index = int(np.argmax(sizes))
    tightness, core = densest_core(embeddings, np.flatnonzero(labels == index), cfg.core_size)
    cohesions = cohesion(embeddings, labels, centroids)
    cohesions[index] = tightness
    choice = ClusterChoice(
        index=index,
        cohesion=float(tightness),
        sizes=[int(s) for s in sizes],
        cohesions=[float(c) for c in cohesions],
        reason="most_cohesive",
        core=core.tolist(),
    )
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
