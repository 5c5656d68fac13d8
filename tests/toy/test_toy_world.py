import numpy as np
import pytest

from consistent_char.toy.world import (
    ATTRIBUTES,
    IDENTITY_ATTRIBUTES,
    IMAGE_SIZE,
    CreatureRecord,
    num_identities,
    record_with,
    render,
    render_creature,
    render_without_eyes,
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


def test_thousands_of_identities_and_uniform_records_cover_them():
    assert num_identities() >= 1000
    rng = np.random.default_rng(0)
    identities = {sample_record(rng, prior="uniform").identity for _ in range(2000)}
    assert len(identities) > 800


def test_the_world_prior_repeats_its_archetypes():
    from consistent_char.toy.prior import ARCHETYPES

    rng = np.random.default_rng(0)
    drawn = [sample_record(rng).identity for _ in range(1000)]
    share = sum(d in ARCHETYPES for d in drawn) / len(drawn)
    assert 0.5 < share < 0.7  # ARCHETYPE_MASS is 0.6
    assert len(set(drawn)) > 200  # and the tail stays diverse


def _footprint(a, b):
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).sum(axis=-1)
    return diff > 60


@pytest.mark.parametrize("eyes", ["dots", "big", "sleepy", "cyclops"])
def test_every_eye_is_at_least_two_latent_pixels_wide(eyes):
    record = CreatureRecord("square", "green", "none", "none", eyes, "snow")
    mask = _footprint(render(record), render_without_eyes(record))
    centre = round(record.x * mask.shape[1])
    halves = [mask] if eyes == "cyclops" else [mask[:, :centre], mask[:, centre:]]
    for half in halves:
        ys, xs = np.nonzero(half)
        # A latent pixel is 4x4 image pixels (the VAE downsamples 4x).
        assert xs.max() - xs.min() + 1 >= 8 and ys.max() - ys.min() + 1 >= 8, eyes
    if eyes == "cyclops":
        assert not mask[:, centre - 12].any() and not mask[:, centre + 12].any()


def test_eyes_and_hat_sit_at_the_same_place_whatever_the_shape():
    centres, hat_bottoms = [], []
    for shape in ("round", "square", "triangle", "diamond", "tall"):
        record = CreatureRecord(shape, "green", "tophat", "red", "big", "snow")
        eyes = _footprint(render(record), render_without_eyes(record))
        centres.append(np.argwhere(eyes).mean(axis=0))
        hat = _footprint(render(record), render(record_with(record, hat="none", hat_color="none")))
        hat_bottoms.append(np.argwhere(hat)[:, 0].max())
    assert np.ptp(np.array(centres), axis=0).max() <= 1.0
    assert max(hat_bottoms) - min(hat_bottoms) <= 1


def test_the_creature_fills_a_good_part_of_the_frame():
    rng = np.random.default_rng(0)
    for _ in range(10):
        record = sample_record(rng)
        image = render(record)
        empty = np.asarray(render(record_with(record, scale=0.01))).astype(int)  # no creature
        drawn = np.abs(np.asarray(image).astype(int) - empty).sum(axis=-1) > 0
        rows, cols = np.nonzero(drawn)
        # Over half the frame's height, over 0.4 of its width, a fifth of its pixels or more.
        assert np.ptp(rows) > 0.5 * 64 and np.ptp(cols) > 0.4 * 64 and drawn.mean() > 0.18
