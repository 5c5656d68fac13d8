"""Trial: iteration 0 chooses the largest cluster (the creature the prompt draws most often)
and trains on its densest 5; later iterations choose as the preset does. On a one-attribute
prompt the preset's densest core is often the prompt's second most popular creature, which
the prompt's own words then pull towards the first. Patches the extractor's clustering, then
runs `evaluate_seeds`.

    python research/toyworld-v2/largest_first.py --out runs/v2/largest \
        "a red creature" "a green creature" --seeds 0-3
"""

from __future__ import annotations

from trial import largest_choice, parse_args, run

import consistent_char.extractor as ex

_cluster = ex.IterativeIdentityExtractor._cluster
_choose_cluster = ex.choose_cluster


def _cluster_patched(self, run_dir, state, iteration, embeddings, variations):  # type: ignore[no-untyped-def]
    if iteration > 0:
        return _cluster(self, run_dir, state, iteration, embeddings, variations)
    ex.choose_cluster = largest_choice  # the name `_cluster` calls
    try:
        return _cluster(self, run_dir, state, iteration, embeddings, variations)
    finally:
        ex.choose_cluster = _choose_cluster


if __name__ == "__main__":
    ex.IterativeIdentityExtractor._cluster = _cluster_patched  # type: ignore[method-assign]
    run(parse_args())
