"""`benchmarks/memory.py`: peak CUDA memory estimated on the meta device, checked on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import memory
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

KIB = 1024


def test_live_bytes_counts_each_storage_once_until_it_is_freed() -> None:
    with memory.LiveBytes() as counter:
        a = torch.empty(1000, device="meta")  # 4000 bytes: one 4096-byte run of blocks
        view = a[10:20].view(2, 5)
        assert counter.current == 4 * KIB
        b = a * 2
        assert counter.current == 8 * KIB
        del a
        assert counter.current == 8 * KIB  # the view keeps a's storage alive
        del view
        assert counter.current == 4 * KIB
        del b
        assert counter.current == 0
    assert counter.peak == 8 * KIB


def test_live_bytes_answers_host_reads_of_meta_values() -> None:
    with memory.LiveBytes():
        loss = torch.empty((), device="meta")
        assert float(loss) == 0.0
        assert bool(torch.empty((), dtype=torch.bool, device="meta")) is False
        assert torch.equal(torch.empty(3, device="meta").cpu(), torch.zeros(3))


def _unet_step(device: str) -> int:
    """Peak live bytes of a tiny UNet's forward and backward on `device` (classic attention,
    so that the CPU and meta run the same ops)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    config = {**memory.iteration.TINY_UNET, "addition_embed_type": None}
    config.pop("addition_embed_type_num_heads")
    with memory.LiveBytes(device) as counter:
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
            unet.set_attn_processor(AttnProcessor())
            sample = torch.randn(2, 4, 8, 8)
            context = torch.randn(2, 7, config["cross_attention_dim"])
        counter.reset()
        out = unet(sample, 10, encoder_hidden_states=context).sample
        out.float().square().mean().backward()
    return counter.peak


def test_meta_ops_allocate_what_real_ops_do() -> None:
    """The estimate counts meta tensors; the same forward and backward on real CPU tensors
    allocates exactly the same."""
    assert _unet_step("meta") == _unet_step("cpu") > 0


def test_cuda_autocast_casts_as_cuda_autocast_does() -> None:
    autocast = memory.CudaAutocast()
    x = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    w = torch.empty(8, 8, device="meta", requires_grad=True)  # a float32 trained weight
    with autocast:
        assert F.group_norm(x, 2).dtype == torch.bfloat16  # outside a region: as written
        with autocast.region():
            assert F.linear(x, w).dtype == torch.bfloat16
            assert F.group_norm(x, 2).dtype == torch.float32
            assert F.layer_norm(x, (8,)).dtype == torch.float32
            assert torch.exp(x).dtype == torch.float32
            assert torch.softmax(x, -1).dtype == torch.float32
            assert torch.softmax(x, -1, dtype=torch.bfloat16).dtype == torch.bfloat16
            assert torch.sum(x).dtype == torch.float32
            assert F.silu(x).dtype == torch.bfloat16  # on no list
            # The trained weight's bfloat16 copy is made once per region, as autocast caches it.
            assert autocast._cast(w, torch.bfloat16) is autocast._cast(w, torch.bfloat16)
        assert not autocast._cache


def test_attention_runs_the_fused_kernels() -> None:
    autocast = memory.CudaAutocast()
    length = 4096
    scores_bytes = length * length * 2  # what the math path would hold, per head

    def attend(head: int) -> int:
        with memory.LiveBytes() as counter, autocast:
            q = torch.empty(1, 1, length, head, device="meta", dtype=torch.bfloat16)
            q.requires_grad_(True)
            out = F.scaled_dot_product_attention(q, q, q)
            assert out.shape == q.shape and out.dtype == q.dtype
            out.sum().backward()
        return counter.peak

    assert attend(64) < scores_bytes / 4
    assert attend(512) < scores_bytes
    assert autocast.attention == {"flash": 1, "memory_efficient": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    measured = tmp_path_factory.mktemp("memory") / "measured.json"
    measured.write_text(
        json.dumps(
            {
                "environment": {"device_name": "a test card"},
                "paths": {
                    "naive": {"peak_gib_refinement": 0.01},
                    "library": {"peak_gib_refinement": 0.02},
                },
            }
        )
    )
    settings = {**memory.SETTINGS, "encode_1_per_call": {"encode_pixels": 64 * 64}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "SETTINGS", settings)
        return memory.main(["--tiny", "--images", "6", "--measured", str(measured)])


def test_tiny_estimate_orders_the_settings(tiny: dict[str, Any]) -> None:
    runs = tiny["settings"]
    train = {name: run["peak_gib_by_phase"]["train"] for name, run in runs.items()}
    encode = {name: run["peak_gib_by_phase"]["encode"] for name, run in runs.items()}
    for run in runs.values():
        assert run["peak_gib"] == max(run["peak_gib_by_phase"].values())
        assert run["peak_gib"] > run["resident_gib"] > 0
    # Larger batches hold more activations; checkpointing holds fewer.
    assert train["batch_4"] > train["batch_2"] > train["default"]
    assert train["gradient_checkpointing"] < train["default"]
    assert train["gradient_checkpointing_batch_4"] < train["batch_4"]
    # Fewer images per VAE call hold fewer encoder activations.
    assert encode["encode_1_per_call"] < encode["default"]
    assert runs["default"]["attention_kernels"]["flash"] > 0


def test_tiny_estimate_is_set_against_the_measured_peaks(tiny: dict[str, Any]) -> None:
    against = tiny["against_measured"]
    assert against["device"] == "a test card"
    naive = tiny["naive"]["peak_gib"]
    assert against["naive"]["estimated_gib"] == naive
    assert against["naive"]["relative_error"] == pytest.approx((naive - 0.01) / 0.01)
    library = tiny["settings"][memory.MEASURED_SETTING]["peak_gib"]
    assert against["library"]["relative_error"] == pytest.approx((library - 0.02) / 0.02)


def test_the_refiner_is_left_as_it_was(tiny: dict[str, Any]) -> None:
    import torch.utils.checkpoint

    from consistent_char.refiners.ti_lora import encoding

    assert encoding.ENCODE_PIXELS == 1024 * 1024
    assert torch.utils.checkpoint.checkpoint.__module__ == "torch.utils.checkpoint"
