import numpy as np
import pytest
from PIL import Image

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


def test_embedding_sensitivity_draws_every_set_with_the_given_draw():
    from consistent_char.embedders.pixels import PixelEmbedder
    from consistent_char.toy.evaluate import embedding_sensitivity
    from consistent_char.toy.world import render

    calls = []

    def draw(records):
        calls.append(len(records))
        return [render(r) for r in records]

    embedder = PixelEmbedder(size=16)
    # Drawing with the renderer itself gives the default's figures: the same records are drawn.
    assert embedding_sensitivity(embedder, n=4, seed=2, draw=draw) == embedding_sensitivity(
        embedder, n=4, seed=2
    )
    assert calls == [4] * 8  # the base set and its seven changes

    def flat(records):
        return [Image.new("RGB", (64, 64), "grey") for _ in records]

    # What draw returns is what gets embedded: identical images move the embedding by nothing.
    assert set(embedding_sensitivity(embedder, n=3, draw=flat).values()) == {0.0}
