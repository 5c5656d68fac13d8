import numpy as np
import pytest

from consistent_char.toy.world import (
    ATTRIBUTES,
    IDENTITY_ATTRIBUTES,
    IMAGE_SIZE,
    CreatureRecord,
    num_identities,
    render,
    render_creature,
    sample_record,
)


def test_same_seed_same_image_and_record():
    a_img, a_rec = render_creature(np.random.default_rng(3))
    b_img, b_rec = render_creature(np.random.default_rng(3))
    assert a_rec == b_rec
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    c_img, c_rec = render_creature(np.random.default_rng(4))
    assert c_rec != a_rec


def test_render_is_a_pure_function_of_the_record():
    _, record = render_creature(np.random.default_rng(0))
    first = np.asarray(render(record))
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, np.asarray(render(CreatureRecord.from_dict(record.to_dict()))))


def test_record_holds_every_attribute_and_identity():
    _, record = render_creature(np.random.default_rng(1))
    assert set(record.attributes()) == set(ATTRIBUTES)
    assert record.identity == tuple(getattr(record, a) for a in IDENTITY_ATTRIBUTES)


@pytest.mark.parametrize("attribute", list(ATTRIBUTES))
def test_every_value_renders_and_changes_the_image(attribute):
    base = CreatureRecord("round", "blue", "crown", "red", "big", "forest")
    reference = np.asarray(render(base)).astype(int)
    for value in ATTRIBUTES[attribute]:
        if value == getattr(base, attribute) or (attribute == "hat_color" and value == "none"):
            continue
        changes = {attribute: value}
        if attribute == "hat" and value == "none":
            changes["hat_color"] = "none"
        other = CreatureRecord(**{**base.to_dict(), **changes})
        diff = np.abs(np.asarray(render(other)).astype(int) - reference).sum(axis=-1)
        # Each value changes a visible area (at least 6 pixels by a clear margin).
        assert (diff > 60).sum() >= 6, (attribute, value)


def test_pinning_attributes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = sample_record(rng, shape="tall", hat_color="pink", scene="night")
        assert (r.shape, r.hat_color, r.scene) == ("tall", "pink", "night") and r.hat != "none"
        r = sample_record(rng, hat="none")
        assert r.hat_color == "none"
    with pytest.raises(ValueError, match="shape must be one of"):
        sample_record(rng, shape="hexagon")
    with pytest.raises(ValueError, match="unknown attributes"):
        sample_record(rng, wings="yes")


def test_hat_colour_is_none_exactly_without_hat():
    with pytest.raises(ValueError, match="hat_color must be 'none'"):
        CreatureRecord("round", "blue", "none", "red", "big", "forest")
    with pytest.raises(ValueError, match="hat_color must be 'none'"):
        CreatureRecord("round", "blue", "cap", "none", "big", "forest")


def test_thousands_of_identities_and_random_records_cover_them():
    assert num_identities() >= 1000
    rng = np.random.default_rng(0)
    identities = {sample_record(rng).identity for _ in range(2000)}
    assert len(identities) > 800
