"""Trial: the refinement fits the *guided* prediction, ``u + g (c - u)`` with the
unconditional ``u`` held fixed (no gradient), instead of the conditional one alone, so that
what the loop draws at guidance g (not at guidance 1) reproduces the chosen images. Patches
the refiner's loss (`denoising.sdxl_loss`), then runs `evaluate_seeds` as
`consistent-char eval seeds`.

    python research/toyworld-v2/guided_loss.py --out runs/v2/guided "a red creature" --seeds 0-3
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trial import parse_args, run

from consistent_char.config import toy_preset
from consistent_char.refiners.ti_lora import denoising

#: The loop's guidance scale, which the guided prediction is formed with.
GUIDANCE = float(toy_preset()["generator"]["guidance_scale"])


def _loss(
    unet,
    state,
    noise_scheduler,
    batch,
    noise,
    timesteps,
    autocast,
    dtype,
    keep=None,
):  # type: ignore[no-untyped-def]
    noisy = noise_scheduler.add_noise(batch.latents, noise, timesteps)
    assert noise_scheduler.config.prediction_type == "epsilon"
    target = noise
    time_ids = batch.time_ids
    with autocast:
        prompt_embeds, pooled = state.encode(batch.ids_1, batch.ids_2)

        def predict(pe, po):  # type: ignore[no-untyped-def]
            return unet(
                noisy.to(dtype),
                timesteps,
                encoder_hidden_states=pe.to(dtype),
                added_cond_kwargs={"text_embeds": po.to(dtype), "time_ids": time_ids.to(dtype)},
                return_dict=False,
            )[0]

        cond = predict(prompt_embeds, pooled)
        with torch.no_grad():
            uncond = predict(torch.zeros_like(prompt_embeds), torch.zeros_like(pooled))
    pred = uncond.float() + GUIDANCE * (cond.float() - uncond.float())
    return F.mse_loss(pred, target.float())


if __name__ == "__main__":
    denoising.sdxl_loss = _loss
    run(parse_args())
