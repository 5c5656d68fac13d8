"""The loop refined through the pose ControlNet with the identity's LoRA in the ControlNet
too, as `ControlledGenerator(identity_in_controlnet=True)` draws it: the ControlNet's modules
that share a name with a LoRA'd UNet module get a LoRA whose weights *are* the UNet's (the same
parameters), and the gradient flows through the ControlNet into them. Without this, the LoRA
is trained with a ControlNet that has none and drawn with one that has it.

    python research/apps/lora_in_controlnet_training.py --out RUN --seed L [--threads 2]

then `consistent-char eval toy-apps --identity RUN/identity --lora-scale 1.5 --identity-until
0.85 --identity-in-controlnet --seed L --out DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from consistent_char.config import ExtractorConfig
from consistent_char.extractor import IterativeIdentityExtractor
from consistent_char.refiners.ti_lora import control as control_module
from consistent_char.refiners.ti_lora.state import TRAIN_ADAPTER
from consistent_char.toy.pose import REFINE_THROUGH_CONTROLNET

_UNET: dict[str, Any] = {}
_original_load = control_module.TrainingControl.load.__func__  # type: ignore[attr-defined]


def _load(cls: Any, pipeline: Any, *args: Any, **kwargs: Any) -> Any:
    control = _original_load(cls, pipeline, *args, **kwargs)
    _UNET["unet"] = pipeline.unet
    return control


def _tie(net: Any, unet: Any) -> int:
    """The ControlNet's LoRA layers made to hold the UNet's training LoRA parameters."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    unet_layers = {
        n: m
        for n, m in unet.named_modules()
        if isinstance(m, LoraLayer) and TRAIN_ADAPTER in m.lora_A
    }
    own = dict(net.named_modules())
    targets = sorted(set(unet_layers) & own.keys())
    if not any(isinstance(own[t], LoraLayer) for t in targets):
        first = unet_layers[targets[0]]
        config = LoraConfig(
            r=first.r[TRAIN_ADAPTER],
            lora_alpha=first.lora_alpha[TRAIN_ADAPTER],
            target_modules=targets,
        )
        inject_adapter_in_model(config, net, adapter_name=TRAIN_ADAPTER)
    tied = 0
    for t in targets:
        mine, theirs = net.get_submodule(t), unet_layers[t]
        for part in ("lora_A", "lora_B"):
            if (
                getattr(mine, part)[TRAIN_ADAPTER].weight
                is not getattr(theirs, part)[TRAIN_ADAPTER].weight
            ):
                getattr(mine, part)[TRAIN_ADAPTER].weight = getattr(theirs, part)[
                    TRAIN_ADAPTER
                ].weight
                tied += 1
        mine.scaling[TRAIN_ADAPTER] = theirs.scaling[TRAIN_ADAPTER]
    return tied


def _residuals(self: Any, noisy, timesteps, prompt_embeds, added_cond_kwargs, control):  # type: ignore[no-untyped-def]
    # Each refinement gives the UNet new training parameters: tie them at its first step.
    if not _UNET.get("tied"):
        tied = _tie(self.controlnet, _UNET["unet"])
        print(f"tied {tied} LoRA tensors of the ControlNet to the UNet's", flush=True)
        _UNET["tied"] = True
    down, mid = self.controlnet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        controlnet_cond=control.to(noisy.dtype),
        conditioning_scale=self.scale,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the loop's seed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    control_module.TrainingControl.load = classmethod(_load)  # type: ignore[assignment]
    control_module.TrainingControl.residuals = _residuals  # type: ignore[assignment]
    config: dict[str, Any] = {
        "model": "toy",
        "seed": args.seed,
        "refiner": dict(REFINE_THROUGH_CONTROLNET),
    }
    extractor = IterativeIdentityExtractor.from_config(ExtractorConfig.build(config))
    refine = extractor.refiner.refine

    def refine_and_retie(*args: Any, **kwargs: Any) -> Any:
        _UNET["tied"] = False
        return refine(*args, **kwargs)

    extractor.refiner.refine = refine_and_retie  # type: ignore[method-assign]
    result = extractor.extract("a creature", run_dir=args.out)
    print(f"{result.iterations} iterations ({result.stop_reason})")


if __name__ == "__main__":
    main()
