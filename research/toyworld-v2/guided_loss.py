"""Trial: the refinement fits the *guided* prediction, ``u + g (c - u)`` with the
unconditional ``u`` held fixed (no gradient), instead of the conditional one alone, so that
what the loop draws at guidance g (not at guidance 1) reproduces the chosen images. Patches
`TextualInversionLoRARefiner._loss`, then runs `evaluate_seeds` as `consistent-char eval seeds`.

    python research/toyworld-v2/guided_loss.py --out runs/v2/guided "a red creature" --seeds 0-3
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from consistent_char.eval.seeds import evaluate_seeds
from consistent_char.refiners.ti_lora import TextualInversionLoRARefiner

GUIDANCE = {"g": 3.0}


def _loss(
    self,
    state,
    noise_scheduler,
    latents,
    ids_1,
    ids_2,
    time_ids,
    noise,
    timesteps,
    autocast,
    dtype,
    keep=None,
):  # type: ignore[no-untyped-def]
    unet = self.pipeline.unet
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    assert noise_scheduler.config.prediction_type == "epsilon"
    target = noise
    with autocast:
        prompt_embeds, pooled = state.encode(ids_1, ids_2)

        def run(pe, po):  # type: ignore[no-untyped-def]
            return unet(
                noisy.to(dtype),
                timesteps,
                encoder_hidden_states=pe.to(dtype),
                added_cond_kwargs={"text_embeds": po.to(dtype), "time_ids": time_ids.to(dtype)},
                return_dict=False,
            )[0]

        cond = run(prompt_embeds, pooled)
        with torch.no_grad():
            uncond = run(torch.zeros_like(prompt_embeds), torch.zeros_like(pooled))
    g = GUIDANCE["g"]
    pred = uncond.float() + g * (cond.float() - uncond.float())
    return F.mse_loss(pred, target.float())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--out", required=True)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    GUIDANCE["g"] = args.guidance
    TextualInversionLoRARefiner._loss = _loss  # type: ignore[method-assign]
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    study = evaluate_seeds(args.prompts, seeds, args.out, overrides=overrides)
    for prompt in args.prompts:
        print(json.dumps({prompt: study["prompts"][prompt]["summary"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
