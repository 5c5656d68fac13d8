"""TextualInversionLoRARefiner on a tiny SDXL-architecture pipeline (CPU, a few dozen steps)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from fakes import fake_cuda_graphs

from consistent_char.identity import Identity, IdentityError
from consistent_char.interfaces import Refiner
from consistent_char.refiners import TextualInversionLoRARefiner
from consistent_char.testing import tiny_identity, tiny_sdxl_pipeline, tiny_training_images

TOKEN = "<cc>"
CAPTIONS = [f"a photo of {TOKEN} in the snow"] * 4
# Learning rates far above the SDXL defaults, so a tiny random model moves in a few steps.
FAST = {"lora_lr": 1e-2, "embedding_lr": 5e-2, "token": TOKEN, "initializer_token": "cat"}
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def images(pipe):
    return tiny_training_images(pipe)


def _refiner(pipe, **settings):
    return TextualInversionLoRARefiner.from_pipeline(pipe, **{**FAST, **settings})


def _state(pipe):
    return {
        name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
        for name in MODULES
    }


def _assert_same_state(before, after):
    for name in MODULES:
        assert before[name].keys() == after[name].keys(), f"{name}'s parameters were renamed"
        for key, value in before[name].items():
            assert torch.equal(value, after[name][key]), f"{name}.{key} changed"


def _same_identity(a: Identity, b: Identity) -> bool:
    if a.token != b.token or not torch.equal(a.clip_l, b.clip_l):
        return False
    if not torch.equal(a.clip_g, b.clip_g):
        return False
    if (a.lora is None) != (b.lora is None):
        return False
    if a.lora is None or b.lora is None:
        return True
    return a.lora.keys() == b.lora.keys() and all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)


def _initial_row(pipe, encoder_index, word="cat"):
    tokenizer = (pipe.tokenizer, pipe.tokenizer_2)[encoder_index]
    encoder = (pipe.text_encoder, pipe.text_encoder_2)[encoder_index]
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight.detach()[ids].mean(0, keepdim=True)


def test_is_a_refiner(pipe):
    assert isinstance(_refiner(pipe), Refiner)


def test_only_new_token_rows_and_lora_change(pipe, images):
    before = _state(pipe)
    identity = _refiner(pipe, steps=5).refine(None, images, CAPTIONS, seed=0)
    _assert_same_state(before, _state(pipe))
    assert identity.token == TOKEN
    assert identity.clip_l.shape == (1, 32) and identity.clip_g.shape == (1, 48)
    assert not torch.equal(identity.clip_l, _initial_row(pipe, 0))
    assert not torch.equal(identity.clip_g, _initial_row(pipe, 1))
    assert identity.lora is not None
    # peft starts lora_B at zero: any nonzero value was learned.
    assert any(v.abs().sum() > 0 for k, v in identity.lora.items() if "lora_B" in k)
    tensors = [identity.clip_l, identity.clip_g, *identity.lora.values()]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    assert not any(t.requires_grad for t in tensors)


def test_pipeline_is_left_exactly_as_before(pipe, images):
    # Unusual flags, to see that refine restores them rather than resetting to defaults.
    pipe.text_encoder.train()
    pipe.unet.requires_grad_(False)
    pipe.vae.decoder.requires_grad_(False)
    flags = {n: [p.requires_grad for p in getattr(pipe, n).parameters()] for n in MODULES}
    modes = {n: [m.training for m in getattr(pipe, n).modules()] for n in MODULES}
    types = {n: [type(m) for m in getattr(pipe, n).modules()] for n in MODULES}
    embeddings = [
        pipe.text_encoder.get_input_embeddings(),
        pipe.text_encoder_2.get_input_embeddings(),
    ]
    vocab = [dict(pipe.tokenizer.get_vocab()), dict(pipe.tokenizer_2.get_vocab())]
    rng = torch.get_rng_state()
    try:
        _refiner(pipe, steps=2).refine(None, images, CAPTIONS, seed=0)
        assert {
            n: [p.requires_grad for p in getattr(pipe, n).parameters()] for n in MODULES
        } == flags
        assert {n: [m.training for m in getattr(pipe, n).modules()] for n in MODULES} == modes
        assert {n: [type(m) for m in getattr(pipe, n).modules()] for n in MODULES} == types
        assert pipe.text_encoder.get_input_embeddings() is embeddings[0]
        assert pipe.text_encoder_2.get_input_embeddings() is embeddings[1]
        assert [dict(pipe.tokenizer.get_vocab()), dict(pipe.tokenizer_2.get_vocab())] == vocab
        assert not getattr(pipe.unet, "peft_config", None)
        assert torch.equal(torch.get_rng_state(), rng), "the caller's global RNG moved"
    finally:
        pipe.text_encoder.eval()
        pipe.unet.requires_grad_(True)
        pipe.vae.decoder.requires_grad_(True)


def test_pipeline_is_restored_when_training_fails(pipe, images):
    before = _state(pipe)

    def stop(step, total, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _refiner(pipe, steps=3).refine(None, images, CAPTIONS, seed=0, callback=stop)
    _assert_same_state(before, _state(pipe))
    assert TOKEN not in pipe.tokenizer.get_vocab()
    assert not getattr(pipe.unet, "peft_config", None)


def test_loss_decreases(pipe, images):
    refiner = _refiner(pipe, steps=40)
    losses: list[float] = []
    before = refiner.denoising_loss(None, images, CAPTIONS, seed=123, repeats=8)
    identity = refiner.refine(
        None, images, CAPTIONS, seed=0, callback=lambda s, t, loss: losses.append(loss)
    )
    after = refiner.denoising_loss(identity, images, CAPTIONS, seed=123, repeats=8)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert after < 0.95 * before, (before, after)
    assert identity.metadata["refiner"]["final_loss"] == losses[-1]


def test_deterministic_for_a_seed(pipe, images):
    refiner = _refiner(pipe, steps=3, batch_size=2)
    a = refiner.refine(None, images, CAPTIONS, seed=7)
    b = refiner.refine(None, images, CAPTIONS, seed=7)
    c = refiner.refine(None, images, CAPTIONS, seed=8)
    assert _same_identity(a, b)
    assert not _same_identity(a, c)


def test_warm_start_with_no_steps_returns_the_identity_unchanged(pipe, images):
    start = tiny_identity(pipe, TOKEN, seed=1, lora_rank=2, lora_alpha=6.0)
    # The refiner's own rank/alpha settings differ: the identity's are kept.
    out = _refiner(pipe, steps=0, lora_rank=4).refine(start, images, CAPTIONS, seed=0)
    assert _same_identity(start, out)
    assert (out.lora_rank, out.lora_alpha) == (2, 6.0)


def test_warm_start_continues_from_the_identity(pipe, images):
    first = _refiner(pipe, steps=3).refine(None, images, CAPTIONS, seed=0)
    # Small steps: a continued identity stays near `first`, a fresh one near the initialisation.
    slow = _refiner(pipe, steps=3, lora_lr=1e-4, embedding_lr=1e-4)
    warm = slow.refine(first, images, CAPTIONS, seed=1)
    cold = slow.refine(None, images, CAPTIONS, seed=1)
    assert not _same_identity(warm, first)
    assert not _same_identity(warm, cold)
    assert (warm.clip_l - first.clip_l).norm() < 0.1 * (warm.clip_l - cold.clip_l).norm()
    assert (warm.clip_g - first.clip_g).norm() < 0.1 * (warm.clip_g - cold.clip_g).norm()
    assert warm.metadata["refine_count"] == 2
    assert warm.metadata["refiner"]["warm_start"] is True


def test_ti_mode_trains_no_lora(pipe, images):
    identity = _refiner(pipe, mode="ti", steps=3).refine(None, images, CAPTIONS, seed=0)
    assert identity.lora is None
    assert not torch.equal(identity.clip_l, _initial_row(pipe, 0))


def test_ti_mode_keeps_a_warm_start_lora_frozen(pipe, images):
    start = tiny_identity(pipe, TOKEN, seed=2)
    out = _refiner(pipe, mode="ti", steps=3).refine(start, images, CAPTIONS, seed=0)
    assert out.lora is not None and start.lora is not None
    assert all(torch.equal(out.lora[k], start.lora[k]) for k in start.lora)
    assert not torch.equal(out.clip_l, start.clip_l)


def test_lora_mode_keeps_the_token_rows_at_their_initialisation(pipe, images):
    identity = _refiner(pipe, mode="lora", steps=3).refine(None, images, CAPTIONS, seed=0)
    assert torch.equal(identity.clip_l, _initial_row(pipe, 0))
    assert torch.equal(identity.clip_g, _initial_row(pipe, 1))
    assert identity.lora is not None
    assert any(v.abs().sum() > 0 for k, v in identity.lora.items() if "lora_B" in k)


def test_multi_vector_tokens(pipe, images):
    start = _refiner(pipe, num_vectors=3, steps=0).refine(None, images, CAPTIONS, seed=0)
    identity = _refiner(pipe, num_vectors=3, steps=2).refine(None, images, CAPTIONS, seed=0)
    assert identity.clip_l.shape == (3, 32) and identity.clip_g.shape == (3, 48)
    assert identity.tokens == [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]
    for trained, initial in ((identity.clip_l, start.clip_l), (identity.clip_g, start.clip_g)):
        # Each vector is trained (moved from where it started)...
        moved = (trained - initial).norm(dim=-1)
        assert bool((moved > 1e-3).all()), moved
        # ...and each is a vector of its own.
        for i in range(3):
            for j in range(i + 1, 3):
                assert float((trained[i] - trained[j]).norm()) > 1e-3, (i, j)


def test_multi_vector_tokens_start_as_distinct_variants_of_the_word(pipe, images):
    def start(num_vectors, seed):
        refiner = _refiner(pipe, num_vectors=num_vectors, steps=0)
        return refiner.refine(None, images, CAPTIONS, seed=seed)

    single = start(1, seed=0)
    assert torch.equal(single.clip_l, _initial_row(pipe, 0))
    assert torch.equal(single.clip_g, _initial_row(pipe, 1))
    a, again, other = start(3, seed=0), start(3, seed=0), start(3, seed=1)
    for k, (rows, same, reseeded) in enumerate(
        ((a.clip_l, again.clip_l, other.clip_l), (a.clip_g, again.clip_g, other.clip_g))
    ):
        word = _initial_row(pipe, k)[0]
        assert torch.equal(rows[0], word)
        # The others a tenth of the word's norm away from it, in directions of their own...
        offsets = (rows[1:] - word).norm(dim=-1)
        torch.testing.assert_close(offsets, torch.full((2,), 0.1) * word.norm())
        assert float((rows[1] - rows[2]).norm()) > 0.05 * float(word.norm())
        # ...drawn from the seed.
        assert torch.equal(rows, same)
        assert torch.equal(reseeded[0], word) and not torch.equal(reseeded[1:], rows[1:])


def test_batches_larger_than_the_image_set_and_accumulation(pipe, images, monkeypatch):
    """A batch larger than the image set holds every image equally often, and accumulated
    micro-batches are averaged: when every image gets the same noise and timestep, six images
    a micro-batch over two micro-batches, one image over two, and both images at once give the
    same gradients, losses and identity."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from consistent_char.refiners.ti_lora import denoising
    from consistent_char.refiners.ti_lora.training import _StepInputs

    def same_noise(gen, shape, high):
        one = torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(0))
        return one.expand(*shape).clone(), torch.full((shape[0],), high // 2)

    batches: list[list[int]] = []
    fill = _StepInputs.fill

    def record(self, k, indices, *args, **kwargs):
        batches.append(indices.tolist())
        fill(self, k, indices, *args, **kwargs)

    grads: list[list[torch.Tensor]] = []  # each step's gradients, as AdamW gets them

    def keep_grads(optimizer, args, kwargs):
        grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])

    monkeypatch.setattr(denoising, "draw_noise", same_noise)
    monkeypatch.setattr(_StepInputs, "fill", record)
    runs = {}
    handle = register_optimizer_step_pre_hook(keep_grads)
    try:
        for batch_size, accumulation in ((2, 1), (6, 2), (1, 2)):
            losses: list[float] = []
            batches.clear()
            grads.clear()
            refiner = _refiner(
                pipe, steps=3, batch_size=batch_size, gradient_accumulation_steps=accumulation
            )
            identity = refiner.refine(
                None,
                images[:2],
                CAPTIONS[:2],
                seed=0,
                callback=lambda s, t, x, o=losses: o.append(x),
            )
            runs[batch_size, accumulation] = (identity, losses, grads[0])
            # Three steps of `accumulation` micro-batches, each step every image equally often.
            assert len(batches) == 3 * accumulation
            for step in range(3):
                seen = sum(batches[step * accumulation : (step + 1) * accumulation], [])
                assert seen.count(0) == seen.count(1) == batch_size * accumulation // 2, batches
    finally:
        handle.remove()
    plain, plain_losses, plain_grads = runs[2, 1]
    for identity, losses, first_grads in (runs[6, 2], runs[1, 2]):
        # The first step's gradients (AdamW would hide a factor in them) and what follows.
        for grad, plain_grad in zip(first_grads, plain_grads, strict=True):
            torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-7)
        assert losses == pytest.approx(plain_losses, rel=1e-5)
        torch.testing.assert_close(identity.clip_l, plain.clip_l, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(identity.clip_g, plain.clip_g, rtol=1e-4, atol=1e-6)
        assert identity.lora is not None and plain.lora is not None
        for key, value in plain.lora.items():
            # AdamW divides by the gradients' size, so where they are tiny their rounding shows:
            # within 1% of one step (lora_lr 1e-2).
            torch.testing.assert_close(identity.lora[key], value, rtol=1e-4, atol=1e-4)


def test_lora_wraps_self_and_cross_attention_of_every_transformer_block(pipe, images):
    identity = _refiner(pipe, steps=1).refine(None, images, CAPTIONS, seed=0)
    assert identity.lora is not None
    blocks = [
        name
        for name, module in pipe.unet.named_modules()
        if type(module).__name__ in pipe.unet._repeated_blocks
    ]
    assert blocks, "the tiny UNet should have transformer blocks"
    for block in blocks:
        # attn1 is the image's self-attention, attn2 the cross-attention to the prompt.
        for attention in ("attn1", "attn2"):
            for target in ("to_q", "to_k", "to_v", "to_out.0"):
                for matrix in ("lora_A", "lora_B"):
                    key = f"{block}.{attention}.{target}.{matrix}.weight"
                    assert key in identity.lora, f"{key} is not in the LoRA"


def test_v_prediction_trains_against_the_velocity(images, monkeypatch):
    from diffusers import DDPMScheduler

    pipe = tiny_sdxl_pipeline(seed=0, prediction_type="v_prediction")
    calls = []
    original = DDPMScheduler.get_velocity

    def spy(self, sample, noise, timesteps):
        calls.append(timesteps)
        return original(self, sample, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "get_velocity", spy)
    losses: list[float] = []
    _refiner(pipe, steps=2).refine(
        None, images, CAPTIONS, seed=0, callback=lambda s, t, loss: losses.append(loss)
    )
    assert len(calls) == 2 and all(math.isfinite(x) for x in losses)


def test_max_timestep_bounds_the_training_timesteps(pipe, images, monkeypatch):
    from diffusers import DDPMScheduler

    seen: list[torch.Tensor] = []
    original = DDPMScheduler.add_noise

    def spy(self, sample, noise, timesteps):
        seen.append(timesteps.detach().cpu())
        return original(self, sample, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", spy)
    _refiner(pipe, steps=20, batch_size=4, max_timestep=50).refine(None, images, CAPTIONS, seed=0)
    bounded = torch.cat(seen)
    seen.clear()
    _refiner(pipe, steps=20, batch_size=4).refine(None, images, CAPTIONS, seed=0)
    unbounded = torch.cat(seen)
    assert len(bounded) == 80 and int(bounded.max()) < 50
    # Without the bound the same seed draws over the whole schedule.
    assert int(unbounded.max()) >= 50


def test_large_images_are_encoded_a_few_at_a_time(pipe, images, monkeypatch):
    """`ENCODE_PIXELS` bounds each VAE encoder call (its activations grow with the pixels); the
    latents, and so the loss, do not depend on how the images are split."""
    from consistent_char.refiners.ti_lora import encoding

    calls: list[int] = []
    original = type(pipe.vae).encode

    def spy(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(type(pipe.vae), "encode", spy)
    six = images + images[:2]
    captions = [CAPTIONS[0]] * 6
    refiner = _refiner(pipe, steps=0)
    whole = refiner.denoising_loss(None, six, captions, seed=0)
    assert calls == [6]  # 32x32 images: all six under ENCODE_BATCH and ENCODE_PIXELS
    calls.clear()
    monkeypatch.setattr(encoding, "ENCODE_PIXELS", 4 * 32 * 32)
    split = refiner.denoising_loss(None, six, captions, seed=0)
    assert calls == [4, 2]
    assert split == pytest.approx(whole, rel=1e-5)
    calls.clear()
    monkeypatch.setattr(encoding, "ENCODE_PIXELS", 100)  # less than one image: still one a call
    refiner.denoising_loss(None, six, captions, seed=0)
    assert calls == [1] * 6


def test_lr_decay_scales_the_learning_rates_of_each_warm_start(pipe, images, monkeypatch):
    from consistent_char.refiners.ti_lora.state import _TrainingState

    rates: list[tuple[float, float]] = []
    original = _TrainingState.optimizer

    def spy(self, embedding_lr, lora_lr, weight_decay, mode, **kwargs):
        rates.append((embedding_lr, lora_lr))
        return original(self, embedding_lr, lora_lr, weight_decay, mode, **kwargs)

    monkeypatch.setattr(_TrainingState, "optimizer", spy)
    refiner = _refiner(pipe, steps=1, lr_decay=0.5)
    first = refiner.refine(None, images, CAPTIONS, seed=0)
    second = refiner.refine(first, images, CAPTIONS, seed=1)
    refiner.refine(second, images, CAPTIONS, seed=2)
    lr_e, lr_l = FAST["embedding_lr"], FAST["lora_lr"]
    expected = [lr_e, lr_l, lr_e / 2, lr_l / 2, lr_e / 4, lr_l / 4]
    assert [r for pair in rates for r in pair] == pytest.approx(expected)
    assert second.metadata["refiner"]["lr_decay"] == 0.5


def test_row_norm_cap_bounds_the_new_rows(pipe, images):
    """At a learning rate that lets the rows grow, the cap holds each row to its multiple of the
    mean norm of the encoder's own rows, and the uncapped rows do outgrow it."""
    fast = {"steps": 10, "embedding_lr": 0.5, "mode": "ti"}
    capped = _refiner(pipe, row_norm_cap=1.0, **fast).refine(None, images, CAPTIONS, seed=0)
    free = _refiner(pipe, **fast).refine(None, images, CAPTIONS, seed=0)
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    for encoder, rows, free_rows in zip(
        encoders, (capped.clip_l, capped.clip_g), (free.clip_l, free.clip_g), strict=True
    ):
        mean = float(encoder.get_input_embeddings().weight.detach().norm(dim=-1).mean())
        assert float(rows.norm(dim=-1).max()) <= mean * (1 + 1e-5)
        assert float(free_rows.norm(dim=-1).max()) > 1.5 * mean
    assert capped.metadata["refiner"]["row_norm_cap"] == 1.0


def test_training_conditioning_is_the_inference_conditioning(pipe, images):
    """What refine trains through (its own encoding and LoRA) equals what apply_to + the
    pipeline's encode_prompt and UNet use at generation time."""
    from consistent_char.refiners.ti_lora.state import trainable

    identity = tiny_identity(pipe, TOKEN, seed=4, num_vectors=2, lora_rank=2, lora_alpha=5.0)
    refiner = _refiner(pipe)
    captions = [f"a {TOKEN} cat", f"{TOKEN} in the city at night"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([10, 700])
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    with torch.no_grad():
        with trainable(pipe, refiner.settings, identity, TOKEN, seed=0) as state:
            embeds, pooled = state.encode(*state.tokenize(captions))
            trained = pipe.unet(
                latents,
                timesteps,
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample
        identity.apply_to(pipe)
        try:
            embeds_inf, _, pooled_inf, _ = pipe.encode_prompt(
                captions, device="cpu", do_classifier_free_guidance=False
            )
            generated = pipe.unet(
                latents,
                timesteps,
                encoder_hidden_states=embeds_inf,
                added_cond_kwargs={"text_embeds": pooled_inf, "time_ids": time_ids},
            ).sample
        finally:
            identity.remove_from(pipe)
    torch.testing.assert_close(embeds, embeds_inf)
    torch.testing.assert_close(pooled, pooled_inf)
    torch.testing.assert_close(trained, generated)


def test_returned_identity_round_trips_and_generates(pipe, images, tmp_path):
    from consistent_char.generators import SDXLGenerator

    identity = _refiner(pipe, steps=2, lora_alpha=8.0).refine(None, images, CAPTIONS, seed=0)
    assert (identity.lora_rank, identity.lora_alpha) == (4, 8.0)
    loaded = Identity.load(identity.save(tmp_path / "identity"))
    assert _same_identity(identity, loaded)
    out = SDXLGenerator.from_pipeline(pipe, num_inference_steps=2).generate(
        [CAPTIONS[0]], [0], identity=loaded
    )
    assert out[0].size == (32, 32)


@pytest.mark.parametrize(
    ("images_arg", "captions", "message"),
    [
        ("none", [], "images is empty"),
        ("four", CAPTIONS[:3], "got 4 images and 3 captions"),
        ("four", [*CAPTIONS[:3], "a photo of a cat"], r"captions\[3\] must contain .*<cc>"),
        ("four", "a photo of <cc>", "one per image"),
    ],
)
def test_bad_inputs_are_clear_errors(pipe, images, images_arg, captions, message):
    imgs = [] if images_arg == "none" else images
    with pytest.raises(ValueError, match=message):
        _refiner(pipe, steps=1).refine(None, imgs, captions, seed=0)


def test_bad_seed_and_taken_token_are_clear_errors(pipe, images):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        _refiner(pipe, steps=1).refine(None, images, CAPTIONS, seed=-1)
    with pytest.raises(ValueError, match="already in the pipeline's tokenizer"):
        _refiner(pipe, token="cat", steps=1).refine(None, images, ["a cat"] * 4, seed=0)
    applied = tiny_identity(pipe, TOKEN)
    applied.apply_to(pipe)
    try:
        with pytest.raises(ValueError, match=r"\['<cc>'\] are already in the pipeline's tok"):
            _refiner(pipe, steps=1).refine(None, images, CAPTIONS, seed=0)
    finally:
        applied.remove_from(pipe)


def test_identity_of_another_model_is_a_clear_error(pipe, images):
    identity = tiny_identity(pipe, TOKEN)
    identity.clip_l, identity.clip_g = identity.clip_g, identity.clip_l
    with pytest.raises(IdentityError, match="width 48.*expects 32"):
        _refiner(pipe, steps=1).refine(identity, images, CAPTIONS, seed=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "dreambooth"}, "mode = \"dreambooth\": Input should be 'ti_lora', 'ti' or"),
        ({"steps": -1}, "steps = -1: Input should be greater than or equal to 0"),
        ({"lora_lr": 0.0}, "lora_lr = 0.0: Input should be greater than 0"),
        ({"num_vectors": 0}, "num_vectors = 0: Input should be greater than or equal to 1"),
        ({"token": "two words"}, "token must be one word without spaces"),
        ({"mixed_precision": "fp8"}, "mixed_precision = \"fp8\": Input should be 'auto'"),
        ({"max_timestep": 0}, "max_timestep = 0: Input should be greater than or equal to 1"),
        ({"row_norm_cap": 0.0}, "row_norm_cap = 0.0: Input should be greater than 0"),
        ({"lr_decay": 1.5}, "lr_decay = 1.5: Input should be less than or equal to 1"),
        ({"batch_size": True}, "batch_size = true: expected a number, got the boolean True"),
        ({"weight_decay": -1.0}, "weight_decay = -1.0: Input should be greater than or equal"),
    ],
)
def test_bad_settings_are_clear_errors(pipe, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _refiner(pipe, **settings)


def test_from_pretrained_checks_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        TextualInversionLoRARefiner.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="unknown TextualInversionLoRARefiner setting"):
        TextualInversionLoRARefiner.from_pretrained(tmp_path, learning_rate=1.0)


def test_from_pretrained_loads_a_saved_pipeline(tmp_path, images):
    tiny_sdxl_pipeline(seed=0, directory=tmp_path / "model")
    refiner = TextualInversionLoRARefiner.from_pretrained(
        tmp_path / "model", device="cpu", steps=1, **{k: v for k, v in FAST.items()}
    )
    assert refiner.refine(None, images, CAPTIONS, seed=0).token == TOKEN


def test_lora_targets_that_match_nothing_are_a_clear_error(pipe, images):
    before = _state(pipe)
    with pytest.raises(IdentityError, match=r"cannot add a LoRA on \['to_nowhere'\]"):
        _refiner(pipe, target_modules=["to_nowhere"], steps=1).refine(
            None, images, CAPTIONS, seed=0
        )
    _assert_same_state(before, _state(pipe))
    assert not getattr(pipe.unet, "peft_config", None)


@pytest.mark.parametrize("steps, accumulation", [(1, 1), (3, 2)])
def test_every_step_is_reported_once_in_order(pipe, images, steps, accumulation):
    calls: list[tuple[int, int, float]] = []
    identity = _refiner(pipe, steps=steps, gradient_accumulation_steps=accumulation).refine(
        None, images, CAPTIONS, seed=0, callback=lambda s, t, loss: calls.append((s, t, loss))
    )
    assert [(s, t) for s, t, _ in calls] == [(s, steps) for s in range(1, steps + 1)]
    assert all(math.isfinite(loss) and loss > 0 for _, _, loss in calls)
    assert identity.metadata["refiner"]["final_loss"] == calls[-1][2]


def test_compiled_blocks_train_like_eager_and_are_given_back(pipe, images):
    from torch._dynamo.utils import counters

    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in pipe.unet._repeated_blocks]
    assert blocks, "the tiny UNet should have transformer blocks"
    # A block the caller compiled stays compiled after refine; the others stay eager.
    blocks[0].compile(backend="eager")
    callers = blocks[0]._compiled_call_impl
    eager_losses: list[float] = []
    compiled_losses: list[float] = []
    try:
        torch._dynamo.reset()
        counters.clear()
        eager = _refiner(pipe, steps=3).refine(
            None, images, CAPTIONS, seed=0, callback=lambda s, t, x: eager_losses.append(x)
        )
        eager_graphs = counters["stats"]["unique_graphs"]
        compiled = _refiner(pipe, steps=3, compile_blocks=True).refine(
            None, images, CAPTIONS, seed=0, callback=lambda s, t, x: compiled_losses.append(x)
        )
        assert counters["stats"]["unique_graphs"] > eager_graphs, "no block was compiled"
        assert blocks[0]._compiled_call_impl is callers
        assert all(m._compiled_call_impl is None for m in blocks[1:])
    finally:
        blocks[0]._compiled_call_impl = None
    # The same training, up to the kernels' floating-point order.
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    torch.testing.assert_close(compiled.clip_l, eager.clip_l, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled.clip_g, eager.clip_g, rtol=1e-4, atol=1e-6)
    assert compiled.lora is not None and eager.lora is not None
    for key, value in eager.lora.items():
        torch.testing.assert_close(compiled.lora[key], value, rtol=1e-3, atol=1e-4)


def test_compile_blocks_needs_named_repeated_blocks(pipe, monkeypatch):
    monkeypatch.setattr(pipe.unet, "_repeated_blocks", [])
    with pytest.raises(ValueError, match="compile_blocks=True needs a UNet"):
        _refiner(pipe, compile_blocks=True)


# ------------------------------------------------------------------------- CUDA graphs

# Ops that read a device value on the host (a synchronisation), which a CUDA graph cannot
# capture: `float(t)`, `bool(t)`, `t.item()`, boolean-mask indexing and the like.
HOST_READS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::repeat_interleave",
    "aten::_unique2",
    "aten::unique_consecutive",
}


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records what a CUDA graph of the training step depends on, step by step, while `active`:
    every aten op's name, the ops given an explicit `generator` (a CPU generator's draws are
    host work, which a replay would not redo), and each step's *external* inputs: the storages
    an op reads that no op of the same step produced (parameters, buffers, the step's input
    tensors). A replay reads exactly the external storages its capture saw."""

    def __init__(self) -> None:
        super().__init__()
        self.active = True
        self.ops: list[str] = []
        self.seeded_ops: list[str] = []
        self.external: list[set[int]] = []
        self._produced: set[int] = set()

    def begin_step(self) -> None:
        self.external.append(set())
        self._produced = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            self.ops.append(func._schema.name)
            if kwargs.get("generator") is not None:
                self.seeded_ops.append(func._schema.name)
            for ptr in _storages((args, kwargs)):
                if ptr not in self._produced:
                    self.external[-1].add(ptr)
        out = func(*args, **kwargs)
        self._produced |= _storages(out)
        return out


def _storages(tree) -> set[int]:
    leaves = torch.utils._pytree.tree_leaves(tree)
    ptrs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
    return ptrs - {0}


def _record_step_ops(monkeypatch, run) -> _OpRecorder:
    """Runs `run()` with every training step (what `cuda_graphs` captures) under an
    `_OpRecorder`, paused inside `optimizer.step` (AdamW is capturable on CUDA by its own flag,
    which the CPU does not support)."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    from consistent_char.refiners.ti_lora.acceleration import _StepRunner

    recorder = _OpRecorder()
    original = _StepRunner.__call__

    def recorded(self):
        recorder.begin_step()
        with recorder:
            return original(self)

    def pause(*_args):
        recorder.active = False

    def resume(*_args):
        recorder.active = True

    monkeypatch.setattr(_StepRunner, "__call__", recorded)
    handles = [register_optimizer_step_pre_hook(pause), register_optimizer_step_post_hook(resume)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return recorder


def _graph_safety_problems(recorder: _OpRecorder) -> list[str]:
    """What would break a CUDA graph of the step: host reads, host RNG, and external inputs a
    replay (step 5 on) reads that the capture (step 4, after 3 warm-up steps) did not."""
    problems = [f"host read: {op}" for op in sorted({o for o in recorder.ops if o in HOST_READS})]
    problems += [f"seeded draw: {op}" for op in sorted(set(recorder.seeded_ops))]
    capture = recorder.external[3]
    for step, external in enumerate(recorder.external[4:], start=5):
        if external - capture:
            problems.append(
                f"step {step} reads {len(external - capture)} tensor(s) new since the capture"
            )
    return problems


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"batch_size": 2, "gradient_accumulation_steps": 2, "row_norm_cap": 0.5},
        {"mode": "ti", "max_timestep": 500},
        {"mixed_precision": "bf16", "max_grad_norm": None},
    ],
    ids=["defaults", "accumulation-caps", "ti", "bf16-autocast"],
)
def test_training_step_is_safe_to_capture(pipe, images, monkeypatch, settings):
    # What `cuda_graphs` captures is one call of the step: forward of both text encoders and
    # the UNet, the loss, backward, clipping and the row caps. On the CPU the recorder shows
    # what would break a capture or a replay on CUDA.
    recorder = _record_step_ops(
        monkeypatch,
        lambda: _refiner(pipe, steps=6, **settings).refine(None, images, CAPTIONS, seed=0),
    )
    assert len(recorder.external) == 6
    assert len(recorder.ops) > 6 * 500, "the step's ops were not recorded"
    assert "aten::convolution_backward" in recorder.ops and "aten::mse_loss" in recorder.ops
    assert _graph_safety_problems(recorder) == []


def test_graph_safety_check_catches_each_kind_of_problem(pipe, images, monkeypatch):
    # The check above is only as good as the recorder: a step that reads its loss on the host,
    # draws on a CPU generator, or reads a tensor made anew for each step must be caught.
    from consistent_char.refiners.ti_lora import denoising
    from consistent_char.refiners.ti_lora.training import _StepInputs

    original_loss = denoising.sdxl_loss
    original_fill = _StepInputs.fill
    kept: list[torch.Tensor] = []  # no address reused: each new tensor is told apart

    def bad_loss(*args, **kwargs):
        loss = original_loss(*args, **kwargs)
        float(loss)
        torch.randn(2, generator=torch.Generator().manual_seed(0))
        return loss

    def fresh_noise(self, k, indices, noise, timesteps, keep=None):
        kept.append(self.noise)
        self.noise = torch.empty_like(self.noise)
        original_fill(self, k, indices, noise, timesteps, keep)

    monkeypatch.setattr(denoising, "sdxl_loss", bad_loss)
    monkeypatch.setattr(_StepInputs, "fill", fresh_noise)
    recorder = _record_step_ops(
        monkeypatch, lambda: _refiner(pipe, steps=6).refine(None, images, CAPTIONS, seed=0)
    )
    problems = _graph_safety_problems(recorder)
    assert "host read: aten::_local_scalar_dense" in problems
    assert "seeded draw: aten::randn" in problems
    assert any(p.startswith("step 5 reads") for p in problems), problems


def test_step_runner_warms_up_captures_once_then_replays(monkeypatch):
    from consistent_char.refiners.ti_lora.acceleration import _StepRunner

    calls: list[str] = []
    fake_cuda_graphs(monkeypatch, calls)
    counter = {"n": 0}

    def step():
        counter["n"] += 1
        return torch.tensor(float(counter["n"]))

    runner = _StepRunner(step, graphed=True, warmup=3)
    outputs = [runner() for _ in range(6)]
    assert calls == ["warmup"] * 3 + ["capture"]
    assert runner.graph.replays == 3
    assert [float(x) for x in outputs] == [1, 2, 3, 4, 5, 6]
    # Each step's result is a copy: the next replay must not change an earlier step's loss.
    assert all(x is not runner.output for x in outputs)


def test_graphed_refine_trains_like_eager(pipe, images, monkeypatch, caplog):
    # With the graph faked, this checks what the refiner does around it: the warm-up count,
    # the capture, the copies of each step's loss and the inputs refilled before each replay.
    eager_losses: list[float] = []
    graphed_losses: list[float] = []
    settings = {"steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2}
    eager = _refiner(pipe, **settings).refine(
        None, images, CAPTIONS, seed=0, callback=lambda s, t, x: eager_losses.append(x)
    )
    calls: list[str] = []
    fake_cuda_graphs(monkeypatch, calls)
    with caplog.at_level("INFO", logger="consistent_char.refiners.ti_lora"):
        graphed = _refiner(pipe, cuda_graphs=True, **settings).refine(
            None, images, CAPTIONS, seed=0, callback=lambda s, t, x: graphed_losses.append(x)
        )
    assert calls == ["warmup"] * 3 + ["capture"]
    assert "captured the training step in a CUDA graph" in caplog.text
    assert graphed_losses == eager_losses
    assert _same_identity(graphed, eager)


def test_step_runner_goes_on_eagerly_when_the_capture_fails(monkeypatch, caplog):
    from consistent_char.refiners.ti_lora import acceleration

    def capture(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    fake_cuda_graphs(monkeypatch)
    monkeypatch.setattr(acceleration._StepRunner, "_capture", capture)
    values = iter(range(1, 10))
    runner = acceleration._StepRunner(
        lambda: torch.tensor(float(next(values))), graphed=True, warmup=1
    )
    with caplog.at_level("WARNING", logger=acceleration.__name__):
        outputs = [float(runner()) for _ in range(4)]
    assert outputs == [1, 2, 3, 4]
    assert runner.graphed is False and runner.graph is None
    assert "could not capture the training step in a CUDA graph" in caplog.text
    assert "operation not permitted" in caplog.text


def test_cuda_graphs_need_cuda_and_exclude_compiled_blocks(pipe, images):
    with pytest.raises(ValueError, match="cuda_graphs=True needs the pipeline on a CUDA device"):
        _refiner(pipe, steps=1, cuda_graphs=True).refine(None, images, CAPTIONS, seed=0)
    with pytest.raises(ValueError, match="set at most one of cuda_graphs and compile_blocks"):
        _refiner(pipe, cuda_graphs=True, compile_blocks=True)


def test_caption_dropout_trains_some_images_on_the_unconditional_input(pipe, images):
    dropped: list[bool] = []  # per trained image: were both prompt embeddings zero?

    def record(module, args, kwargs):
        hidden = kwargs["encoder_hidden_states"]
        pooled = kwargs["added_cond_kwargs"]["text_embeds"]
        for h, p in zip(hidden, pooled, strict=True):
            assert bool((h == 0).all()) == bool((p == 0).all())  # dropped together or not
            dropped.append(bool((h == 0).all()))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        plain = _refiner(pipe, steps=12, batch_size=2).refine(None, images, CAPTIONS, seed=0)
        assert len(dropped) == 24 and not any(dropped)
        dropped.clear()
        refiner = _refiner(pipe, steps=12, batch_size=2, caption_dropout=0.5)
        with_dropout = refiner.refine(None, images, CAPTIONS, seed=0)
    finally:
        handle.remove()
    assert len(dropped) == 24 and 4 <= sum(dropped) <= 20
    assert not _same_identity(plain, with_dropout)
    assert with_dropout.metadata["refiner"]["caption_dropout"] == 0.5
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="caption_dropout = "):
            _refiner(pipe, caption_dropout=bad)


def test_prior_preservation_trains_on_the_prior_images_too(pipe, images, monkeypatch):
    prior = pipe(
        ["a cat"] * 3,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(10 + i) for i in range(3)],
        output_type="pil",
    ).images
    from consistent_char.refiners.ti_lora import denoising

    seen: list[int] = []
    original = denoising.sdxl_loss

    def spy(unet, state, scheduler, batch, *args, **kwargs):
        seen.append(len(batch))
        return original(unet, state, scheduler, batch, *args, **kwargs)

    plain = _refiner(pipe, steps=3).refine(None, images, CAPTIONS, seed=0)
    # Weight 0 or no prior images: exactly the paper's loss, prior images ignored.
    off = _refiner(pipe, steps=3).refine(
        None, images, CAPTIONS, seed=0, prior_images=prior, prior_captions=["a cat"] * 3
    )
    assert _same_identity(plain, off)
    monkeypatch.setattr(denoising, "sdxl_loss", spy)
    refiner = _refiner(pipe, steps=3, prior_preservation=1.0, batch_size=2)
    with_prior = refiner.refine(
        None, images, CAPTIONS, seed=0, prior_images=prior, prior_captions=["a cat"] * 3
    )
    assert seen == [2, 2] * 3  # every step: a batch of the identity's, then one of the prior's
    assert not _same_identity(plain, with_prior)
    assert with_prior.metadata["refiner"]["prior_preservation"] == 1.0
    with pytest.raises(ValueError, match="without the identity's token"):
        refiner.refine(
            None, images, CAPTIONS, seed=0, prior_images=prior, prior_captions=CAPTIONS[:3]
        )
    with pytest.raises(ValueError, match="prior captions"):
        refiner.refine(None, images, CAPTIONS, seed=0, prior_images=prior)
    with pytest.raises(ValueError, match="prior_preservation = -1.0: Input should be greater"):
        _refiner(pipe, prior_preservation=-1.0)
