import numpy as np
import pytest

from consistent_char.toy.evaluate import (
    distinct_identities,
    identity_consistency,
    prompt_adherence,
)

A = {"shape": "round", "color": "red", "hat": "cap", "hat_color": "blue", "eyes": "big"}
B = {**A, "eyes": "dots"}


def test_identity_consistency_counts_pairs_across_contexts():
    records = [{**A, "scene": "snow"}, {**A, "scene": "city"}, {**B, "scene": "night"}]
    assert identity_consistency(records) == pytest.approx(1 / 3)
    # The two A images share a context: only the pairs with the B image count.
    assert identity_consistency(records, ["snow", "snow", "night"]) == 0.0
    with pytest.raises(ValueError, match="at least one pair"):
        identity_consistency(records[:1])


def test_prompt_adherence_and_distinct_identities():
    records = [{**A, "scene": "snow"}, {**A, "scene": "city"}, {**B, "scene": "night"}]
    assert prompt_adherence(records, ["snow", "snow", "night"]) == pytest.approx(2 / 3)
    assert distinct_identities(records) == 2
    with pytest.raises(ValueError, match="records but"):
        prompt_adherence(records, ["snow"])


def test_embedding_sensitivity_measures_each_change_against_the_same_renders():
    from consistent_char.embedders.pixels import PixelEmbedder
    from consistent_char.toy.evaluate import embedding_sensitivity

    class Blind:
        def embed(self, images):
            return np.zeros((len(images), 3), dtype=np.float32)

    pixels = embedding_sensitivity(PixelEmbedder(size=16), n=6, seed=1)
    assert set(pixels) == {"shape", "color", "eyes", "scene", "hat", "context", "everything"}
    # Every change alters some pixels, and a change of background alters most of them.
    assert all(value > 0 for value in pixels.values())
    assert pixels["scene"] > pixels["eyes"]
    # An embedder that sees nothing moves by nothing, whatever changes.
    assert set(embedding_sensitivity(Blind(), n=3).values()) == {0.0}
