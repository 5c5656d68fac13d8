"""Counts the ops one refinement step dispatches through SDXL's UNet, without a GPU.

At the default training batch of 1, a refinement step on an H200 took 0.71 s while its UNet
forward ran at 28 TFLOP/s (`benchmarks/results/h200_reduced_2026-11-27.json`): far below what the
same UNet reaches when it generates at batch 13. A step that cheap in arithmetic is bound by
launching its work, so the number of ops it dispatches is the figure to know. The count does not
depend on the device or the resolution, so it is taken here on PyTorch's ``meta`` device: the
full-size UNet (from its config, no weights), one forward and one backward of the denoising
loss, with and without the refiner's LoRA, and split into the ops issued inside the UNet's
repeated blocks (what ``refiner.compile_blocks`` compiles) and the rest.

    python benchmarks/refine_ops.py            # full SDXL, about a minute on a CPU
    python benchmarks/refine_ops.py --tiny     # the test-sized UNet (a test runs it)

Prints JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import iteration  # noqa: E402 - the benchmark's own SDXL and tiny UNet configs

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched, split by whether a repeated block is running."""

    def __init__(self) -> None:
        super().__init__()
        self.inside_block = False
        self.counts: collections.Counter[str] = collections.Counter()
        self.by_op: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts["blocks" if self.inside_block else "rest"] += 1
        self.by_op[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(
    config: dict[str, Any], resolution: int, lora: bool, rank: int = 4
) -> dict[str, Any]:
    """Ops of one training step (forward + backward) of a UNet built from `config` on meta."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(torch.bfloat16)
    unet.requires_grad_(False)
    if lora:
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES,
                       init_lora_weights="gaussian")
        )  # fmt: skip
    names = set(unet._repeated_blocks)
    blocks = [m for m in unet.modules() if type(m).__name__ in names]
    forward, backward = OpCounter(), OpCounter()

    def enter(*_: Any) -> None:
        forward.inside_block = True

    def leave(*_: Any) -> None:
        forward.inside_block = False

    for block in blocks:
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)
    side = resolution // 8
    with torch.device("meta"):
        latents = torch.randn(1, unet.config.in_channels, side, side, dtype=torch.bfloat16)
        # Textual inversion trains token rows, so the text embeddings carry gradients.
        context = torch.randn(
            1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16, requires_grad=True
        )
        added = {
            "text_embeds": torch.randn(
                1, unet.config.projection_class_embeddings_input_dim
                - 6 * unet.config.addition_time_embed_dim,
                dtype=torch.bfloat16,
            ),
            "time_ids": torch.randn(1, 6, dtype=torch.bfloat16),
        }  # fmt: skip
        timestep = torch.tensor([500])
        with forward:
            prediction = unet(
                latents, timestep, encoder_hidden_states=context, added_cond_kwargs=added
            ).sample
            loss = prediction.float().pow(2).mean()
    with backward:
        loss.backward()
    return {
        "lora": lora,
        "lora_tensors": sum(p.requires_grad for p in unet.parameters()),
        "repeated_blocks": len(blocks),
        "forward_ops": sum(forward.counts.values()),
        "forward_ops_in_repeated_blocks": forward.counts["blocks"],
        "backward_ops": sum(backward.counts.values()),
        "step_ops": sum(forward.counts.values()) + sum(backward.counts.values()),
        "top_forward_ops": dict(forward.by_op.most_common(6)),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test UNet")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 1024)")
    args = parser.parse_args(argv)
    config = iteration.TINY_UNET if args.tiny else iteration.SDXL_UNET
    resolution = args.resolution or (64 if args.tiny else 1024)
    runs = [count_step(config, resolution, lora) for lora in (False, True)]
    with_lora = runs[1]
    result = {
        "unet": "tiny" if args.tiny else "sdxl",
        "resolution": resolution,
        "runs": runs,
        "lora_extra_ops_per_step": with_lora["step_ops"] - runs[0]["step_ops"],
        "forward_share_in_repeated_blocks": with_lora["forward_ops_in_repeated_blocks"]
        / with_lora["forward_ops"],
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
