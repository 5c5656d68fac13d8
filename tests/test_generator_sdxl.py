"""SDXLGenerator on a tiny SDXL-architecture pipeline (CPU, 2 denoising steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consistent_char.generators import SDXLGenerator
from consistent_char.identity import IdentityError
from consistent_char.interfaces import Generator
from consistent_char.testing import tiny_identity, tiny_sdxl_pipeline

PROMPTS = ["a photo of a cat", "a red dog in the snow", "a fox at night", "a robot"]
SEEDS = [0, 1, 2**40 + 3, 2**63 - 1]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(seed=0)


def _gen(pipe, **settings):
    settings.setdefault("num_inference_steps", 2)
    return SDXLGenerator.from_pipeline(pipe, **settings)


def _arrays(images):
    return [np.asarray(im).astype(np.int16) for im in images]


def _pipeline_snapshot(pipe):
    return {
        "vocab": (dict(pipe.tokenizer.get_vocab()), dict(pipe.tokenizer_2.get_vocab())),
        "lens": (len(pipe.tokenizer), len(pipe.tokenizer_2)),
        "types": {
            name: [type(m).__name__ for m in getattr(pipe, name).modules()]
            for name in ("unet", "text_encoder", "text_encoder_2")
        },
        "state": {
            name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        },
    }


def _assert_same_pipeline(before, after):
    assert before["vocab"] == after["vocab"]
    assert before["lens"] == after["lens"]
    assert before["types"] == after["types"]
    for name, state in before["state"].items():
        assert state.keys() == after["state"][name].keys(), name
        for key, value in state.items():
            assert torch.equal(value, after["state"][name][key]), f"{name}.{key} changed"


def test_is_a_generator(pipe):
    assert isinstance(_gen(pipe), Generator)


def test_returns_one_rgb_image_per_prompt_at_the_pipeline_size(pipe):
    images = _gen(pipe).generate(PROMPTS[:2], SEEDS[:2])
    assert [im.mode for im in images] == ["RGB", "RGB"]
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    tall = _gen(pipe, height=48, width=32).generate(PROMPTS[:1], SEEDS[:1])
    assert tall[0].size == (32, 48)


def test_same_seed_same_image(pipe):
    gen = _gen(pipe)
    first = _arrays(gen.generate(PROMPTS, SEEDS))
    again = _arrays(gen.generate(PROMPTS, SEEDS))
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
    other = _arrays(gen.generate(PROMPTS, [s ^ 1 for s in SEEDS]))
    assert all(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_image_depends_only_on_its_own_seed_and_prompt(pipe):
    all_at_once = _arrays(_gen(pipe, batch_size=4).generate(PROMPTS, SEEDS))
    one_by_one = _arrays(_gen(pipe, batch_size=1).generate(PROMPTS, SEEDS))
    # Reversed order in batches of 3: each image sits with other neighbours in another batch.
    shuffled = _arrays(_gen(pipe, batch_size=3).generate(PROMPTS[::-1], SEEDS[::-1]))[::-1]
    for a, b, c in zip(all_at_once, one_by_one, shuffled, strict=True):
        # A batched matmul may round differently from a single one: allow one grey level.
        assert np.abs(a - b).max() <= 1
        assert np.abs(a - c).max() <= 1
    # ... while the images themselves differ far more than that.
    assert np.abs(all_at_once[0] - all_at_once[1]).max() > 10


def test_callback_reports_progress_per_batch(pipe):
    calls = []
    _gen(pipe, batch_size=2).generate(
        PROMPTS[:3], SEEDS[:3], callback=lambda d, t: calls.append((d, t))
    )
    assert calls == [(2, 3), (3, 3)]


def test_identity_is_applied_then_removed(pipe):
    gen = _gen(pipe)
    identity = tiny_identity(pipe, "<fox>", seed=3)
    before = _pipeline_snapshot(pipe)
    plain = _arrays(gen.generate(["a <fox> in the snow"], [5]))
    with_identity = _arrays(gen.generate(["a <fox> in the snow"], [5], identity=identity))
    assert np.abs(plain[0] - with_identity[0]).max() > 10
    _assert_same_pipeline(before, _pipeline_snapshot(pipe))
    assert not getattr(pipe.unet, "peft_config", None)
    # Applying it again works: nothing of the first application was left behind.
    again = _arrays(gen.generate(["a <fox> in the snow"], [5], identity=identity))
    assert np.array_equal(with_identity[0], again[0])


def test_identity_is_removed_when_generation_fails(pipe):
    gen = _gen(pipe)
    identity = tiny_identity(pipe, "<fox>", seed=3)
    before = _pipeline_snapshot(pipe)

    def fail(done, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        gen.generate(["a <fox>"], [0], identity=identity, callback=fail)
    _assert_same_pipeline(before, _pipeline_snapshot(pipe))


def test_identity_of_another_model_is_a_clear_error(pipe):
    identity = tiny_identity(pipe, "<fox>")
    identity.clip_l, identity.clip_g = identity.clip_g, identity.clip_l  # 48 and 32: swapped
    before = _pipeline_snapshot(pipe)
    with pytest.raises(IdentityError, match=r"clip_l vectors of width 48.*expects 32"):
        _gen(pipe).generate(["a <fox>"], [0], identity=identity)
    _assert_same_pipeline(before, _pipeline_snapshot(pipe))


@pytest.mark.parametrize(
    ("prompts", "seeds", "message"),
    [
        ([], [], "prompts is empty"),
        (["a", "b"], [1], "got 2 prompts and 1 seeds"),
        (["a"], [-1], r"seeds\[0\] must be in \[0, 2\*\*63\)"),
        (["a"], [2**63], r"seeds\[0\] must be in"),
        (["a"], [1.5], r"seeds\[0\] must be an int"),
        (["a"], [True], r"seeds\[0\] must be an int"),
        ("a cat", [0], "single string"),
        ([None], [0], r"prompts\[0\] must be a str"),
    ],
)
def test_bad_inputs_are_clear_errors(pipe, prompts, seeds, message):
    with pytest.raises(ValueError, match=message):
        _gen(pipe).generate(prompts, seeds)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps = 0: .* greater than or equal to 1"),
        ({"guidance_scale": -1.0}, "guidance_scale = -1.0: .* greater than or equal to 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale = NaN: .* finite number"),
        ({"lora_scale": float("inf")}, "lora_scale = Infinity: .* finite number"),
        ({"guidance_rescale": 1.5}, "guidance_rescale = 1.5: .* less than or equal to 1"),
        ({"guidance_rescale": float("nan")}, "guidance_rescale = NaN: .* finite number"),
        ({"num_inference_steps": True}, "num_inference_steps = true: expected a number"),
        ({"batch_size": 0}, "batch_size = 0: .* greater than or equal to 1"),
        ({"height": 30}, "height = 30: .* multiple of 8"),
        ({"scheduler": "NoSuchScheduler"}, "not a diffusers scheduler class"),
        ({"scheduler": "StableDiffusionXLPipeline"}, "not a diffusers scheduler class"),
    ],
)
def test_bad_settings_are_clear_errors(pipe, settings, message):
    with pytest.raises(ValueError, match=message):
        SDXLGenerator.from_pipeline(pipe, **settings)


def test_unknown_settings_are_type_errors_that_list_the_known_ones(pipe):
    with pytest.raises(TypeError, match=r"unknown SDXLGenerator setting\(s\) \['guidance'\]"):
        SDXLGenerator.from_pipeline(pipe, guidance=5.0)


def test_settings_read_and_assign_through_the_one_model(pipe):
    gen = _gen(pipe, guidance_scale=5)
    assert gen.guidance_scale == 5.0 and gen.settings.guidance_scale == 5.0
    gen.num_inference_steps = 3
    assert gen.settings.num_inference_steps == 3
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        gen.num_inference_steps = 0
    assert gen._scheduler is None
    gen.scheduler = "EulerDiscreteScheduler"
    assert type(gen._scheduler).__name__ == "EulerDiscreteScheduler"


def test_guidance_rescale_changes_guided_images_only(pipe):
    guided = _arrays(_gen(pipe, guidance_scale=5.0).generate(PROMPTS, SEEDS))
    rescaled = _arrays(
        _gen(pipe, guidance_scale=5.0, guidance_rescale=1.0).generate(PROMPTS, SEEDS)
    )
    assert all(np.abs(a - b).max() > 2 for a, b in zip(guided, rescaled, strict=True))
    # Without classifier-free guidance there is no guided prediction to rescale.
    plain = _arrays(_gen(pipe, guidance_scale=1.0).generate(PROMPTS, SEEDS))
    same = _arrays(_gen(pipe, guidance_scale=1.0, guidance_rescale=1.0).generate(PROMPTS, SEEDS))
    assert all(np.array_equal(a, b) for a, b in zip(plain, same, strict=True))


def test_another_scheduler_samples_for_the_call_only_and_keeps_images_per_seed(pipe):
    own = pipe.scheduler
    plain = _arrays(_gen(pipe).generate(PROMPTS, SEEDS))
    gen = _gen(pipe, scheduler="EulerAncestralDiscreteScheduler", batch_size=4)
    ancestral = _arrays(gen.generate(PROMPTS, SEEDS))
    assert pipe.scheduler is own
    assert type(gen._scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    # The same noise schedule, sampled another way: other images from the same seeds.
    assert gen._scheduler.config.beta_end == own.config.beta_end
    assert all(np.abs(a - b).max() > 0 for a, b in zip(plain, ancestral, strict=True))
    # The sampler's fresh noise comes from each image's own generator: same seed, same image,
    # whatever the batch.
    one_by_one = _gen(pipe, scheduler="EulerAncestralDiscreteScheduler", batch_size=1)
    for a, b in zip(ancestral, _arrays(one_by_one.generate(PROMPTS, SEEDS)), strict=True):
        assert np.abs(a - b).max() <= 1


def test_scheduler_is_restored_when_generation_fails(pipe, monkeypatch):
    own = pipe.scheduler
    gen = _gen(pipe, scheduler="EulerAncestralDiscreteScheduler")

    def fail(*args, **kwargs):
        assert pipe.scheduler is gen._scheduler
        raise RuntimeError("boom")

    monkeypatch.setattr(type(pipe), "__call__", fail)
    with pytest.raises(RuntimeError, match="boom"):
        gen.generate(PROMPTS[:1], SEEDS[:1])
    assert pipe.scheduler is own


def test_from_pretrained_missing_local_dir_fails_before_loading(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        SDXLGenerator.from_pretrained(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        SDXLGenerator.from_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match="unknown SDXLGenerator setting"):
        SDXLGenerator.from_pretrained(tmp_path / "empty", num_steps=3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        SDXLGenerator.from_pretrained(tmp_path / "empty", num_inference_steps=0)
    with pytest.raises(ValueError, match="scheduler"):
        SDXLGenerator.from_pretrained(tmp_path / "empty", scheduler="Euler")


def test_from_pretrained_loads_a_saved_pipeline(tmp_path, pipe):
    tiny_sdxl_pipeline(seed=0, directory=tmp_path / "model")
    loaded = SDXLGenerator.from_pretrained(tmp_path / "model", device="cpu", num_inference_steps=2)
    assert loaded.pipeline.device.type == "cpu"
    assert loaded.pipeline.unet.dtype == torch.float32
    a = _arrays(loaded.generate(PROMPTS[:2], SEEDS[:2]))
    b = _arrays(_gen(pipe).generate(PROMPTS[:2], SEEDS[:2]))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_out_of_memory_halves_an_automatic_batch(pipe, monkeypatch):
    gen = _gen(pipe)  # batch_size=None: automatic
    expected = _arrays(gen.generate(PROMPTS, SEEDS))
    real = gen._call_pipeline
    sizes = []

    def small_memory(prompts, seeds, height, width):
        sizes.append(len(prompts))
        if len(prompts) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(prompts, seeds, height, width)

    monkeypatch.setattr(gen, "_call_pipeline", small_memory)
    got = _arrays(gen.generate(PROMPTS, SEEDS))
    assert sizes == [4, 2, 1, 1, 1, 1]
    for a, b in zip(expected, got, strict=True):
        assert np.abs(a - b).max() <= 1
    # A batch size the user chose is not second-guessed.
    fixed = _gen(pipe, batch_size=2)
    monkeypatch.setattr(fixed, "_call_pipeline", small_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fixed.generate(PROMPTS, SEEDS)


def _merged_flags(pipe):
    from peft.tuners.lora import LoraLayer

    return [m.merged for m in pipe.unet.modules() if isinstance(m, LoraLayer)]


def test_fused_identity_draws_the_same_images_and_restores_the_exact_weights(pipe):
    identity = tiny_identity(pipe, "<fox>", seed=3)
    prompts, seeds = ["a <fox> in the snow", "a <fox> at night"], [5, 6]
    before = _pipeline_snapshot(pipe)
    unfused = _arrays(_gen(pipe, fuse_identity=False).generate(prompts, seeds, identity=identity))
    seen: list[list[bool]] = []
    fused = _arrays(
        _gen(pipe, fuse_identity=True, batch_size=1).generate(
            prompts,
            seeds,
            identity=identity,
            callback=lambda done, total: seen.append(_merged_flags(pipe)),
        )
    )
    # The LoRA was merged during the call (every wrapped layer), and only rounding differs.
    assert len(seen) == 2 and all(flags and all(flags) for flags in seen)
    for a, b in zip(unfused, fused, strict=True):
        assert np.abs(a - b).max() <= 2
    _assert_same_pipeline(before, _pipeline_snapshot(pipe))


def test_fused_identity_restores_bfloat16_weights_bit_for_bit():
    # peft's unmerge subtracts the update again, which does not give back bfloat16 weights.
    pipe = tiny_sdxl_pipeline(seed=1).to(dtype=torch.bfloat16)
    identity = tiny_identity(pipe, "<fox>", seed=4, scale=2.0)
    before = _pipeline_snapshot(pipe)
    _gen(pipe, fuse_identity=True).generate(["a <fox>"], [0], identity=identity)
    _assert_same_pipeline(before, _pipeline_snapshot(pipe))


def test_no_fusing_while_another_identity_is_active(pipe):
    other = tiny_identity(pipe, "<owl>", seed=5)
    fox = tiny_identity(pipe, "<fox>", seed=3)
    other.apply_to(pipe)
    try:
        seen: list[list[bool]] = []
        _gen(pipe, fuse_identity=True).generate(
            ["a <fox> and a <owl>"],
            [1],
            identity=fox,
            callback=lambda done, total: seen.append(_merged_flags(pipe)),
        )
        # Merging the fox into peft's layers would silently switch the owl's LoRA off.
        assert seen and not any(any(flags) for flags in seen)
    finally:
        other.remove_from(pipe)


def test_sampler_swaps_the_scheduler_for_direct_pipeline_calls(pipe):
    own = pipe.scheduler
    gen = _gen(pipe, scheduler="EulerAncestralDiscreteScheduler")
    with gen.sampler():
        assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler is own
    with _gen(pipe).sampler():  # no scheduler setting: the pipeline's own stays
        assert pipe.scheduler is own


@pytest.mark.parametrize(
    ("n", "cap", "expected"),
    [(16, 13, 8), (128, 13, 13), (64, 8, 8), (20, 8, 7), (3, 8, 3), (1, 64, 1), (5, 1, 1)],
)
def test_automatic_batches_split_evenly(n, cap, expected):
    from consistent_char.generators.sdxl import _even_batch_size

    batch = _even_batch_size(n, cap)
    assert batch == expected
    # No more calls than the cap needs, and no call over the cap.
    assert -(-n // batch) == -(-n // cap) and batch <= cap


def test_cuda_batch_counts_memory_the_allocator_caches_as_free(pipe, monkeypatch):
    from consistent_char.generators import sdxl

    gib = 2**30
    side = 128 * pipe.vae_scale_factor  # 128 x 128 latent pixels, as SDXL's 1024² has
    gen = _gen(pipe, guidance_scale=7.5)
    # 2 passes x 128 x 128 latent pixels x 131,072 bytes: 4 GiB an image.
    monkeypatch.setattr(type(pipe), "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    # 0.8 x 40 GiB / 4 GiB: 8 a batch, and 16 images go as 8 + 8.
    assert gen._auto_batch_size(16, side, side) == 8
    # 20 GiB cached by the allocator but in no tensor (e.g. the refiner's activations): free too.
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    assert sdxl._cuda_free_bytes(torch.device("cuda", 0)) == 60 * gib
    # 0.8 x 60 / 4 = 12 a batch; 16 images go as 8 + 8 either way, 24 as 12 + 12.
    assert gen._auto_batch_size(24, side, side) == 12
    # A process capped at 30% of the 80 GiB card (24 GiB) with 10 GiB in tensors has 14 left.
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.3)
    assert sdxl._cuda_free_bytes(torch.device("cuda", 0)) == int(0.3 * 80 * gib) - 10 * gib
    assert gen._auto_batch_size(24, side, side) == 2  # 0.8 x 14 / 4 = 2.8
