"""Two identities in one pipeline (a scene with two characters), and clean removal of each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consistent_char.identity import Identity, IdentityError, default_adapter_name
from consistent_char.testing import tiny_identity, tiny_sdxl_pipeline

PROMPT = "a <cat-a> and a <dog-b> in the park"


def _draw(pipe) -> np.ndarray:
    out = pipe(
        PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np"
    )
    return out.images[0]


def test_default_adapter_names_come_from_the_token():
    assert default_adapter_name("<cc-fox>") == "cc_cc_fox"
    assert default_adapter_name("<cat-a>") != default_adapter_name("<dog-b>")
    row = torch.zeros(1, 4)
    assert Identity(token="<x_1>", clip_l=row, clip_g=row).adapter_name == "cc_x_1"


def test_two_identities_in_one_pipeline():
    pipe = tiny_sdxl_pipeline(seed=0)
    a = tiny_identity(pipe, "<cat-a>", seed=1)
    b = tiny_identity(pipe, "<dog-b>", seed=2)
    clean = _draw(pipe)

    b.apply_to(pipe, scale=0.8)
    b_alone = _draw(pipe)
    b.remove_from(pipe)

    # 1. Both applied: both tokens in both tokenizers, both adapters active with their scales.
    a.apply_to(pipe)
    b.apply_to(pipe, scale=0.8)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert {"<cat-a>", "<dog-b>"} <= set(tokenizer.get_vocab())
    assert set(pipe.get_active_adapters()) == {a.adapter_name, b.adapter_name}
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling[a.adapter_name] == pytest.approx(1.0)  # alpha / r = 4 / 4, weight 1
    assert layer.scaling[b.adapter_name] == pytest.approx(0.8)
    both = _draw(pipe)
    assert not np.array_equal(both, b_alone), "A changed nothing: the test is blind"
    with pytest.raises(IdentityError, match="already in the pipeline's tokenizer"):
        a.apply_to(pipe)

    # 2. Remove A: B draws exactly what it draws alone.
    a.remove_from(pipe)
    assert "<cat-a>" not in pipe.tokenizer.get_vocab()
    assert pipe.get_active_adapters() == [b.adapter_name]
    assert np.array_equal(_draw(pipe), b_alone)

    # 3. Remove B: the pipeline is back to the clean one.
    b.remove_from(pipe)
    assert not getattr(pipe.unet, "peft_config", None)
    assert np.array_equal(_draw(pipe), clean)
