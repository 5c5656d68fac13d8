import numpy as np
import pytest

from consistent_char.toy.captions import (
    SCENE_PHRASES,
    VOCABULARY,
    caption,
    full_caption,
    parse_caption,
    parse_scene,
    sample_caption,
    scene_phrase,
)
from consistent_char.toy.data import encode_words
from consistent_char.toy.world import ATTRIBUTES, CreatureRecord, sample_record

RECORD = CreatureRecord("round", "blue", "crown", "red", "sleepy", "forest")


def test_caption_names_exactly_the_subset():
    assert caption(RECORD, []) == "a creature"
    assert caption(RECORD, ["color", "shape"]) == "a blue round creature"
    assert caption(RECORD, ["shape", "hat", "hat_color", "scene"]) == (
        "a round creature wearing a red crown in the forest"
    )
    assert caption(RECORD, ["eyes", "scene"]) == "a creature with sleepy eyes in the forest"
    assert caption(RECORD, ["hat_color"]) == "a creature wearing a red hat"
    bare = CreatureRecord("tall", "pink", "none", "none", "cyclops", "night")
    assert caption(bare, ["hat", "eyes"]) == "a creature with one eye with no hat"
    assert full_caption(RECORD) == (
        "a blue round creature with sleepy eyes wearing a red crown in the forest"
    )
    assert full_caption(RECORD, scene=False).endswith("crown")
    with pytest.raises(ValueError, match="unknown attributes"):
        caption(RECORD, ["size"])


def test_parse_inverts_caption_for_every_subset():
    rng = np.random.default_rng(0)
    names = list(ATTRIBUTES)
    for _ in range(300):
        record = sample_record(rng)
        subset = [a for a in names if rng.random() < 0.5]
        parsed = parse_caption(caption(record, subset, hat_before_eyes=bool(rng.random() < 0.5)))
        expected = {a: getattr(record, a) for a in subset}
        if record.hat == "none" and {"hat", "hat_color"} & set(subset):
            expected["hat"] = expected["hat_color"] = "none"
        assert parsed == expected


def test_sample_caption_covers_vague_and_full():
    rng = np.random.default_rng(0)
    captions = [sample_caption(RECORD, rng) for _ in range(400)]
    assert "a creature" in captions
    assert sum(parse_caption(c) == RECORD.attributes() for c in captions) > 60
    assert len(set(captions)) > 30


def test_scene_phrases():
    for scene, phrase in SCENE_PHRASES.items():
        assert scene_phrase(scene) == phrase
        assert parse_scene(f"<cc-0> a creature {phrase}") == scene
    assert parse_scene("a creature") is None
    with pytest.raises(ValueError, match="scene must be one of"):
        scene_phrase("moon")


def test_vocabulary_covers_the_grammar():
    rng = np.random.default_rng(1)
    for _ in range(200):
        words = sample_caption(sample_record(rng), rng).split()
        assert set(words) <= set(VOCABULARY)
        assert encode_words(" ".join(words)).nonzero()[0].size == len(words)
