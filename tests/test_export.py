"""kohya export for A1111 / ComfyUI: key format, exact round trip, and diffusers reads it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from typer.testing import CliRunner

from consistent_char.cli import app
from consistent_char.export import (
    ExportError,
    _from_kohya,
    _to_kohya,
    embedding_path,
    export_kohya,
    import_kohya,
)
from consistent_char.identity import Identity
from consistent_char.testing import tiny_identity, tiny_sdxl_pipeline

KOHYA_KEY = re.compile(r"^lora_unet_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def identity(pipe) -> Identity:
    # alpha != rank, so a writer that drops alpha (diffusers writes alpha = rank) is caught.
    ident = tiny_identity(pipe, "<fox>", seed=3, num_vectors=2, lora_rank=4, lora_alpha=8.0)
    ident.metadata = {"prompt": "a fox", "base_model": "toy"}
    return ident


def test_export_writes_kohya_keys_and_sdxl_embeddings(identity, tmp_path):
    lora_file, emb_file = export_kohya(identity, tmp_path / "fox.safetensors")
    assert lora_file == tmp_path / "fox.safetensors"
    assert emb_file == tmp_path / "fox_emb.safetensors" == embedding_path(lora_file)

    with safe_open(str(lora_file), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = [f.get_tensor(k) for k in keys if k.endswith(".alpha")]
    assert keys and all(KOHYA_KEY.match(k) for k in keys), keys[:3]
    # One down, one up and one alpha per wrapped module.
    assert len(keys) == 3 * len(identity.lora) // 2
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    assert all(a.ndim == 0 and float(a) == 8.0 for a in alphas)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"

    with safe_open(str(emb_file), framework="pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"}
        assert tuple(f.get_tensor("clip_l").shape) == (2, 32)
        assert tuple(f.get_tensor("clip_g").shape) == (2, 48)


def test_export_then_import_gives_back_every_tensor(identity, tmp_path):
    lora_file, emb_file = export_kohya(identity, tmp_path / "fox.safetensors")
    back = import_kohya(lora_file, emb_file)

    assert back.token == identity.token
    assert (back.lora_rank, back.lora_alpha) == (identity.lora_rank, identity.lora_alpha)
    assert back.target_modules == identity.target_modules
    assert back.metadata == identity.metadata
    assert torch.equal(back.clip_l, identity.clip_l)
    assert torch.equal(back.clip_g, identity.clip_g)
    assert back.lora is not None and identity.lora is not None
    assert back.lora.keys() == identity.lora.keys()
    for key, tensor in identity.lora.items():
        assert back.lora[key].dtype == tensor.dtype
        assert torch.equal(back.lora[key], tensor), key
    # Without the metadata (a file from another tool), the rest is inferred from the tensors.
    bare = import_kohya(lora_file, emb_file, token="<other>")
    assert bare.token == "<other>" and bare.lora_alpha == 8.0


def test_full_size_sdxl_lora_keys_round_trip():
    # The tiny UNet has one transformer block per attention; full-size SDXL has up to 10, whose
    # names ("transformer_blocks_9") must survive the "." → "_" of kohya keys. Keys only: the
    # UNet is built on the meta device, so no memory or time is spent on weights.
    from accelerate import init_empty_weights

    config = {
        "sample_size": 128,
        "cross_attention_dim": 2048,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    lora = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(
            ("to_q", "to_k", "to_v", "to_out.0")
        ):
            lora[f"{name}.lora_A.weight"] = torch.zeros(1, 1)
            lora[f"{name}.lora_B.weight"] = torch.zeros(1, 1)
    assert len(lora) == 2 * 4 * 2 * 70  # 70 transformer blocks × 2 attentions × 4 projections
    ident = Identity(
        token="<x>", clip_l=torch.zeros(1, 768), clip_g=torch.zeros(1, 1280), lora=lora
    )
    back, _ = _from_kohya(_to_kohya(ident))
    assert set(back) == set(lora)


def test_a_lora_on_unnamed_modules_is_refused_before_writing(pipe, tmp_path):
    ident = tiny_identity(pipe, "<fox>", with_lora=False)
    # kohya keys turn every "." into "_": a module name with its own "_" cannot come back.
    ident.lora = {"down_blocks.1.my_layer.lora_A.weight": torch.zeros(4, 8)}
    ident.lora["down_blocks.1.my_layer.lora_B.weight"] = torch.zeros(8, 4)
    with pytest.raises(ExportError, match="do not read back"):
        export_kohya(ident, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_stock_diffusers_draws_the_export_like_the_identity(pipe, identity, tmp_path):
    """diffusers reads A1111-style files with its own converter: the exported files must draw
    exactly what the identity draws when the library applies it."""
    lora_file, emb_file = export_kohya(identity, tmp_path / "fox.safetensors")
    prompt = f"a photo of {identity.token} in the snow"

    def draw() -> np.ndarray:
        out = pipe(
            prompt,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
        )
        return out.images[0]

    identity.apply_to(pipe)
    try:
        expected = draw()
    finally:
        identity.remove_from(pipe)

    from safetensors.torch import load_file

    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.load_lora_weights(load_file(str(lora_file)), adapter_name="kohya")
    emb = load_file(str(emb_file))
    token = identity.token
    pipe.load_textual_inversion(
        emb["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        emb["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    try:
        got = draw()
    finally:
        pipe.unload_textual_inversion(identity.tokens, pipe.tokenizer, pipe.text_encoder)
        pipe.unload_textual_inversion(identity.tokens, pipe.tokenizer_2, pipe.text_encoder_2)
        pipe.delete_adapters("kohya")
        pipe.unet.unload_lora()
    assert np.array_equal(got, expected)


def test_export_command(identity, tmp_path):
    identity_dir = identity.save(tmp_path / "identity")
    out = tmp_path / "out" / "fox.safetensors"
    result = CliRunner().invoke(
        app, ["export", str(identity_dir), "--format", "kohya", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "out" / "fox_emb.safetensors").is_file()
    bad = CliRunner().invoke(app, ["export", str(identity_dir), "--format", "a1111", "--out", "x"])
    assert bad.exit_code == 2 and "known: kohya" in bad.output
