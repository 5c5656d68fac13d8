"""Identity files, and that a stock diffusers user can load them without this library."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from consistent_char.generators import SDXLGenerator
from consistent_char.identity import (
    EMBEDDINGS_FILE,
    IDENTITY_JSON,
    LORA_FILE,
    Identity,
    IdentityError,
)
from consistent_char.refiners import TextualInversionLoRARefiner
from consistent_char.testing import tiny_identity

TOKEN = "<fox>"
PROMPTS = [f"a photo of {TOKEN} in the snow", f"{TOKEN} at night in the city"]
SEEDS = [11, 12]
STEPS = 3


@pytest.fixture(scope="module")
def pipe(model_dir):
    return _stock_pipeline(model_dir)


def _stock_pipeline(model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same(a: Identity, b: Identity) -> None:
    assert a.token == b.token
    assert torch.equal(a.clip_l, b.clip_l) and torch.equal(a.clip_g, b.clip_g)
    assert (a.lora_rank, a.lora_alpha, list(a.target_modules)) == (
        b.lora_rank,
        b.lora_alpha,
        list(b.target_modules),
    )
    assert (a.lora is None) == (b.lora is None)
    if a.lora is not None and b.lora is not None:
        assert a.lora.keys() == b.lora.keys()
        for key in a.lora:
            assert torch.equal(a.lora[key], b.lora[key]), key


def _arrays(images):
    return [np.asarray(im).astype(np.int16) for im in images]


def test_save_load_round_trip(pipe, tmp_path):
    identity = tiny_identity(pipe, TOKEN, seed=1, num_vectors=2, lora_rank=2, lora_alpha=3.0)
    identity.metadata = {"prompt": "a fox", "history": [{"iteration": 0, "spread": 1.5}]}
    directory = identity.save(tmp_path / "identity")
    assert {p.name for p in directory.iterdir()} == {IDENTITY_JSON, LORA_FILE, EMBEDDINGS_FILE}
    loaded = Identity.load(directory)
    _same(identity, loaded)
    assert loaded.metadata == identity.metadata
    # The embeddings file is the SDXL textual-inversion format.
    embeddings = load_file(str(directory / EMBEDDINGS_FILE))
    assert set(embeddings) == {"clip_l", "clip_g"}
    assert embeddings["clip_l"].shape == (2, 32) and embeddings["clip_g"].shape == (2, 48)
    # Saving again over it replaces it whole.
    identity.save(directory)
    _same(identity, Identity.load(directory))


def test_textual_inversion_only_round_trip(pipe, tmp_path):
    identity = tiny_identity(pipe, TOKEN, seed=1, with_lora=False)
    directory = identity.save(tmp_path / "identity")
    assert not (directory / LORA_FILE).exists()
    loaded = Identity.load(directory)
    assert loaded.lora is None
    _same(identity, loaded)


def test_load_errors_are_clear(tmp_path, pipe):
    with pytest.raises(IdentityError, match="not an identity directory"):
        Identity.load(tmp_path)
    directory = tiny_identity(pipe, TOKEN).save(tmp_path / "identity")
    (directory / LORA_FILE).unlink()
    with pytest.raises(IdentityError, match="LoRA but pytorch_lora_weights.safetensors is missing"):
        Identity.load(directory)


def _stock_generate(model_dir, identity_dir):
    """What a diffusers user does with the files: no consistent_char import involved."""
    pipe = _stock_pipeline(model_dir)
    info = json.loads((identity_dir / IDENTITY_JSON).read_text())
    state = load_file(str(identity_dir / EMBEDDINGS_FILE))
    pipe.load_lora_weights(str(identity_dir))
    pipe.load_textual_inversion(
        state["clip_l"],
        token=info["token"],
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )
    pipe.load_textual_inversion(
        state["clip_g"],
        token=info["token"],
        text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2,
    )
    images = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images
    return pipe, images


@pytest.fixture(scope="module")
def library(model_dir):
    return SDXLGenerator.from_pretrained(
        model_dir, device="cpu", num_inference_steps=STEPS, guidance_scale=7.5
    )


@pytest.mark.parametrize("source", ["random", "refined"])
def test_stock_diffusers_loading_gives_the_library_images(
    model_dir, pipe, library, tmp_path, source
):
    if source == "random":
        # alpha != rank, and two vectors per encoder: the parts a loader most easily drops.
        identity = tiny_identity(pipe, TOKEN, seed=5, num_vectors=2, lora_rank=4, lora_alpha=8.0)
    else:
        images = pipe(["a red fox"] * 2, num_inference_steps=2, output_type="pil").images
        refiner = TextualInversionLoRARefiner.from_pipeline(
            pipe, token=TOKEN, initializer_token="fox", steps=4, lora_lr=5e-2, lora_alpha=8.0
        )
        identity = refiner.refine(None, images, [f"a {TOKEN}"] * 2, seed=0)
    identity_dir = identity.save(tmp_path / "identity")

    ours = library.generate(PROMPTS, SEEDS, identity=Identity.load(identity_dir))
    stock_pipe, stock = _stock_generate(model_dir, identity_dir)
    plain = library.generate(PROMPTS, SEEDS)

    assert stock_pipe.unet.peft_config["default_0"].lora_alpha == 8.0
    for a, b, c in zip(_arrays(ours), _arrays(stock), _arrays(plain), strict=True):
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c), "the identity changed nothing: the test is blind"


def test_lora_alpha_survives_the_library_apply_path(pipe):
    identity = tiny_identity(pipe, TOKEN, seed=5, lora_rank=4, lora_alpha=8.0)
    same_rank = tiny_identity(pipe, TOKEN, seed=5, lora_rank=4, lora_alpha=4.0)
    gen = SDXLGenerator.from_pipeline(pipe, num_inference_steps=2)
    identity.apply_to(pipe)
    try:
        assert pipe.unet.peft_config[identity.adapter_name].lora_alpha == 8.0
    finally:
        identity.remove_from(pipe)
    a = _arrays(gen.generate(PROMPTS[:1], SEEDS[:1], identity=identity))
    b = _arrays(gen.generate(PROMPTS[:1], SEEDS[:1], identity=same_rank))
    assert not np.array_equal(a[0], b[0])


def test_apply_then_remove_leaves_the_pipeline_identical(pipe):
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    state = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in names}
    types = {n: [type(m) for m in getattr(pipe, n).modules()] for n in names}
    vocab = (dict(pipe.tokenizer.get_vocab()), dict(pipe.tokenizer_2.get_vocab()))
    rng = torch.get_rng_state()
    identity = tiny_identity(pipe, TOKEN, seed=2, num_vectors=3)
    identity.apply_to(pipe)
    assert {TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"} <= set(pipe.tokenizer.get_vocab())
    identity.remove_from(pipe)
    assert torch.equal(torch.get_rng_state(), rng), "apply_to moved the global RNG"
    assert (dict(pipe.tokenizer.get_vocab()), dict(pipe.tokenizer_2.get_vocab())) == vocab
    assert {n: [type(m) for m in getattr(pipe, n).modules()] for n in names} == types
    for n in names:
        after = getattr(pipe, n).state_dict()
        assert after.keys() == state[n].keys()
        assert all(torch.equal(after[k], v) for k, v in state[n].items()), n


def test_wrong_widths_are_a_clear_error(pipe):
    good = tiny_identity(pipe, TOKEN)
    # An SDXL identity (768, 1280) on this 32/48-wide model.
    full_size = Identity(token=TOKEN, clip_l=torch.zeros(1, 768), clip_g=torch.zeros(1, 1280))
    with pytest.raises(
        IdentityError, match=r"clip_l vectors of width 768.*text_encoder expects 32"
    ):
        full_size.apply_to(pipe)
    swapped = Identity(token=TOKEN, clip_l=good.clip_g, clip_g=good.clip_l)
    with pytest.raises(IdentityError, match="width 48, but the pipeline's text_encoder expects 32"):
        swapped.check_fits(pipe)
    assert TOKEN not in pipe.tokenizer.get_vocab()


def test_apply_is_all_or_nothing(model_dir):
    pipe = _stock_pipeline(model_dir)
    identity = tiny_identity(pipe, TOKEN)
    # Only the second tokenizer already holds the token: apply_to must fail and add nothing.
    pipe.tokenizer_2.add_tokens([TOKEN])
    with pytest.raises(IdentityError, match="already in the pipeline's tokenizer"):
        identity.apply_to(pipe)
    assert TOKEN not in pipe.tokenizer.get_vocab()
    assert not getattr(pipe.unet, "peft_config", None)
