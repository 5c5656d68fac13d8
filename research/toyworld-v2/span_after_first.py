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

from trial import parse_args, run

import consistent_char.extractor as ex

_cluster = ex.IterativeIdentityExtractor._cluster


def _cluster_patched(self, run_dir, state, iteration, embeddings, variations):  # type: ignore[no-untyped-def]
    if iteration == 0:
        return _cluster(self, run_dir, state, iteration, embeddings, variations)
    config = self.config
    self.config = config.model_copy(
        update={"centre_variations": True, "core_spans_variations": True}
    )
    try:
        features = self._features(embeddings, variations)  # centred per scene
        return _cluster(self, run_dir, state, iteration, features, variations)
    finally:
        self.config = config


if __name__ == "__main__":
    ex.IterativeIdentityExtractor._cluster = _cluster_patched  # type: ignore[method-assign]
    run(parse_args())
