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
