"""Embedders on tiny randomly initialised models built from configs: no download."""

from __future__ import annotations

import json
import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    BitImageProcessor,
    CLIPConfig,
    CLIPModel,
    Dinov2Model,
)

from consistent_char.embedders import (  # noqa: E402
    CLIPImageEmbedder,
    DINOEmbedder,
    DINOv2Embedder,
    PixelEmbedder,
)
from consistent_char.embedders._preprocess import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    HFImageProcessor,
    ResizeCropNormalize,
)
from consistent_char.testing.conformance import sample_images  # noqa: E402
from consistent_char.testing.tiny import tiny_clip_vision, tiny_dinov2, tiny_vit  # noqa: E402


@pytest.fixture(scope="module")
def dinov2_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny DINOv2 twice: with the hub's preprocessor config (resize 256 → crop 224,
    scaled to 32 → 28) and without one."""
    model = tiny_dinov2()
    with_processor = tmp_path_factory.mktemp("dinov2_processor")
    without = tmp_path_factory.mktemp("dinov2_bare")
    model.save_pretrained(with_processor)
    model.save_pretrained(without)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(with_processor)
    return with_processor, without


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return sample_images(5)


def _cls(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 0].numpy()


# ------------------------------------------------------------------------------ DINOv2


def test_dinov2_from_pretrained_embeds_cls_after_final_layernorm(
    dinov2_dirs: tuple[Path, Path], images: list[Image.Image]
) -> None:
    embedder = DINOv2Embedder.from_pretrained(dinov2_dirs[0])
    out = embedder.embed(images)
    assert out.shape == (5, 32) and out.dtype == np.float32
    assert isinstance(embedder.preprocess, HFImageProcessor)

    model = embedder.model
    pixels = embedder.preprocess(images)
    with torch.no_grad():
        o = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    np.testing.assert_allclose(out, o.last_hidden_state[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, o.pooler_output.numpy(), rtol=1e-5, atol=1e-6)
    # The last hidden state is the final layer norm's output, not the raw last block's.
    assert not np.allclose(out, o.hidden_states[-1][:, 0].numpy(), atol=1e-3)


# facebook/dinov2-large's preprocessor_config.json: shortest edge 256, bicubic, center crop 224.
DINOV2_PROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


def _detailed_image(width: int, height: int, seed: int) -> Image.Image:
    """A gradient with noise and a sharp-edged block: resampling, crop offsets and
    normalisation all show in its pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([xx / width * 255, yy / height * 255, (xx + yy) % 64 * 4], axis=-1)
    pixels += rng.normal(0, 30, pixels.shape)
    pixels[height // 3 : height // 2, width // 4 : width // 2] = (250, 10, 120)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def test_builtin_preprocessing_matches_the_dinov2_processor(tmp_path: Path) -> None:
    # At DINOv2's real sizes (256 -> 224) on non-square images whose resized long edge is not a
    # whole number of pixels (301 x 203 -> 379.6 x 256), where rounding, resampling, crop offset
    # or normalisation differences change the pixels; the model is tiny, the sizes are real.
    model = tiny_dinov2(image_size=224)
    with_processor, bare = tmp_path / "with_processor", tmp_path / "bare"
    model.save_pretrained(with_processor)
    model.save_pretrained(bare)
    (with_processor / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR_CONFIG))
    images = [
        _detailed_image(301, 203, seed=0),
        _detailed_image(203, 301, seed=1),
        _detailed_image(97, 61, seed=2),
        _detailed_image(640, 480, seed=3),
    ]

    reference = DINOv2Embedder.from_pretrained(with_processor)
    builtin = DINOv2Embedder.from_pretrained(bare)
    assert isinstance(reference.preprocess, HFImageProcessor)
    assert builtin.preprocess == ResizeCropNormalize(224)
    expected = reference.preprocess(images)
    assert expected.shape == (4, 3, 224, 224)
    np.testing.assert_allclose(builtin.preprocess(images), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(builtin.embed(images), reference.embed(images), rtol=0, atol=1e-5)


def test_a_folder_without_a_processor_config_warns_of_the_size_it_falls_back_to(
    dinov2_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with_processor, bare = dinov2_dirs
    with caplog.at_level(logging.WARNING, logger="consistent_char.embedders"):
        DINOv2Embedder.from_pretrained(bare)
    assert f"{bare} has no preprocessor_config.json" in caplog.text
    assert "center crop to 28 pixels" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="consistent_char.embedders"):
        DINOv2Embedder.from_pretrained(with_processor)
    assert "preprocessor_config.json" not in caplog.text


def test_resize_crop_normalize_handles_modes_and_aspect() -> None:
    pre = ResizeCropNormalize(size=8)
    gray = Image.new("L", (40, 10), 255)
    rgba = Image.new("RGBA", (10, 40), (255, 255, 255, 0))
    out = pre([gray, rgba])
    assert out.shape == (2, 3, 8, 8) and out.dtype == np.float32
    white = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[:, :, 4, 4], np.stack([white, white]), rtol=1e-5)
    with pytest.raises(ValueError, match="size must be a positive"):
        ResizeCropNormalize(size=0)


def test_batch_size_does_not_change_embeddings(
    dinov2_dirs: tuple[Path, Path], images: list[Image.Image]
) -> None:
    one_batch = DINOv2Embedder.from_pretrained(dinov2_dirs[1]).embed(images)
    batched = DINOv2Embedder.from_pretrained(dinov2_dirs[1], batch_size=2).embed(images)
    np.testing.assert_allclose(batched, one_batch, rtol=1e-5, atol=1e-6)


def test_dtype_option_keeps_float32_output(
    dinov2_dirs: tuple[Path, Path], images: list[Image.Image]
) -> None:
    embedder = DINOv2Embedder.from_pretrained(dinov2_dirs[1], dtype="bfloat16")
    assert embedder.dtype == torch.bfloat16 and embedder.device == torch.device("cpu")
    out = embedder.embed(images[:2])
    assert out.dtype == np.float32 and out.shape == (2, 32)
    reference = DINOv2Embedder.from_pretrained(dinov2_dirs[1]).embed(images[:2])
    np.testing.assert_allclose(out, reference, atol=0.1)
    assert embedder.to(dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        DINOv2Embedder.from_pretrained(dinov2_dirs[1], dtype="int8")


def test_missing_local_model_is_a_clear_error_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("from_pretrained must not be reached")

    monkeypatch.setattr(Dinov2Model, "from_pretrained", no_loading)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DINOv2Embedder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"'\./missing' does not exist"):
        DINOv2Embedder.from_pretrained("./missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DINOv2Embedder.from_pretrained(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        DINOv2Embedder.from_pretrained(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        DINOv2Embedder.from_pretrained("facebook/dinov2-large", batch_size=0)


def test_from_model_preprocessing_choices(images: list[Image.Image]) -> None:
    model = tiny_dinov2()
    default = DINOv2Embedder.from_model(model)
    assert default.preprocess == ResizeCropNormalize(28)
    assert DINOv2Embedder.from_model(model, image_size=42).preprocess == ResizeCropNormalize(42)

    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    wrapped = DINOv2Embedder.from_model(model, processor)
    assert isinstance(wrapped.preprocess, HFImageProcessor)
    np.testing.assert_array_equal(wrapped.embed(images), default.embed(images))

    calls: list[int] = []

    def own(batch: list[Image.Image]) -> np.ndarray:
        calls.append(len(batch))
        return ResizeCropNormalize(28)(batch)

    custom = DINOv2Embedder.from_model(model, own, batch_size=2)
    np.testing.assert_allclose(custom.embed(images), default.embed(images), rtol=1e-5, atol=1e-6)
    assert calls == [2, 2, 1]
    with pytest.raises(TypeError, match="processor must be"):
        DINOv2Embedder.from_model(model, processor=42)


def test_embed_input_checks(images: list[Image.Image]) -> None:
    embedder = DINOv2Embedder.from_model(tiny_dinov2())
    empty = embedder.embed([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL.Image.Image, got ndarray"):
        embedder.embed([images[0], np.zeros((4, 4, 3))])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single PIL image"):
        embedder.embed(images[0])  # type: ignore[arg-type]


# ------------------------------------------------------------------------- DINO and CLIP


def test_dino_v1_cls_embedding(tmp_path: Path, images: list[Image.Image]) -> None:
    tiny_vit().save_pretrained(tmp_path)
    embedder = DINOEmbedder.from_pretrained(tmp_path)
    out = embedder.embed(images)
    assert out.shape == (5, 32) and out.dtype == np.float32
    assert embedder.model.pooler is None
    assert embedder.preprocess == ResizeCropNormalize(32)
    np.testing.assert_allclose(
        out, _cls(embedder.model, embedder.preprocess(images)), rtol=1e-5, atol=1e-6
    )


def test_clip_image_embeds(tmp_path: Path, images: list[Image.Image]) -> None:
    tiny_clip_vision().save_pretrained(tmp_path)
    embedder = CLIPImageEmbedder.from_pretrained(tmp_path)
    out = embedder.embed(images)
    assert out.shape == (5, 16) and out.dtype == np.float32
    with torch.no_grad():
        expected = embedder.model(pixel_values=torch.from_numpy(embedder.preprocess(images)))
    np.testing.assert_allclose(out, expected.image_embeds.numpy(), rtol=1e-5, atol=1e-6)


def test_clip_embedder_reads_the_vision_half_of_a_full_clip_checkpoint(
    tmp_path: Path, images: list[Image.Image]
) -> None:
    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=12,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    embedder = CLIPImageEmbedder.from_pretrained(tmp_path)
    out = embedder.embed(images)
    assert out.shape == (5, 12)
    with torch.no_grad():
        expected = full.get_image_features(
            pixel_values=torch.from_numpy(embedder.preprocess(images))
        )
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ pixels


def test_pixel_embedder_values() -> None:
    red = Image.new("RGB", (32, 16), (255, 0, 0))
    half = Image.new("L", (8, 8), 0)
    half.paste(255, (0, 0, 4, 8))  # left half white: each 2x2 box is uniform
    out = PixelEmbedder(size=2).embed([red, half])
    assert out.shape == (2, 12) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], np.tile([1.0, 0.0, 0.0], 4))
    np.testing.assert_array_equal(out[1], np.repeat([1.0, 0.0, 1.0, 0.0], 3))
    gray = PixelEmbedder(size=3, grayscale=True)
    assert gray.embedding_dim == 9 and gray.embed([red]).shape == (1, 9)
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        PixelEmbedder(size=0)
