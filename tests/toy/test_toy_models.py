import json

import numpy as np
import pytest
import torch

from consistent_char.toy.captions import VOCABULARY, sample_caption
from consistent_char.toy.data import encode_words
from consistent_char.toy.models import (
    IdentityProbe,
    ToyModelConfig,
    build_dinov2,
    build_pipeline,
    build_tokenizers,
    dinov2_pixels,
    save_dinov2,
    word_token_table,
    words_to_ids,
)
from consistent_char.toy.world import ATTRIBUTES, render_creature, sample_record


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return build_tokenizers(tmp_path_factory.mktemp("tok"))


def test_every_word_is_one_token(tokenizers):
    for tok in tokenizers:
        assert tok.model_max_length == 77
        for word in VOCABULARY:
            assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_word_indices_tokenize_like_the_pipeline(tokenizers):
    rng = np.random.default_rng(0)
    captions = [sample_caption(sample_record(rng), rng) for _ in range(32)] + [""]
    words = torch.from_numpy(np.stack([encode_words(c) for c in captions])).long()
    for tok in tokenizers:
        expected = tok(captions, padding="max_length", max_length=77, truncation=True).input_ids
        got = words_to_ids(
            words, word_token_table(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        )
        assert got.tolist() == expected


def test_pipeline_saves_loads_offline_and_runs(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = build_pipeline(tmp_path / "tokenizers")
    widths = (
        pipe.text_encoder.get_input_embeddings().weight.shape[1],
        pipe.text_encoder_2.get_input_embeddings().weight.shape[1],
    )
    assert widths == (64, 96)
    pipe.save_pretrained(tmp_path / "pipeline")
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipeline")
    assert loaded.default_sample_size == ToyModelConfig().latent_size == 16
    assert loaded.vae_scale_factor == 4
    assert loaded.config.force_zeros_for_empty_prompt
    assert loaded.unet.config.addition_embed_type == "text_time"
    assert loaded.unet.config.cross_attention_dim == 64 + 96
    loaded.set_progress_bar_config(disable=True)
    out = loaded(
        ["a creature", "a red round creature in the snow"],
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]


def test_probe_round_trip(tmp_path):
    torch.manual_seed(0)
    probe = IdentityProbe().eval()
    images = [render_creature(np.random.default_rng(i))[0] for i in range(6)]
    before = probe.predict(images)
    probe.save_pretrained(tmp_path / "probe")
    assert json.loads((tmp_path / "probe" / "config.json").read_text())["attributes"]["scene"]
    loaded = IdentityProbe.from_pretrained(tmp_path / "probe")
    assert loaded.predict(images) == before
    assert set(before[0]) == set(ATTRIBUTES)
    assert all(before[0][a] in ATTRIBUTES[a] for a in ATTRIBUTES)
    validity = loaded.predict_validity(images)
    assert validity.shape == (6,) and np.array_equal(validity, probe.predict_validity(images))
    assert ((validity >= 0) & (validity <= 1)).all()
    with pytest.raises(FileNotFoundError, match="not a probe directory"):
        IdentityProbe.from_pretrained(tmp_path)


def test_a_probe_without_validity_head_says_so(tmp_path):
    from consistent_char.toy.models import ProbeConfig

    probe = IdentityProbe(ProbeConfig(validity=False)).eval()
    image = render_creature(np.random.default_rng(0))[0]
    assert set(probe.predict([image])[0]) == set(ATTRIBUTES)
    with pytest.raises(ValueError, match="no validity head"):
        probe.predict_validity([image])
    probe.save_pretrained(tmp_path / "old")
    assert IdentityProbe.from_pretrained(tmp_path / "old").valid_head is None


def test_dinov2_saves_with_its_image_processor(tmp_path):
    from transformers import AutoImageProcessor, Dinov2Model

    torch.manual_seed(0)
    save_dinov2(build_dinov2(), tmp_path / "dino")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "dino")
    model = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    image = render_creature(np.random.default_rng(0))[0]
    pixels = processor(images=[image], return_tensors="pt").pixel_values
    assert torch.allclose(pixels, dinov2_pixels(np.asarray(image)[None]), atol=1e-5)
    assert model(pixel_values=pixels).pooler_output.shape == (1, 128)


def test_missing_weights_name_the_training_command(tmp_path, monkeypatch):
    import consistent_char.toy as toy

    monkeypatch.setattr(toy, "weights_dir", lambda: tmp_path)
    for locate in (toy.model_dir, toy.embedder_dir, toy.probe_dir):
        with pytest.raises(toy.ToyWeightsMissingError, match="recipes.toyworld.train"):
            locate()
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "config.json").write_text("{}")
    assert toy.probe_dir() == tmp_path / "probe"
