"""Local editing with an identity (Blended Latent Diffusion): the library, the stock diffusers
recipe of docs/applications.md and the ``edit`` command, on tiny components (the command's bad
inputs are rows of tests/test_cli_errors.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from typer.testing import CliRunner

from consistent_char.cli import app
from consistent_char.config import ConfigError
from consistent_char.edit import (
    binary_mask,
    blended_edit,
    inpainting_pipeline,
    latent_block_mask,
)
from consistent_char.errors import InvalidValueError
from consistent_char.generators.sdxl import SDXLGenerator
from consistent_char.testing import tiny_identity

TOKEN = "<fox>"
SIZE = 32


@pytest.fixture(scope="module")
def pipe(model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def identity(pipe):
    return tiny_identity(pipe, TOKEN, seed=3)


@pytest.fixture
def gen(pipe):
    return SDXLGenerator.from_pipeline(pipe, num_inference_steps=2, guidance_scale=3.0)


def _scene(seed: int = 0, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _box(size: int = SIZE, box: tuple[int, int, int, int] = (8, 8, 24, 24)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


# ------------------------------------------------------------------ identity on other pipelines


@pytest.mark.parametrize("kind", ["inpaint", "img2img"])
def test_identity_applies_to_inpaint_and_img2img_pipelines_and_leaves_them_clean(
    pipe, identity, kind
):
    if kind == "inpaint":
        other = inpainting_pipeline(pipe)
        call = {"image": _scene(), "mask_image": _box(), "strength": 1.0}
    else:
        other = StableDiffusionXLImg2ImgPipeline(**pipe.components)
        call = {"image": _scene(), "strength": 0.8}
    other.set_progress_bar_config(disable=True)

    def draw():
        g = torch.Generator().manual_seed(4)
        out = other(f"a {TOKEN}", num_inference_steps=2, generator=g, output_type="np", **call)
        return out.images[0]

    before = draw()
    vocab = dict(other.tokenizer_2.get_vocab())
    identity.apply_to(other)
    try:
        assert TOKEN in other.tokenizer.get_vocab() and TOKEN in other.tokenizer_2.get_vocab()
        assert identity.adapter_name in other.get_active_adapters()
        with_identity = draw()
    finally:
        identity.remove_from(other)
    assert dict(other.tokenizer_2.get_vocab()) == vocab
    assert not getattr(other.unet, "peft_config", None)
    assert not np.array_equal(with_identity, before), "the identity changed nothing"
    assert np.array_equal(draw(), before), "remove_from left the pipeline changed"


def test_the_inpainting_pipeline_shares_the_components_and_keeps_their_dtype(pipe):
    pipe.to(torch.bfloat16)
    try:
        inpaint = inpainting_pipeline(pipe)
        assert inpaint.unet is pipe.unet and inpaint.text_encoder_2 is pipe.text_encoder_2
        assert pipe.unet.dtype == torch.bfloat16, "building it cast the caller's pipeline"
        assert inpaint.config.requires_aesthetics_score is False
    finally:
        pipe.to(torch.float32)


# ------------------------------------------------------------------------------- the library


def test_blended_edit_keeps_every_pixel_outside_the_mask_and_redraws_inside(gen, identity):
    scene, mask = _scene(), _box()
    [edited] = blended_edit(gen, [scene], [mask], [f"{TOKEN} in the snow"], [1], identity)
    inside = np.asarray(mask) > 0
    assert edited.size == scene.size
    assert np.array_equal(_px(edited)[~inside], _px(scene)[~inside])
    assert np.abs(_px(edited)[inside] - _px(scene)[inside]).mean() > 10


def test_the_identity_changes_the_edit_and_leaves_the_generator_as_it_was(gen, identity, pipe):
    vocab = dict(pipe.tokenizer.get_vocab())
    scheduler = pipe.scheduler
    args = ([_scene()], [_box()], [f"{TOKEN} in the snow"], [1])
    plain = blended_edit(gen, *args)[0]
    edited = blended_edit(gen, *args, identity)[0]
    assert not np.array_equal(_px(plain), _px(edited))
    assert dict(pipe.tokenizer.get_vocab()) == vocab and pipe.scheduler is scheduler
    assert not getattr(pipe.unet, "peft_config", None)


def test_each_edit_depends_only_on_its_own_seed(gen, identity):
    scenes = [_scene(0), _scene(1), _scene(2)]
    masks = [_box(), _box(box=(0, 0, 16, 32)), _box(box=(10, 4, 30, 20))]
    prompts = [f"{TOKEN} in the snow", f"{TOKEN} at the beach", f"a {TOKEN}"]
    together = blended_edit(gen, scenes, masks, prompts, [5, 6, 7], identity)
    alone = blended_edit(gen, scenes[1:2], masks[1:2], prompts[1:2], [6], identity)
    other_seed = blended_edit(gen, scenes[1:2], masks[1:2], prompts[1:2], [8], identity)
    # A batched matmul may round differently from a single one: allow one grey level.
    assert np.abs(_px(together[1]) - _px(alone[0])).max() <= 1
    # ... while another seed differs far more than that.
    assert np.abs(_px(other_seed[0]) - _px(alone[0])).max() > 10


def test_images_of_different_sizes_are_edited_in_one_call(gen):
    scenes = [_scene(0, 32), _scene(1, 48), _scene(2, 32)]
    masks = [_box(32), _box(48, (8, 8, 40, 40)), _box(32)]
    edited = blended_edit(gen, scenes, masks, ["a fox"] * 3, [1, 2, 3])
    assert [im.size for im in edited] == [(32, 32), (48, 48), (32, 32)]
    for scene, mask, im in zip(scenes, masks, edited, strict=True):
        inside = np.asarray(mask) > 0
        assert np.array_equal(_px(im)[~inside], _px(scene)[~inside])


def test_a_thin_mask_reaches_the_latents():
    line = np.zeros((SIZE, SIZE), dtype=bool)
    line[:, 13] = True  # one pixel wide: nearest-neighbour shrinking by 2 would keep no column
    grown = np.asarray(latent_block_mask(line, 2)) > 0
    assert grown[:, 12:14].all() and grown.sum() == 2 * SIZE


def test_a_thin_mask_is_redrawn_in_the_latents_the_pipeline_uses(gen, mask_latents):
    used = mask_latents
    scene = _scene()
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (13, 0, 14, SIZE))  # one pixel wide, in latent column 6
    [edited] = blended_edit(gen, [scene], [mask], ["a fox"], [3])
    [latent_mask] = used
    assert latent_mask.shape[-2:] == (SIZE // 2, SIZE // 2)
    assert (latent_mask[:, 0, :, 6] == 1).all() and latent_mask.sum() == latent_mask.shape[0] * 16
    inside = np.asarray(mask) > 0
    assert np.array_equal(_px(edited)[~inside], _px(scene)[~inside])


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (_box(size=16), "masks[0] is 16x16 pixels but the image is 32x32"),
        (Image.new("L", (SIZE, SIZE), 100), "masks[0] is empty"),
        (Image.new("L", (SIZE, SIZE), 200), "masks[0] is full"),
        (Image.new("RGBA", (SIZE, SIZE)), "masks[0] has mode RGBA"),
        (np.ones((SIZE, SIZE)), "masks[0] must be a PIL image, got ndarray"),
    ],
    ids=["wrong-size", "empty", "full", "mode", "not-an-image"],
)
def test_a_bad_mask_is_refused_before_drawing(gen, mask, message):
    with pytest.raises(InvalidValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        blended_edit(gen, [_scene()], [mask], ["a fox"], [0])


def test_masks_are_binarised_at_half_in_every_accepted_mode():
    grey = Image.fromarray(np.array([[127, 128] * 4] * 8, dtype=np.uint8))
    expected = np.array([[False, True] * 4] * 8)
    for mode in ("L", "RGB"):
        assert np.array_equal(binary_mask(grey.convert(mode), (8, 8)), expected)
    black_and_white = Image.fromarray(expected)
    assert black_and_white.mode == "1"
    assert np.array_equal(binary_mask(black_and_white, (8, 8)), expected)


def test_bad_images_lengths_and_strength_are_refused(gen):
    with pytest.raises(InvalidValueError, match="multiples of 8"):
        blended_edit(gen, [_scene(size=30)], [_box(size=30)], ["a fox"], [0])
    with pytest.raises(InvalidValueError, match="one image and one mask per prompt"):
        blended_edit(gen, [_scene()], [_box()], ["a fox", "a cat"], [0, 1])
    with pytest.raises(ConfigError, match="strength"):
        blended_edit(gen, [_scene()], [_box()], ["a fox"], [0], strength=0.0)


# ------------------------------------------------------------------- stock diffusers (the docs)


def test_the_docs_recipe_with_stock_diffusers_keeps_the_outside(model_dir, identity):
    init, mask = _scene(), _box()
    # docs/applications.md's recipe: an inpainting pipeline from the base model, the identity,
    # overlay.
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(model_dir))
    identity.apply_to(pipe)
    image = pipe(f"{TOKEN} in the snow", image=init, mask_image=mask, strength=1.0,
                 num_inference_steps=2).images[0]  # fmt: skip
    image = pipe.image_processor.apply_overlay(mask, init, image)
    inside = np.asarray(mask) > 0
    assert np.array_equal(_px(image)[~inside], _px(init)[~inside])
    assert np.abs(_px(image)[inside] - _px(init)[inside]).mean() > 10


def test_stock_diffusers_loading_on_the_inpainting_pipeline_matches_apply_to(
    model_dir, identity, tmp_path
):
    from safetensors.torch import load_file

    folder = identity.save(tmp_path / "identity")
    init, mask = _scene(), _box()

    def edit(pipe):
        g = torch.Generator().manual_seed(2)
        call = {"image": init, "mask_image": mask, "strength": 1.0, "num_inference_steps": 2}
        return _px(pipe(f"{TOKEN} in the snow", generator=g, **call).images[0])

    # using.md's plain diffusers calls, on an inpainting pipeline.
    stock = StableDiffusionXLInpaintPipeline.from_pretrained(str(model_dir))
    stock.load_lora_weights(str(folder))
    emb = load_file(str(folder / "embeddings.safetensors"))
    stock.load_textual_inversion(
        emb["clip_l"], token=TOKEN, text_encoder=stock.text_encoder, tokenizer=stock.tokenizer
    )
    stock.load_textual_inversion(
        emb["clip_g"], token=TOKEN, text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2
    )
    ours = StableDiffusionXLInpaintPipeline.from_pretrained(str(model_dir))
    plain = edit(ours)
    identity.apply_to(ours)
    assert np.array_equal(edit(stock), edit(ours))
    assert not np.array_equal(edit(ours), plain), "the identity changed nothing"


# ------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def files(model_dir, pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_files")
    identity = tiny_identity(pipe, TOKEN, seed=3)
    identity.metadata = {"base_model": str(model_dir)}
    identity.save(root / "identity")
    _scene().save(root / "scene.png")
    _box().save(root / "mask.png")
    return root


def _edit(files, out, *extra):
    args = ["edit", str(files / "identity"), str(files / "scene.png"), *extra, "--out", str(out)]
    return CliRunner().invoke(app, [*args, "--steps", "1", "--device", "cpu"])


def test_edit_command_writes_one_image_per_prompt_and_seed(files, tmp_path):
    out = tmp_path / "out"
    result = _edit(
        files, out, "{token} in the snow", "a {token}", "--mask", str(files / "mask.png"), "-n", "2"
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000_seed0.png", "001_seed1.png", "002_seed0.png", "003_seed1.png"]
    assert f"{out / '000_seed0.png'}  ←  {TOKEN} in the snow" in result.output.splitlines()
    inside = np.asarray(Image.open(files / "mask.png")) > 0
    scene = _px(Image.open(files / "scene.png"))
    for name in names:
        edited = _px(Image.open(out / name))
        assert np.array_equal(edited[~inside], scene[~inside]), name
    assert not np.array_equal(_px(Image.open(out / names[0])), _px(Image.open(out / names[1])))
