"""Pose control: an identity drawn through an SDXL ControlNet pipeline built from the base
pipeline's components, in Python and from the command line, and the inputs it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from typer.testing import CliRunner

from consistent_char.cli import app
from consistent_char.control import (
    ControlledGenerator,
    ControlNetMismatchError,
    check_controlnet_fits,
)
from consistent_char.errors import InvalidValueError
from consistent_char.generators.sdxl import SDXLGenerator
from consistent_char.testing.tiny import tiny_controlnet, tiny_identity, tiny_sdxl_pipeline

STEPS = 2


@pytest.fixture(scope="module")
def parts():
    pipe = tiny_sdxl_pipeline(seed=0)
    return pipe, tiny_controlnet(pipe, seed=3), tiny_identity(pipe, "<tiny>", seed=1)


def _control(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _arrays(images):
    return [np.asarray(im) for im in images]


def test_at_control_scale_zero_the_identity_draws_as_without_the_controlnet(parts):
    pipe, net, identity = parts
    prompts, seeds = ["<tiny> in the snow", "<tiny> in the city"], [4, 5]
    plain = SDXLGenerator.from_pipeline(pipe, num_inference_steps=STEPS)
    controlled = ControlledGenerator(pipe, net, control_scale=0.0, num_inference_steps=STEPS)
    expected = plain.generate(prompts, seeds, identity)
    got = controlled.generate(prompts, seeds, identity, control_images=_control(0))
    for a, b in zip(_arrays(expected), _arrays(got), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_control_image_steers_the_drawing_and_the_same_one_repeats_it(parts):
    pipe, net, identity = parts
    gen = ControlledGenerator(pipe, net, num_inference_steps=STEPS)
    prompts, seeds = ["<tiny> standing"] * 3, [7, 7, 7]
    images = _arrays(
        gen.generate(
            prompts, seeds, identity, control_images=[_control(0), _control(1), _control(0)]
        )
    )
    assert not np.array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0], images[2])


def test_one_control_image_for_all_equals_it_repeated(parts):
    pipe, net, identity = parts
    gen = ControlledGenerator(pipe, net, num_inference_steps=STEPS)
    prompts, seeds = ["<tiny> a", "<tiny> b"], [1, 2]
    one = gen.generate(prompts, seeds, identity, control_images=_control(2))
    listed = gen.generate(prompts, seeds, identity, control_images=[_control(2)] * 2)
    for a, b in zip(_arrays(one), _arrays(listed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_identity_is_applied_through_the_controlnet_pipeline(parts):
    pipe, net, identity = parts
    gen = ControlledGenerator(pipe, net, num_inference_steps=STEPS)
    with_it = gen.generate(["<tiny> a"], [3], identity, control_images=_control(0))
    without = gen.generate(["<tiny> a"], [3], None, control_images=_control(0))
    assert not np.array_equal(_arrays(with_it)[0], _arrays(without)[0])
    # And removed after the call: the base pipeline has no adapter left.
    assert not pipe.get_active_adapters()


def _lora_scales_per_step(pipe, identity, gen, prompts, seeds):
    """The scale the identity's LoRA acts at in each UNet call (one per denoising step)."""
    from peft.tuners.lora import LoraLayer

    seen: list[float] = []

    def record(module, args):
        layer = next(
            m
            for m in module.modules()
            if isinstance(m, LoraLayer) and identity.adapter_name in m.lora_A
        )
        a = identity.adapter_name
        seen.append(round(layer.scaling[a] * layer.r[a] / layer.lora_alpha[a], 6))

    hook = pipe.unet.register_forward_pre_hook(record)
    try:
        images = gen.generate(prompts, seeds, identity, control_images=_control(0))
    finally:
        hook.remove()
    return seen, images


def test_identity_until_switches_the_lora_off_for_the_last_steps_of_every_call(parts):
    pipe, net, identity = parts
    gen = ControlledGenerator(
        pipe, net, identity_until=0.5, num_inference_steps=4, batch_size=1, lora_scale=0.7
    )
    seen, _ = _lora_scales_per_step(pipe, identity, gen, ["<tiny> a", "<tiny> b"], [1, 2])
    # Two calls (batch_size 1) of four steps: each starts at the LoRA's scale again.
    assert seen == [0.7, 0.7, 0.0, 0.0] * 2
    assert not pipe.get_active_adapters()


def test_identity_until_one_keeps_the_lora_on_and_draws_as_before(parts):
    pipe, net, identity = parts
    prompts, seeds = ["<tiny> a"], [3]
    settings = {"num_inference_steps": 4, "fuse_identity": False}
    until_one = ControlledGenerator(pipe, net, identity_until=1.0, **settings)
    seen, images = _lora_scales_per_step(pipe, identity, until_one, prompts, seeds)
    assert seen == [1.0] * 4
    late_off = ControlledGenerator(pipe, net, identity_until=0.75, **settings)
    seen_off, images_off = _lora_scales_per_step(pipe, identity, late_off, prompts, seeds)
    assert seen_off == [1.0, 1.0, 1.0, 0.0]
    default = ControlledGenerator(pipe, net, **settings)
    np.testing.assert_array_equal(
        _arrays(images)[0],
        _arrays(default.generate(prompts, seeds, identity, control_images=_control(0)))[0],
    )
    assert not np.array_equal(_arrays(images)[0], _arrays(images_off)[0])


def test_identity_in_controlnet_copies_the_lora_switches_it_and_removes_it_after(parts):
    from peft.tuners.lora import LoraLayer

    pipe, net, identity = parts
    assert all(p.requires_grad for p in net.parameters())  # as a user's ControlNet loads
    before = {k: v.clone() for k, v in net.state_dict().items()}
    name = identity.adapter_name
    seen: list[tuple[float, bool]] = []

    def record(module, args):
        unet = dict(pipe.unet.named_parameters())
        layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]
        assert layers, "no LoRA in the ControlNet"
        n, layer = layers[0]
        same = torch.equal(layer.lora_A[name].weight, unet[f"{n}.lora_A.{name}.weight"])
        seen.append((round(layer.scaling[name] * layer.r[name] / layer.lora_alpha[name], 6), same))

    gen = ControlledGenerator(
        pipe, net, identity_until=0.5, identity_in_controlnet=True, num_inference_steps=4,
        lora_scale=0.7,
    )  # fmt: skip
    hook = net.register_forward_pre_hook(record)
    try:
        inside = gen.generate(["<tiny> a"], [3], identity, control_images=_control(0))
    finally:
        hook.remove()
    assert seen == [(0.7, True), (0.7, True), (0.0, True), (0.0, True)]
    # After the call the ControlNet is its own again: the same modules and weights.
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, LoraLayer) for m in net.modules())
    assert all(p.requires_grad for p in net.parameters()) and "peft_config" not in vars(net)
    outside = ControlledGenerator(pipe, net, identity_until=0.5, num_inference_steps=4,
                                  lora_scale=0.7)  # fmt: skip
    drawn = outside.generate(["<tiny> a"], [3], identity, control_images=_control(0))
    assert not np.array_equal(_arrays(inside)[0], _arrays(drawn)[0])
    # A second call puts it in again and draws the same.
    again = gen.generate(["<tiny> a"], [3], identity, control_images=_control(0))
    np.testing.assert_array_equal(_arrays(inside)[0], _arrays(again)[0])


def _control_scales_per_step(net, gen, identity):
    """The conditioning scale the ControlNet steers at in each of its calls."""
    seen: list[float] = []

    def record(module, args, kwargs, output):
        seen.append(float(kwargs["conditioning_scale"]))

    hook = net.register_forward_hook(record, with_kwargs=True)
    try:
        images = gen.generate(["<tiny> a"], [3], identity, control_images=_control(0))
    finally:
        hook.remove()
    return seen, images


def test_late_control_scale_steers_harder_once_the_identity_is_switched_off(parts):
    pipe, net, identity = parts
    settings = {"num_inference_steps": 4, "identity_until": 0.5, "lora_scale": 0.7}
    late = ControlledGenerator(pipe, net, late_control_scale=2.5, **settings)
    seen, images = _control_scales_per_step(net, late, identity)
    assert seen == [1.0, 1.0, 2.5, 2.5]
    # Only for that call: the next one, without an identity, steers as diffusers does.
    assert _control_scales_per_step(net, late, None)[0] == [1.0] * 4
    assert not net._forward_pre_hooks
    same = ControlledGenerator(pipe, net, **settings)
    seen_same, images_same = _control_scales_per_step(net, same, identity)
    assert seen_same == [1.0] * 4
    assert not np.array_equal(_arrays(images)[0], _arrays(images_same)[0])


@pytest.mark.parametrize(
    ("scale", "until", "message"),
    [(-0.5, 0.5, ">= 0"), (float("nan"), 0.5, ">= 0"), (2.0, 1.0, "below 1")],
)
def test_a_late_control_scale_that_cannot_act_is_refused(parts, scale, until, message):
    pipe, net, _ = parts
    with pytest.raises(InvalidValueError, match=message):
        ControlledGenerator(pipe, net, late_control_scale=scale, identity_until=until)


@pytest.mark.parametrize("until", [0.0, -0.1, 1.5, float("nan")])
def test_identity_until_outside_zero_to_one_is_refused(parts, until):
    pipe, net, _ = parts
    with pytest.raises(InvalidValueError, match="identity_until"):
        ControlledGenerator(pipe, net, identity_until=until)


def test_a_control_image_count_that_differs_from_the_prompts_is_refused(parts):
    pipe, net, identity = parts
    gen = ControlledGenerator(pipe, net, num_inference_steps=STEPS)
    with pytest.raises(InvalidValueError, match="one control image per prompt"):
        gen.generate(["a", "b"], [0, 1], None, control_images=[_control(0)] * 3)


def test_a_controlnet_made_for_another_unet_is_refused_naming_the_setting(parts):
    pipe, _, _ = parts
    other = UNet2DConditionModel.from_config(
        {**pipe.unet.config, "cross_attention_dim": pipe.unet.config.cross_attention_dim + 8}
    )
    stranger = tiny_controlnet(type("P", (), {"unet": other})(), seed=0)
    with pytest.raises(ControlNetMismatchError, match="cross_attention_dim"):
        check_controlnet_fits(pipe, stranger)
    with pytest.raises(ControlNetMismatchError):
        ControlledGenerator(pipe, stranger)


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    pipe = tiny_sdxl_pipeline(seed=0, directory=root / "sdxl")
    tiny_controlnet(pipe, seed=3, directory=root / "controlnet")
    identity = tiny_identity(pipe, "<tiny>", seed=1)
    identity.metadata = {"base_model": str(root / "sdxl")}
    identity.save(root / "identity")
    _control(0).save(root / "pose.png")
    (root / "notes.png").write_text("not an image")
    other = UNet2DConditionModel.from_config({**pipe.unet.config, "layers_per_block": 2})
    tiny_controlnet(type("P", (), {"unet": other})(), directory=root / "other_controlnet")
    return root


def _generate(saved, out, *extra: str):
    args = ["generate", str(saved / "identity"), "{token} standing", "--out", str(out)]
    return CliRunner().invoke(app, [*args, "--steps", "2", "--device", "cpu", *extra])


def test_generate_follows_a_control_image_and_at_scale_zero_draws_as_without(saved, tmp_path):
    control = [
        "--control-image",
        str(saved / "pose.png"),
        "--controlnet",
        str(saved / "controlnet"),
    ]
    plain = _generate(saved, tmp_path / "plain")
    steered = _generate(saved, tmp_path / "steered", *control)
    zero = _generate(saved, tmp_path / "zero", *control, "--control-scale", "0")
    for result in (plain, steered, zero):
        assert result.exit_code == 0, result.output
    read = {
        k: np.asarray(Image.open(tmp_path / k / "000_seed0.png"))
        for k in ("plain", "steered", "zero")
    }
    np.testing.assert_array_equal(read["plain"], read["zero"])
    assert not np.array_equal(read["plain"], read["steered"])
    # The LoRA switched off for the last half of the steps, or put in the ControlNet too,
    # changes the drawing.
    late = _generate(saved, tmp_path / "late", *control, "--identity-until", "0.5")
    both = _generate(saved, tmp_path / "both", *control, "--identity-in-controlnet")
    harder = _generate(
        saved, tmp_path / "harder", *control, "--identity-until", "0.5",
        "--late-control-scale", "3",
    )  # fmt: skip
    for result in (late, both, harder):
        assert result.exit_code == 0, result.output
    for name in ("late", "both"):
        drawn = np.asarray(Image.open(tmp_path / name / "000_seed0.png"))
        assert not np.array_equal(read["steered"], drawn)
    # A stronger ControlNet in the steps after the switch changes them.
    drawn = np.asarray(Image.open(tmp_path / "harder" / "000_seed0.png"))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "late" / "000_seed0.png")), drawn)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control-image", "{root}/pose.png"], "go together"),
        (["--controlnet", "{root}/controlnet"], "go together"),
        (
            ["--control-image", "{root}/missing.png", "--controlnet", "{root}/controlnet"],
            "not found",
        ),
        (
            ["--control-image", "{root}/notes.png", "--controlnet", "{root}/controlnet"],
            "not an image",
        ),
        (["--control-image", "{root}/pose.png", "--controlnet", "{root}/nowhere"], "not found"),
        (["--identity-until", "0.5"], "act through a ControlNet"),
        (["--identity-in-controlnet"], "act through a ControlNet"),
        (["--late-control-scale", "2"], "act through a ControlNet"),
        (
            ["--control-image", "{root}/pose.png", "--controlnet", "{root}/controlnet"]
            + ["--late-control-scale", "2"],
            "acts in the steps after --identity-until",
        ),
        (
            ["--control-image", "{root}/pose.png", "--controlnet", "{root}/controlnet"]
            + ["--late-control-scale", "-1"],
            ">= 0",
        ),
        (
            ["--control-image", "{root}/pose.png", "--controlnet", "{root}/controlnet"]
            + ["--identity-until", "0"],
            "must be in (0, 1]",
        ),
        (
            ["--control-image", "{root}/pose.png", "--controlnet", "{root}/other_controlnet"],
            "does not match the base model: its layers_per_block",
        ),
    ],
)
def test_bad_control_input_is_one_line_and_exit_2(saved, tmp_path, extra, message):
    result = _generate(saved, tmp_path / "out", *[e.format(root=saved) for e in extra])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
