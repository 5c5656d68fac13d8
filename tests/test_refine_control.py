"""Refining through a ControlNet (``refiner.controlnet`` + ``refiner.control_annotator``): the
loss adds the ControlNet's residuals for each training image's own control image, the
ControlNet stays frozen, and bad settings are refused before any training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from consistent_char.config import ExtractorConfig
from consistent_char.config_parsing import ConfigError
from consistent_char.control import ControlNetMismatchError
from consistent_char.errors import InvalidValueError
from consistent_char.refiners import TextualInversionLoRARefiner
from consistent_char.refiners.ti_lora.control import TrainingControl, load_annotator
from consistent_char.refiners.ti_lora.denoising import Batch
from consistent_char.testing.tiny import (
    tiny_controlnet,
    tiny_sdxl_pipeline,
    tiny_training_images,
)

TOKEN = "<tiny-pose>"
FAST = {"lora_lr": 1e-2, "embedding_lr": 5e-2, "token": TOKEN, "initializer_token": "cat"}
ANNOTATOR = f"{__name__}:level_maps"


def _level(image) -> int:
    return int(np.asarray(image, dtype=np.int64).sum() % 251)


def level_maps(images):
    """A control image per image: flat grey at a level read off the image's pixels (so each
    training image has its own, and the test can tell which is which)."""
    return [Image.new("RGB", (16, 16), (_level(im),) * 3) for im in images]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def images(pipe):
    return tiny_training_images(pipe)


@pytest.fixture
def controlnet_folder(pipe, tmp_path):
    tiny_controlnet(pipe, seed=3, directory=tmp_path / "controlnet")
    return tmp_path / "controlnet"


def _refine(pipe, images, **settings):
    refiner = TextualInversionLoRARefiner.from_pipeline(pipe, steps=3, **{**FAST, **settings})
    return refiner.refine(None, images, [f"a photo of {TOKEN}"] * len(images), seed=0)


def _lora_gap(a, b) -> float:
    return max(float((a.lora[k] - b.lora[k]).abs().max()) for k in a.lora)


def test_the_controlnets_residuals_enter_the_loss(pipe, images, controlnet_folder):
    plain = _refine(pipe, images)
    through = _refine(pipe, images, controlnet=str(controlnet_folder), control_annotator=ANNOTATOR)
    # The LoRA's entries are ~0.2 here: the residuals move them by far more than rounding does.
    assert _lora_gap(plain, through) > 1e-2
    assert through.metadata["refiner"]["controlnet"] == str(controlnet_folder)


def test_a_controlnet_with_zero_outputs_trains_exactly_as_without_one(
    pipe, images, tmp_path, monkeypatch
):
    # A fresh ControlNet's output convolutions are zero: its residuals add nothing, so the
    # identity must be the one trained without it, to float rounding (the control path
    # changes nothing else: not the seeds, the images' order or the conditioning).
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(
        pipe.unet, conditioning_embedding_out_channels=(8, 16)
    ).save_pretrained(tmp_path / "zero")
    plain = _refine(pipe, images)
    through = _refine(pipe, images, controlnet=str(tmp_path / "zero"), control_annotator=ANNOTATOR)
    assert _lora_gap(plain, through) < 1e-4
    assert torch.allclose(plain.clip_l, through.clip_l, atol=1e-6)


def test_each_image_is_trained_under_its_own_control_image(pipe, images, controlnet_folder):
    refiner = TextualInversionLoRARefiner.from_pipeline(
        pipe,
        steps=2,
        batch_size=2,
        **FAST,
        controlnet=str(controlnet_folder),
        control_annotator=ANNOTATOR,
    )
    control = refiner.training_control()
    seen = []
    original = control.residuals

    def spy(noisy, timesteps, prompt_embeds, added, cond):
        seen.append(cond.clone())
        return original(noisy, timesteps, prompt_embeds, added, cond)

    control.residuals = spy
    data = Batch(torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4, 1))
    refiner._with_control(data, list(images), 32, 32)
    want = [_level(im) for im in images]
    assert len(set(want)) == 4, "the test needs four distinct control images"
    assert data.control is not None and data.control.shape == (4, 3, 32, 32)
    assert [round(float(c[0, 0, 0]) * 255) for c in data.control] == want
    picked = data[torch.tensor([2, 0])]
    assert torch.equal(picked.control, data.control[[2, 0]])
    refiner.refine(None, images, [f"a photo of {TOKEN}"] * 4, seed=0)
    assert len(seen) == 2  # one ControlNet call per step
    for cond in seen:
        assert {round(float(c[0, 0, 0]) * 255) for c in cond} <= set(want)


def test_the_controlnet_is_frozen_and_left_unchanged(pipe, images, controlnet_folder):
    refiner = TextualInversionLoRARefiner.from_pipeline(
        pipe, steps=2, **FAST, controlnet=str(controlnet_folder), control_annotator=ANNOTATOR
    )
    net = refiner.training_control().controlnet
    before = {k: v.clone() for k, v in net.state_dict().items()}
    refiner.refine(None, images, [f"a photo of {TOKEN}"] * 4, seed=0)
    assert not any(p.requires_grad for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_controlnet_without_an_annotator_is_refused():
    with pytest.raises(ConfigError, match="together"):
        ExtractorConfig.build({"refiner": {"controlnet": "toy"}})
    with pytest.raises(ConfigError, match="together"):
        ExtractorConfig.build({"refiner": {"control_annotator": ANNOTATOR}})


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_colon", "module:function"),
        ("no_such_module_here:f", "cannot import"),
        (f"{__name__}:no_such_function", "no function"),
    ],
)
def test_a_bad_annotator_is_refused_naming_the_setting(path, message):
    with pytest.raises(InvalidValueError, match=message) as err:
        load_annotator(path)
    assert "refiner.control_annotator" in str(err.value)


def test_check_ready_refuses_a_controlnet_for_another_unet(pipe, tmp_path):
    other = UNet2DConditionModel.from_config({**pipe.unet.config, "layers_per_block": 2})
    tiny_controlnet(type("P", (), {"unet": other})(), directory=tmp_path / "other")
    refiner = TextualInversionLoRARefiner.from_pipeline(
        pipe, **FAST, controlnet=str(tmp_path / "other"), control_annotator=ANNOTATOR
    )
    with pytest.raises(ControlNetMismatchError, match="layers_per_block"):
        refiner.check_ready()


def test_an_annotator_that_drops_images_is_refused(pipe, controlnet_folder):
    control = TrainingControl.load(pipe, str(controlnet_folder), ANNOTATOR, 1.0)
    control.annotator = lambda images: level_maps(images)[:-1]
    with pytest.raises(ValueError, match="3 control images for 4"):
        control.control_images([Image.new("RGB", (32, 32))] * 4, 32, 32)
