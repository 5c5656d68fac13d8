"""Identity folders on disk: what `Identity.load` converts or refuses, and what `Identity.save`
never destroys."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from consistent_char import identity as identity_module
from consistent_char.identity import EMBEDDINGS_FILE, LORA_FILE, Identity, IdentityError
from consistent_char.testing.tiny import tiny_identity, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def identity():
    return tiny_identity(tiny_sdxl_pipeline(), "<fox>", seed=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_as_float32_with_a_warning(identity, tmp_path, caplog, dtype):
    folder = identity.save(tmp_path / "identity")
    for name in (EMBEDDINGS_FILE, LORA_FILE):
        tensors = load_file(str(folder / name))
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(folder / name))
    with caplog.at_level(logging.WARNING, logger="consistent_char.identity"):
        loaded = Identity.load(folder)
    assert loaded.clip_l.dtype == torch.float32 and loaded.lora is not None
    assert all(v.dtype == torch.float32 for v in loaded.lora.values())
    assert torch.equal(loaded.clip_l, identity.clip_l.to(dtype).float())
    assert f"clip_l is {dtype}; converting it to float32" in caplog.text


def test_integer_lora_weights_are_refused(identity, tmp_path):
    folder = identity.save(tmp_path / "identity")
    tensors = load_file(str(folder / LORA_FILE))
    save_file({k: v.to(torch.int64) for k, v in tensors.items()}, str(folder / LORA_FILE))
    with pytest.raises(IdentityError, match="holds torch.int64 values"):
        Identity.load(folder)


def test_a_failed_replacement_leaves_the_old_identity_whole(identity, tmp_path, monkeypatch):
    folder = identity.save(tmp_path / "identity")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = tiny_identity(tiny_sdxl_pipeline(), "<owl>", seed=4)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(identity_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        other.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["identity"], "a temporary folder was left"


def test_saving_into_an_empty_folder_is_allowed(identity, tmp_path):
    (tmp_path / "empty").mkdir()
    Identity.load(identity.save(tmp_path / "empty"))
