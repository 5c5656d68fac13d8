"""The optimisation: `steps` AdamW steps on the new rows and the LoRA, each on the denoising loss
of `gradient_accumulation_steps` micro-batches of `batch_size` images.

The random draws (image order, noise, timesteps, caption dropout) are made on a CPU generator in
a fixed order, so a seed gives the same training on every device, and are copied into the same
device tensors every step (`_StepInputs`), so the step itself is device work only: what a CUDA
graph that replays it needs (`acceleration._StepRunner`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from consistent_char.refiners.ti_lora import denoising
from consistent_char.refiners.ti_lora.acceleration import _StepRunner, copy_from_host
from consistent_char.refiners.ti_lora.control import TrainingControl
from consistent_char.refiners.ti_lora.denoising import Batch
from consistent_char.refiners.ti_lora.settings import RefinerSettings
from consistent_char.refiners.ti_lora.state import _TrainingState

logger = logging.getLogger(__name__)

#: ``callback(step, total, loss)`` after each optimisation step (step counts from 1).
StepCallback = Callable[[int, int, float], None]


def optimise(
    settings: RefinerSettings,
    pipe: Any,
    state: _TrainingState,
    data: Batch,
    n_identity: int,
    gen: torch.Generator,
    autocast: contextlib.AbstractContextManager[Any],
    callback: StepCallback | None,
    control: TrainingControl | None = None,
) -> float:
    """Runs `settings.steps` optimisation steps; returns the last step's loss (NaN for 0 steps).

    The first `n_identity` rows of `data` are the identity's images; any after them are prior
    images, of which each micro-batch also takes one micro-batch at weight `prior_preservation`.
    With `control`, every loss runs through its ControlNet (`data.control` holds the images).
    """
    step = _TrainingStep(settings, pipe, state, data, n_identity, gen, autocast, control)
    run_step = _StepRunner(step, graphed=settings.cuda_graphs)
    report = _Report(settings.steps, settings.show_progress, callback)
    # A step's loss is read (and reported) once the next step is queued: reading it waits for
    # the device, and waiting one step late lets the host queue step k while the device still
    # runs step k - 1. Host-to-device copies are non-blocking for the same reason.
    final_loss = math.nan
    pending: tuple[int, torch.Tensor] | None = None
    try:
        for k in range(1, settings.steps + 1):
            step.draw()
            loss = run_step()
            if pending is not None:
                final_loss = report(*pending)
            pending = (k, loss)
        if pending is not None:
            final_loss = report(*pending)
    finally:
        report.close()
    return final_loss


class _TrainingStep:
    """One optimisation step on the device, reading its random draws from `inputs` (and
    `prior_inputs`): the same tensors every step, refilled from the host by `draw`. It must
    not read a device value on the host, so that a CUDA graph can replay it."""

    def __init__(
        self,
        settings: RefinerSettings,
        pipe: Any,
        state: _TrainingState,
        data: Batch,
        n_identity: int,
        gen: torch.Generator,
        autocast: contextlib.AbstractContextManager[Any],
        control: TrainingControl | None = None,
    ) -> None:
        self.settings, self.state, self.data, self.autocast = settings, state, data, autocast
        self.gen, self.control = gen, control
        self.unet = pipe.unet
        # diffusers' ModelMixin.dtype walks every module of the UNet (LoRA layers included):
        # read once here, not four times a step (11% of a ToyWorld refine on the CPU).
        self.unet_dtype = pipe.unet.dtype
        self.scheduler = denoising.noise_scheduler(pipe)
        self.high = denoising.timestep_limit(self.scheduler, settings.max_timestep)
        scale = settings.lr_decay**state.earlier_refines
        device = data.latents.device
        self.optimizer = state.optimizer(
            settings.embedding_lr * scale,
            settings.lora_lr * scale,
            settings.weight_decay,
            settings.mode,
            # The step count on the device, which a replayed step needs (CUDA only).
            capturable=settings.cuda_graphs and device.type == "cuda",
        )
        self.trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        cap = settings.row_norm_cap
        self.row_caps = None if cap is None else state.row_caps(cap)
        self.n_identity, self.n_prior = n_identity, len(data) - n_identity
        self.order = _IndexStream(n_identity, gen)
        self.prior_order = _IndexStream(self.n_prior, gen) if self.n_prior else None
        accumulation, batch = settings.gradient_accumulation_steps, settings.batch_size
        shape = data.latents.shape[1:]
        self.inputs = _StepInputs.allocate(accumulation, batch, shape, device)
        prior_rows = accumulation if self.n_prior else 0
        self.prior_inputs = _StepInputs.allocate(prior_rows, batch, shape, device)

    def draw(self) -> None:
        """Draws the next step's images, noise, timesteps and caption drops into the inputs.
        The order is fixed, since a seed's training depends on it: per micro-batch the indices,
        then the noise and timesteps, then the drops, then the same for the prior images."""
        gen, batch, shape = self.gen, self.settings.batch_size, self.inputs.noise.shape[1:]
        for k in range(self.settings.gradient_accumulation_steps):
            indices = self.order.take(batch)
            noise, timesteps = denoising.draw_noise(gen, shape, self.high)
            keep = denoising.draw_keep(gen, batch, self.settings.caption_dropout)
            self.inputs.fill(k, indices, noise, timesteps, keep)
            if self.prior_order is not None:
                indices = self.prior_order.take(batch) + self.n_identity
                noise, timesteps = denoising.draw_noise(gen, shape, self.high)
                self.prior_inputs.fill(k, indices, noise, timesteps)

    def __call__(self) -> torch.Tensor:
        """The denoising loss of each micro-batch (plus the prior term), backward, clipping,
        AdamW and the row caps; returns the mean loss of the micro-batches."""
        settings, inputs = self.settings, self.inputs
        accumulation = settings.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.data.latents.device)
        for k in range(accumulation):
            keep = inputs.keep[k] if settings.caption_dropout else None
            loss = self._loss(inputs, k, keep)
            total += loss.detach().float() / accumulation
            if self.n_prior:
                # DreamBooth's prior preservation: the model's own images of the prompt must
                # still be explained, without the token.
                loss = loss + settings.prior_preservation * self._loss(self.prior_inputs, k)
            (loss / accumulation).backward()
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trained, settings.max_grad_norm)
        self.optimizer.step()
        if self.row_caps is not None:
            self.state.cap_rows(self.row_caps)
        return total

    def _loss(self, inputs: _StepInputs, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        return denoising.sdxl_loss(
            self.unet,
            self.state,
            self.scheduler,
            self.data[inputs.indices[k]],
            inputs.noise[k],
            inputs.timesteps[k],
            self.autocast,
            self.unet_dtype,
            keep,
            self.control,
        )


class _Report:
    """Reports each step's loss: a progress bar, a debug log line now and then, the callback."""

    def __init__(self, total: int, show: bool, callback: StepCallback | None) -> None:
        from tqdm.auto import tqdm

        self.total, self.callback = total, callback
        self.bar = tqdm(total=total, desc="refine", disable=not show, leave=False)

    def __call__(self, step: int, loss: torch.Tensor) -> float:
        value = float(loss)  # waits for the device to finish that step
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{value:.4f}")
        if step == 1 or step == self.total or step % 50 == 0:
            logger.debug("refine step %d/%d: loss %.5f", step, self.total, value)
        if self.callback is not None:
            self.callback(step, self.total, value)
        return value

    def close(self) -> None:
        self.bar.close()


class _IndexStream:
    """Image indices in seeded random order, epoch after epoch (any batch size works)."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        self.n, self.gen = n, gen
        self.buffer: list[int] = []

    def take(self, k: int) -> torch.Tensor:
        while len(self.buffer) < k:
            self.buffer += torch.randperm(self.n, generator=self.gen).tolist()
        out, self.buffer = self.buffer[:k], self.buffer[k:]
        return torch.tensor(out, dtype=torch.long)


@dataclass
class _StepInputs:
    """The device tensors a training step reads its random draws from, one row per micro-batch.

    They are allocated once and refilled before every step, so the step always reads the same
    memory: what a CUDA graph replaying the step needs."""

    indices: torch.Tensor  # (accumulation, batch) image indices
    noise: torch.Tensor  # (accumulation, batch, *latent shape)
    timesteps: torch.Tensor  # (accumulation, batch)
    keep: torch.Tensor  # (accumulation, batch): 1 keeps the caption, 0 drops it

    @classmethod
    def allocate(
        cls, accumulation: int, batch: int, latent_shape: Sequence[int], device: torch.device
    ) -> _StepInputs:
        return cls(
            indices=torch.zeros((accumulation, batch), dtype=torch.long, device=device),
            noise=torch.zeros((accumulation, batch, *latent_shape), device=device),
            timesteps=torch.zeros((accumulation, batch), dtype=torch.long, device=device),
            keep=torch.ones((accumulation, batch), device=device),
        )

    def fill(
        self,
        k: int,
        indices: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> None:
        copy_from_host(self.indices[k], indices)
        copy_from_host(self.noise[k], noise)
        copy_from_host(self.timesteps[k], timesteps)
        if keep is not None:
            copy_from_host(self.keep[k], keep)
