"""ToyWorld's local-editing measure (`consistent_char.eval.local_edit`): the edit region, the
cases, the two figures and their bookkeeping, on tiny components."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from consistent_char.edit import blended_edit
from consistent_char.eval.local_edit import (
    edit_cases,
    edit_region,
    outside_unchanged,
    score_local_edit,
)
from consistent_char.generators.sdxl import SDXLGenerator
from consistent_char.testing import tiny_identity, tiny_sdxl_pipeline
from consistent_char.toy.world import (
    IDENTITY_ATTRIBUTES,
    creature_mask,
    record_with,
    render,
    sample_record,
)

REFERENCE = {"shape": "round", "color": "blue", "hat": "crown", "hat_color": "red", "eyes": "big"}


def test_the_creature_mask_covers_every_pixel_the_creature_hides_the_scene_in():
    rng = np.random.default_rng(3)
    for _ in range(20):
        record = sample_record(rng)
        # The same creature on a night sky and on snow: only its own pixels can match.
        a = np.asarray(render(record_with(record, scene="night")), dtype=np.int16)
        b = np.asarray(render(record_with(record, scene="snow")), dtype=np.int16)
        background = np.abs(a - b).max(axis=-1) > 0
        inside = np.asarray(creature_mask(record)) > 0
        assert not (~background & ~inside).any(), "a pixel equal in both scenes is not masked"


def test_the_edit_region_covers_the_creature_and_does_not_tell_which_creature_it_was():
    rng = np.random.default_rng(4)
    for _ in range(10):
        record = sample_record(rng)
        region = np.asarray(edit_region(record)) > 0
        assert (region >= (np.asarray(creature_mask(record)) > 0)).all()
        other = record_with(record, shape="tall", hat="wizard", hat_color="green", eyes="dots")
        assert np.array_equal(region, np.asarray(edit_region(other)) > 0)
        assert 0.2 < region.mean() < 0.9, "the region leaves nothing to keep, or nothing to edit"


def test_edit_cases_are_reproducible_per_scene_and_avoid_the_identity():
    cases = edit_cases(["snow", "city"], per_scene=6, seed=1)
    assert [c.scene for c in cases] == ["snow"] * 6 + ["city"] * 6
    assert [c.record for c in edit_cases(["snow", "city"], per_scene=6, seed=1)] == [
        c.record for c in cases
    ]
    assert len({c.seed for c in cases}) == len(cases)
    taken = cases[0].record.identity
    avoided = edit_cases(["snow", "city"], per_scene=6, seed=1, avoid=taken)
    assert all(c.record.identity != taken for c in avoided)
    assert all(c.image.size == c.mask.size == (64, 64) for c in avoided)


def test_outside_unchanged_counts_pixels_within_two_levels_outside_the_mask():
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255  # the left half is edited: anything goes there
    edited = image.copy()
    edited[:, :4] = 0
    edited[0, 4:, 1] = 102  # within two levels: unchanged
    edited[1, 4:, 2] = 97  # three levels off: changed
    value = outside_unchanged(
        Image.fromarray(image), Image.fromarray(edited), Image.fromarray(mask)
    )
    assert value == pytest.approx(28 / 32)


class _ConstantProbe:
    """Reads every image as the same creature."""

    def __init__(self, attributes):
        self.attributes = attributes
        self.images = 0

    def predict(self, images):
        self.images += len(images)
        return [{**self.attributes, "scene": "snow"} for _ in images]


@pytest.mark.parametrize("reads_reference", [True, False])
def test_score_local_edit_compares_the_probe_with_the_reference(reads_reference):
    pipe = tiny_sdxl_pipeline()
    gen = SDXLGenerator.from_pipeline(pipe, num_inference_steps=1)
    identity = tiny_identity(pipe, "<cc-char>", seed=2)
    read = dict(REFERENCE) if reads_reference else {**REFERENCE, "eyes": "sleepy"}
    probe = _ConstantProbe(read)
    scores = score_local_edit(
        gen, identity, probe, "a creature", ["snow", "city"], per_scene=2, reference=REFERENCE
    )
    expected = 1.0 if reads_reference else 0.0
    assert probe.images == 8, "4 edits with the identity and 4 without"
    for result in (scores, scores["baseline"]):
        assert result["identity_kept"] == expected
        assert result["outside_unchanged"] == 1.0
        assert result["n"] == 4
        assert list(result["per_scene"]) == ["snow", "city"]
        assert all(s == {"identity_kept": expected, "outside_unchanged": 1.0, "n": 2}
                   for s in result["per_scene"].values())  # fmt: skip
    assert scores["reference"] == REFERENCE


def test_score_local_edit_measures_the_reference_from_plain_drawings():
    pipe = tiny_sdxl_pipeline()
    gen = SDXLGenerator.from_pipeline(pipe, num_inference_steps=1)
    identity = tiny_identity(pipe, "<cc-char>", seed=2)
    probe = _ConstantProbe(REFERENCE)
    scores = score_local_edit(gen, identity, probe, "a creature", ["snow", "city"], per_scene=1)
    assert {a: scores["reference"][a] for a in IDENTITY_ATTRIBUTES} == REFERENCE
    assert probe.images == 2 + 2 + 2, "2 plain drawings, then 2 edits with and 2 without"


def test_the_toy_model_edits_at_its_latent_size(mask_latents):
    import consistent_char.toy as toy

    used = mask_latents
    gen = SDXLGenerator.from_pretrained(toy.model_dir(), device="cpu", num_inference_steps=2)
    [case] = edit_cases(["snow"], per_scene=1)
    [edited] = blended_edit(gen, [case.image], [case.mask], ["a creature in the snow"], [0])
    # 64 px images, a VAE that shrinks by 4: the mask the latents are blended with is 16x16.
    assert gen.pipeline.vae_scale_factor == 4
    assert used[0].shape[-2:] == (16, 16)
    assert outside_unchanged(case.image, edited, case.mask, levels=0) == 1.0
