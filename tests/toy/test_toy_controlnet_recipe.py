"""The pose ControlNet's recipe on a tiny plan: both stages train, export what the library
loads, resume from their checkpoints, and a later run trains on from exported weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

import consistent_char.toy as toy
from consistent_char.control import check_controlnet_fits, load_controlnet
from consistent_char.toy.probe import IdentityProbe
from recipes.toyworld.augment import jitter_saturation, to01, vae_round_trip
from recipes.toyworld.controlnet import AppsPlan, main, posed_set, vae_round_trips
from recipes.toyworld.plan import StagePlan


def _tiny_plan(**changes: object) -> AppsPlan:
    def stage(steps: int) -> StagePlan:
        return StagePlan(steps, 4, 1e-3, warmup=1, checkpoint_every=2, log_every=1)

    return AppsPlan(
        train_images=12,
        probe_images=12,
        heldout_images=6,
        captions_per_image=2,
        eval_images=2,
        eval_steps=2,
        bf16=False,
        pose_probe=stage(2),
        controlnet=stage(3),
        **changes,
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    shutil.copytree(toy.model_dir(), root / "pipeline")
    return root


def _tensors(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_both_stages_train_export_and_measure(weights, tmp_path):
    ckpt = tmp_path / "ckpt"
    metrics = main(["--weights", str(weights), "--ckpt", str(ckpt)], plan=_tiny_plan())
    assert 0.0 <= metrics["controlnet"]["pose_followed"] <= 1.0
    assert set(metrics["pose_probe"]) >= {"identity_all_correct", "pose_followed_on_renders"}
    pipe = StableDiffusionXLPipeline.from_pretrained(weights / "pipeline")
    check_controlnet_fits(pipe, load_controlnet(weights / "controlnet"))
    probe = IdentityProbe.from_pretrained(weights / "pose_probe")
    assert probe.pose_head is not None and probe.valid_head is None
    # A finished stage is loaded, not trained again: the same weights come out.
    before = _tensors(weights / "controlnet")
    main(
        ["--weights", str(weights), "--ckpt", str(ckpt), "--stage", "controlnet"], plan=_tiny_plan()
    )
    after = _tensors(weights / "controlnet")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_later_run_trains_on_from_exported_weights(weights, tmp_path):
    argv = ["--weights", str(weights), "--stage", "controlnet"]
    main([*argv, "--ckpt", str(tmp_path / "first")], plan=_tiny_plan())
    start = _tensors(weights / "controlnet")
    shutil.copytree(weights / "controlnet", tmp_path / "start")
    main(
        [*argv, "--ckpt", str(tmp_path / "second"), "--init-controlnet", str(tmp_path / "start")],
        plan=_tiny_plan(timesteps="uniform"),
    )
    went_on = _tensors(weights / "controlnet")
    # It started from the exported weights (the zero-initialised outputs are not zero any more
    # in both) and moved from them.
    key = "controlnet_mid_block.weight"
    assert start[key].abs().sum() > 0
    assert not torch.equal(start[key], went_on[key])
    assert np.allclose(start[key].numpy(), went_on[key].numpy(), atol=0.1)


def test_the_pose_probe_sees_the_vaes_reconstructions_in_the_renders_layout(weights):
    vae = StableDiffusionXLPipeline.from_pretrained(weights / "pipeline").vae
    renders = torch.from_numpy(posed_set(3, seed=1, prior="world", captions_per_image=1).images)
    trips = vae_round_trips(vae, renders)
    assert trips.shape == renders.shape and trips.dtype == torch.uint8
    direct = vae_round_trip(vae, to01(renders), torch.device("cpu"))
    assert torch.allclose(to01(trips), direct, atol=1 / 255 + 1e-6)
    # The VAE changes the pixels: these are not the renders again.
    assert (trips.float() - renders.float()).abs().mean() > 0.5


def test_posed_set_strong_lean_share_leans_that_share_and_defaults_to_the_plain_draw() -> None:
    leaning = posed_set(10, seed=3, prior="world", captions_per_image=1, strong_lean_share=0.4)
    tilts = np.abs(leaning.poses[:, 3])
    assert np.all((tilts[:4] >= 15) & (tilts[:4] <= 25))
    plain = posed_set(10, seed=3, prior="world", captions_per_image=1)
    again = posed_set(10, seed=3, prior="world", captions_per_image=1, strong_lean_share=0.0)
    assert np.array_equal(plain.poses, again.poses) and np.array_equal(plain.images, again.images)
    assert not np.array_equal(plain.poses, leaning.poses)


def test_strong_lean_share_outside_zero_to_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--weights", str(tmp_path), "--strong-lean-share", "1.5"])
    assert exit_info.value.code == 2


def test_saturation_jitter_scales_each_images_colour_around_its_own_grey() -> None:
    x = torch.rand(6, 3, 8, 8) * 0.5 + 0.25  # away from the clamp
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    out = jitter_saturation(x, torch.Generator().manual_seed(0), 0.5, 1.5)
    # Each image's colour distance from its grey is scaled by one factor (least squares),
    # within the range, and not the same factor for all.
    d, e = (x - grey).flatten(1), (out - grey).flatten(1)
    factor = (d * e).sum(1) / (d * d).sum(1)
    assert torch.allclose(e, factor[:, None] * d, atol=1e-5)
    assert ((factor >= 0.5) & (factor <= 1.5)).all()
    assert factor.std() > 0.05
    # At a factor of 1 the images come back unchanged; at 0 they turn grey.
    same = jitter_saturation(x, torch.Generator().manual_seed(0), 1.0, 1.0)
    assert torch.allclose(same, x, atol=1e-6)
    flat = jitter_saturation(x, torch.Generator().manual_seed(0), 0.0, 0.0)
    assert torch.allclose(flat, grey.expand_as(x), atol=1e-6)


@pytest.mark.parametrize("bounds", [["1.5", "0.5"], ["-0.1", "1.0"]])
def test_a_probe_saturation_range_out_of_order_or_negative_is_refused(tmp_path, bounds) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--weights", str(tmp_path), "--probe-saturation", *bounds])
    assert exit_info.value.code == 2
