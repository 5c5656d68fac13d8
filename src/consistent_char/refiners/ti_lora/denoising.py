"""The refiner's loss: SDXL's own denoising loss, conditioned as SDXL is at inference.

The conditioning is the concatenated penultimate hidden states of both text encoders, the pooled
embedding of the second, and the size/crop "time ids". Timesteps are drawn uniformly below the
scheduler's count (or `max_timestep`). Two optional terms beyond the paper's loss: DreamBooth's
prior preservation (the base model's own images, captioned without the token) and caption
dropout (both prompt embeddings zeroed, SDXL's unconditional input).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from consistent_char.refiners.ti_lora.control import TrainingControl
    from consistent_char.refiners.ti_lora.state import _TrainingState


@dataclass
class Batch:
    """Training images on the device: latents, token ids of both encoders, SDXL's time ids,
    and, when refining through a ControlNet, each image's control image."""

    latents: torch.Tensor
    ids_1: torch.Tensor
    ids_2: torch.Tensor
    time_ids: torch.Tensor
    control: torch.Tensor | None = None

    def __getitem__(self, index: torch.Tensor) -> Batch:
        control = None if self.control is None else self.control[index]
        return Batch(
            self.latents[index],
            self.ids_1[index],
            self.ids_2[index],
            self.time_ids[index],
            control,
        )

    def __len__(self) -> int:
        return self.latents.shape[0]


def noise_scheduler(pipe: Any) -> Any:
    """The DDPM scheduler of the pipeline's training schedule (what the UNet was trained on)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def sdxl_loss(
    unet: Any,
    state: _TrainingState,
    scheduler: Any,
    batch: Batch,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    autocast: contextlib.AbstractContextManager[Any],
    dtype: torch.dtype,
    keep: torch.Tensor | None = None,
    control: TrainingControl | None = None,
) -> torch.Tensor:
    """SDXL's denoising loss of `batch`'s latents noised with `noise` at `timesteps` (all on the
    device): device work only, as a CUDA graph needs. Where `keep` is 0 the caption is dropped:
    both prompt embeddings are zeroed, SDXL's unconditional input. With `control` (and control
    images in `batch`), the ControlNet's residuals for those images are added to the UNet."""
    noisy = scheduler.add_noise(batch.latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(batch.latents, noise, timesteps)
    else:
        raise ValueError(
            f"the scheduler's prediction_type {prediction_type!r} is not supported; "
            "expected 'epsilon' or 'v_prediction'"
        )
    with autocast:
        prompt_embeds, pooled = state.encode(batch.ids_1, batch.ids_2)
        if keep is not None:
            prompt_embeds = prompt_embeds * keep[:, None, None].to(prompt_embeds.dtype)
            pooled = pooled * keep[:, None].to(pooled.dtype)
        added = {"text_embeds": pooled.to(dtype), "time_ids": batch.time_ids.to(dtype)}
        residuals: dict[str, Any] = {}
        if control is not None and batch.control is not None:
            residuals = control.residuals(
                noisy.to(dtype), timesteps, prompt_embeds.to(dtype), added, batch.control
            )
        pred = unet(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=prompt_embeds.to(dtype),
            added_cond_kwargs=added,
            return_dict=False,
            **residuals,
        )[0]
    return F.mse_loss(pred.float(), target.float())


def timestep_limit(scheduler: Any, max_timestep: int | None) -> int:
    """Timesteps are drawn below this: the scheduler's count, or `max_timestep` if lower."""
    high = int(scheduler.config.num_train_timesteps)
    return high if max_timestep is None else min(high, max_timestep)


def draw_noise(
    gen: torch.Generator, shape: Sequence[int], high: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's noise and timesteps, drawn on the CPU generator so that a seed gives the
    same draws on every device."""
    noise = torch.randn(tuple(shape), generator=gen)
    timesteps = torch.randint(0, high, (shape[0],), generator=gen)
    return noise, timesteps


def draw_keep(gen: torch.Generator, n: int, dropout: float) -> torch.Tensor | None:
    """Caption dropout's draw for `n` images: 1 keeps the caption, 0 drops it. None (and nothing
    drawn, so a run without dropout draws as it would without this term) when `dropout` is 0."""
    if not dropout:
        return None
    return (torch.rand(n, generator=gen) >= dropout).float()


def time_ids(height: int, width: int, n: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning for `n` uncropped images: original size, crop top-left, target
    size."""
    return (
        torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        .repeat(n, 1)
        .to(device)
    )
