"""ToyWorld's pose signal: the pose map carries the pose and nothing of the identity, leans as
the renderer leans the creature, the pose head of the probe reads and saves poses, and the
annotator draws the map of the pose it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consistent_char.eval.pose_control import pose_jobs
from consistent_char.toy.evaluate import identity_kept, majority_identity
from consistent_char.toy.pose import (
    POSE,
    POSE_RANGES,
    POSE_TOLERANCE,
    REFINE_THROUGH_CONTROLNET,
    annotate,
    pose_followed,
    pose_map,
    pose_of,
    sample_posed_record,
)
from consistent_char.toy.probe import IdentityProbe, ProbeConfig
from consistent_char.toy.world import SCENES, CreatureRecord, record_with, render


def _record(**pose):
    return CreatureRecord("round", "red", "cap", "blue", "big", "forest", **pose)


def test_the_pose_map_depends_on_the_pose_alone():
    a = _record(x=0.4, scale=0.9, tilt=12.0)
    b = CreatureRecord(
        "tall", "green", "none", "none", "cyclops", "night", x=0.4, scale=0.9, tilt=12.0
    )
    np.testing.assert_array_equal(np.asarray(pose_map(a)), np.asarray(pose_map(b)))
    for change in ({"x": 0.6}, {"scale": 0.8}, {"tilt": -12.0}, {"bottom": 0.91}):
        other = record_with(a, **change)
        assert not np.array_equal(np.asarray(pose_map(a)), np.asarray(pose_map(other))), change


def test_the_spine_stands_where_the_creature_stands():
    for x in (0.38, 0.5, 0.62):
        _, xs = np.nonzero((np.asarray(pose_map(_record(x=x))) > 200).all(axis=2))
        spine_x = xs.mean()
        assert abs(spine_x - x * 64) < 1.0, (x, spine_x)


def test_the_map_leans_the_way_the_renderer_leans_the_creature():
    upright, leaning = _record(tilt=0.0), _record(tilt=20.0)

    def top_x(image, mask_fn):
        array = np.asarray(image).astype(int)
        ys, xs = np.nonzero(mask_fn(array))
        top = ys < np.percentile(ys, 25)
        return xs[top].mean()

    def white(a):
        return (a > 200).all(axis=2)

    # The creature: pixels that differ from the same scene without it.
    empty = np.asarray(render(record_with(upright, scale=0.01))).astype(int)

    def drawn(a):
        return np.abs(a - empty).sum(axis=2) > 60

    map_shift = top_x(pose_map(leaning), white) - top_x(pose_map(upright), white)
    creature_shift = top_x(render(leaning), drawn) - top_x(render(upright), drawn)
    assert map_shift < -3 and creature_shift < -3, (map_shift, creature_shift)


def test_posed_records_cover_the_pose_ranges():
    rng = np.random.default_rng(0)
    poses = pose_of([sample_posed_record(rng) for _ in range(300)])
    for k, name in enumerate(POSE):
        lo, hi = POSE_RANGES[name]
        assert lo <= poses[:, k].min() < lo + 0.1 * (hi - lo)
        assert hi - 0.1 * (hi - lo) < poses[:, k].max() <= hi


def test_a_pose_is_followed_only_within_every_tolerance():
    asked = np.array([[0.5, 0.95, 1.0, 0.0]])
    assert pose_followed(asked, asked).all()
    for k, name in enumerate(POSE):
        inside, outside = asked.copy(), asked.copy()
        inside[0, k] += POSE_TOLERANCE[name] * 0.99
        outside[0, k] += POSE_TOLERANCE[name] * 1.01
        assert pose_followed(inside, asked).all() and not pose_followed(outside, asked).any()


def test_pose_jobs_are_reproducible_with_distinct_seeds_and_scenes_in_turn():
    jobs = pose_jobs(6, 3, seed=1)
    again = pose_jobs(6, 3, seed=1)
    assert [(j.scene, j.pose, j.seed) for j in jobs] == [(j.scene, j.pose, j.seed) for j in again]
    assert len({j.seed for j in jobs}) == 18
    assert [jobs[3 * p].scene for p in range(6)] == [SCENES[p % len(SCENES)] for p in range(6)]
    assert pose_jobs(6, 3, seed=2)[0].pose != jobs[0].pose


def test_calibration_poses_and_seeds_are_none_of_the_evaluations():
    calibration = pose_jobs(6, 3, seed=1, calibration=True)
    measured = [j for s in range(8) for j in pose_jobs(6, 3, seed=s)]
    assert {j.seed for j in calibration}.isdisjoint(j.seed for j in measured)
    poses = [tuple(j.pose.values()) for j in measured]
    assert all(tuple(j.pose.values()) not in poses for j in calibration)
    again = pose_jobs(6, 3, seed=1, calibration=True)
    assert [j.seed for j in again] == [j.seed for j in calibration]


def test_reference_and_identity_kept_count_all_five_attributes():
    a = {"shape": "round", "color": "red", "hat": "cap", "hat_color": "blue", "eyes": "big"}
    b = {**a, "eyes": "dots"}
    assert majority_identity([a, b, a]) == a
    assert majority_identity([b, b, a]) == b
    assert identity_kept([a, a, b, b], a) == 0.5


def test_the_pose_head_maps_its_outputs_onto_the_pose_ranges_and_survives_saving(tmp_path):
    probe = IdentityProbe(ProbeConfig(validity=False, pose=True, channels=(4, 8), hidden=8))
    assert probe.pose_head is not None
    with torch.no_grad():
        probe.pose_head.weight.zero_()
        probe.pose_head.bias.copy_(torch.tensor([0.0, 1.0, 0.5, 0.25]))
    images = [render(_record())] * 2
    lo = np.array([POSE_RANGES[k][0] for k in POSE])
    hi = np.array([POSE_RANGES[k][1] for k in POSE])
    expected = lo + np.array([0.0, 1.0, 0.5, 0.25]) * (hi - lo)
    np.testing.assert_allclose(probe.predict_pose(images), [expected] * 2, rtol=1e-6)
    np.testing.assert_allclose(
        IdentityProbe.pose_targets(expected[None])[0], [0, 1, 0.5, 0.25], atol=1e-6
    )
    loaded = IdentityProbe.from_pretrained(probe.save_pretrained(tmp_path / "p"))
    np.testing.assert_allclose(loaded.predict_pose(images), probe.predict_pose(images), rtol=1e-6)


def test_a_probe_without_a_pose_head_says_so():
    probe = IdentityProbe(ProbeConfig(channels=(4, 8), hidden=8))
    with pytest.raises(ValueError, match="no pose head"):
        probe.predict_pose([render(_record())])


def test_the_annotator_draws_the_pose_map_of_the_pose_a_creature_stands_in():
    # ToyWorld's control annotator reads each render's pose with the shipped pose probe: its
    # map must be the render's own (nearer to it than to any other render's map).
    rng = np.random.default_rng(11)
    records = [sample_posed_record(rng) for _ in range(6)]
    maps = annotate([render(r) for r in records])
    truth = [np.asarray(pose_map(r), dtype=np.float32) for r in records]
    for i, drawn in enumerate(maps):
        gaps = [np.abs(np.asarray(drawn, dtype=np.float32) - t).mean() for t in truth]
        assert int(np.argmin(gaps)) == i
        assert drawn.size == (64, 64)


def test_the_settings_that_refine_through_the_pose_controlnet_load_it_and_the_annotator():
    from diffusers import StableDiffusionXLPipeline

    import consistent_char.toy as toy
    from consistent_char.config import TOY_MODEL, ExtractorConfig
    from consistent_char.refiners import TextualInversionLoRARefiner

    config = ExtractorConfig.build({"model": TOY_MODEL, "refiner": REFINE_THROUGH_CONTROLNET})
    pipe = StableDiffusionXLPipeline.from_pretrained(toy.model_dir())
    refiner = TextualInversionLoRARefiner.from_config(pipe, config.refiner)
    refiner.check_ready()
    control = refiner.training_control()
    assert control is not None and control.annotator is annotate
