"""Choosing an identity's LoRA scale for pose control: the annotator's error of the drawings,
the rule that picks a scale from it, and the inputs it refuses."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from consistent_char.control import ControlledGenerator, choose_lora_scale, control_error
from consistent_char.errors import InvalidValueError
from consistent_char.testing.tiny import tiny_controlnet, tiny_identity, tiny_sdxl_pipeline
from consistent_char.usage import prompt_with_identity


def _dot(x: int) -> Image.Image:
    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).ellipse([x - 3, 29, x + 3, 35], fill=(255, 255, 255))
    return image


def test_control_error_costs_a_near_miss_less_than_a_far_one_and_a_hit_nothing():
    asked = [_dot(32)]
    unchanged = control_error(asked, asked, lambda images: images)
    near = control_error([_dot(34)], asked, lambda images: images)
    far = control_error([_dot(48)], asked, lambda images: images)
    assert unchanged == 0.0
    assert 0.0 < near < far <= 1.0


def test_control_error_reads_the_drawings_through_the_annotator_at_the_asked_size():
    # The annotator's maps may come at another size: they are compared at the asked one.
    def halved(x: int):
        return lambda images: [_dot(x).resize((32, 32), Image.Resampling.BOX)]

    hit = control_error([_dot(0)], [_dot(32)], halved(32))
    miss = control_error([_dot(0)], [_dot(32)], halved(48))
    assert hit < miss / 10
    with pytest.raises(InvalidValueError, match="returned 2 images for 1"):
        control_error([_dot(1)], [_dot(1)], lambda images: images * 2)


class _Offsets:
    """A stand-in generator: each drawing is its control image brightened by an offset that
    depends on whether the identity is drawn, and at which LoRA scale."""

    def __init__(self, plain: int, by_scale: dict[float, int], fail_at: float | None = None):
        self.plain, self.by_scale, self.fail_at = plain, by_scale, fail_at
        self.lora_scale = 0.7
        self.calls: list[tuple[float | None, list[str]]] = []

    def generate(self, prompts, seeds, identity, *, control_images):
        scale = None if identity is None else self.lora_scale
        self.calls.append((scale, list(prompts)))
        if scale is not None and scale == self.fail_at:
            raise RuntimeError("out of memory")
        offset = self.plain if scale is None else self.by_scale[scale]
        return [Image.eval(im, lambda v: min(255, v + offset)) for im in control_images]


class _Identity:
    token, lora, metadata = "<me>", object(), {}


def _choose(gen, **options):
    grey = [Image.new("RGB", (16, 16), (100, 100, 100))] * 2
    prompts = ["a creature in a forest", "a creature at night"]
    return choose_lora_scale(gen, _Identity(), prompts, [0, 1], grey, lambda ims: ims, **options)


def test_the_strongest_scale_within_tolerance_of_the_prompt_alone_is_chosen():
    gen = _Offsets(plain=10, by_scale={1.5: 30, 1.2: 10, 1.0: 5})
    choice = _choose(gen, scales=(1.0, 1.5, 1.2), tolerance=0.05)
    assert choice.scale == 1.2
    assert choice.plain_error == pytest.approx(10 / 255)
    assert choice.bound == pytest.approx(choice.plain_error * 1.05)
    # Strongest first, and nothing weaker is drawn once one is within the bound.
    assert list(choice.errors) == [1.5, 1.2]
    assert choice.errors[1.5] == pytest.approx(30 / 255)
    # The prompt alone is drawn without the identity's token, then with it at each scale.
    assert gen.calls[0] == (None, ["a creature in a forest", "a creature at night"])
    assert all("<me>" in p for _, ps in gen.calls[1:] for p in ps)
    assert gen.lora_scale == 0.7  # put back


def test_where_no_scale_is_within_the_bound_the_strongest_near_the_least_error_is_chosen():
    gen = _Offsets(plain=2, by_scale={1.5: 40, 1.2: 9, 1.0: 20})
    choice = _choose(gen)
    assert choice.scale == 1.2 and list(choice.errors) == [1.5, 1.2, 1.0]
    # Scales that follow about equally (within the tolerance of the least error): the strongest.
    assert _choose(_Offsets(2, {1.5: 30, 1.2: 29, 1.0: 29})).scale == 1.5
    assert _choose(_Offsets(2, {1.5: 40, 1.2: 30, 1.0: 29})).scale == 1.2
    # A looser tolerance admits the strongest against the prompt alone.
    assert _choose(_Offsets(2, {1.5: 40, 1.2: 9, 1.0: 20}), tolerance=20).scale == 1.5


def test_the_generators_own_lora_scale_is_put_back_when_drawing_fails():
    gen = _Offsets(plain=2, by_scale={1.5: 40, 1.2: 9}, fail_at=1.2)
    with pytest.raises(RuntimeError, match="out of memory"):
        _choose(gen)
    assert gen.lora_scale == 0.7


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, -0.5)}, "scales"),
        ({"scales": (float("nan"),)}, "scales"),
        ({"tolerance": float("nan")}, "tolerance"),
        ({"tolerance": -0.1}, "tolerance"),
    ],
)
def test_bad_scales_or_tolerance_are_refused_before_drawing(options, message):
    gen = _Offsets(0, {})
    with pytest.raises(InvalidValueError, match=message):
        _choose(gen, **options)
    assert gen.calls == []


def test_an_identity_without_lora_or_mismatched_inputs_are_refused():
    gen = _Offsets(0, {})
    no_lora = type("NoLora", (), {"token": "<me>", "lora": None, "metadata": {}})()
    grey = [Image.new("RGB", (8, 8))]
    with pytest.raises(InvalidValueError, match="no LoRA"):
        choose_lora_scale(gen, no_lora, ["a"], [0], grey, lambda ims: ims)
    with pytest.raises(InvalidValueError, match="one seed and one control image per prompt"):
        choose_lora_scale(gen, _Identity(), ["a", "b"], [0], grey, lambda ims: ims)
    with pytest.raises(InvalidValueError, match="one seed and one control image per prompt"):
        choose_lora_scale(gen, _Identity(), [], [], [], lambda ims: ims)
    assert gen.calls == []


def test_on_a_controlnet_pipeline_the_chosen_scale_redraws_its_recorded_error():
    pipe = tiny_sdxl_pipeline(seed=0)
    net, identity = tiny_controlnet(pipe, seed=3), tiny_identity(pipe, "<tiny>", seed=1)
    gen = ControlledGenerator(pipe, net, num_inference_steps=2, lora_scale=0.3)
    rng = np.random.default_rng(0)
    controls = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))] * 2
    prompts, seeds = ["standing", "sitting"], [4, 5]
    choice = choose_lora_scale(
        gen, identity, prompts, seeds, controls, lambda ims: ims, scales=(2.0, 0.5)
    )
    assert gen.lora_scale == 0.3
    within = [s for s, e in choice.errors.items() if e <= choice.bound]
    least = min(choice.errors.values())
    near = [s for s, e in choice.errors.items() if e <= least * 1.05]
    assert choice.scale == (within[0] if within else near[0])
    # The recorded error is the one the chosen scale's drawings have.
    gen.lora_scale = choice.scale
    with_token = [prompt_with_identity(identity, p) for p in prompts]
    drawn = gen.generate(with_token, seeds, identity, control_images=controls)
    assert control_error(drawn, controls, lambda ims: ims) == choice.errors[choice.scale]
