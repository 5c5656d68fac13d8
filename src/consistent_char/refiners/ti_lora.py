"""`TextualInversionLoRARefiner`: the paper's refinement step, ``Θ ← refine(Θ, S[c*])``.

Θ is a new token in each of SDXL's two text encoders (textual inversion) plus a LoRA on the UNet's
attention projections. Both are trained together with SDXL's own denoising loss, conditioned as
SDXL is at inference: the concatenated penultimate hidden states of both encoders, the pooled
embedding of the second, and the size/crop "time ids".

How the shared pipeline is left untouched:

- the new tokens go into *copies* of the tokenizers, and each text encoder's input embedding is
  wrapped for the duration of `refine` by a module that looks up the base rows as before and
  substitutes the new rows (float32 master copies) at the new token ids: no other row can change,
  and no embedding matrix is resized;
- the LoRA is injected with `unet.add_adapter(LoraConfig(...))` under a private adapter name and
  removed afterwards (peft's wrapper layers included);
- every base parameter is frozen during training; `requires_grad`, `train()`/`eval()`, gradient
  checkpointing and the active adapters are restored on exit, on error too.

The ids the new tokens get in the copied tokenizers are the ids `Identity.apply_to` gives them
later (diffusers' `load_textual_inversion` appends them the same way), so what is trained is what
is generated.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from consistent_char.errors import InvalidValueError
from consistent_char.identity import Identity, IdentityError

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = ["RefineMode", "StepCallback", "TextualInversionLoRARefiner"]

logger = logging.getLogger(__name__)

RefineMode = Literal["ti_lora", "ti", "lora"]
MixedPrecision = Literal["auto", "bf16", "no"]
#: ``callback(step, total, loss)`` after each optimisation step (step counts from 1).
StepCallback = Callable[[int, int, float], None]

MODES: tuple[str, ...] = ("ti_lora", "ti", "lora")
TRAIN_ADAPTER = "consistent_char_refine"
MAX_SEED = 2**63
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
#: At most this many images per VAE encoder call when the training latents are computed...
ENCODE_BATCH = 8
#: ...and at most this many pixels (one 1024² image). The encoder's activations grow with the
#: pixels: eight 1024² images at once took an estimated 10 GiB above the weights, more than
#: a training step's activations (benchmarks/memory.py), for a once-per-refine cost.
ENCODE_PIXELS = 1024 * 1024
#: Eager steps (on a side stream) before `cuda_graphs` captures the training step.
CUDA_GRAPH_WARMUP_STEPS = 3


class TextualInversionLoRARefiner:
    """Learns an identity from images: new tokens in both text encoders + a UNet LoRA.

    Build it with `from_pipeline` (shares a loaded pipeline, e.g. `SDXLGenerator.pipeline`, so
    the model is in memory once) or `from_pretrained`.

    Args:
        pipeline: A loaded `StableDiffusionXLPipeline`; trained in place and restored.
        mode: ``"ti_lora"`` (the paper: tokens and LoRA), ``"ti"`` (tokens only; no LoRA, or a
            warm-start LoRA kept frozen) or ``"lora"`` (LoRA only; the token rows stay at their
            initialisation or warm-start values).
        token: The placeholder token of a new identity (a warm start keeps the identity's own).
        initializer_token: Word whose embedding (the mean over its sub-word tokens) initialises
            the new token rows of a new identity, in each encoder.
        num_vectors: Rows per text encoder for a new identity (diffusers' multi-vector names
            ``token``, ``token_1``, ...).
        lora_rank: LoRA rank ``r`` for a new identity.
        lora_alpha: LoRA alpha (``None``: equal to the rank, i.e. scale 1).
        target_modules: UNet module names that get a LoRA.
        lora_lr: Learning rate of the LoRA weights.
        embedding_lr: Learning rate of the new token rows.
        weight_decay: AdamW weight decay of the trained tensors.
        steps: Optimisation steps per `refine` call.
        batch_size: Images per micro-batch.
        gradient_accumulation_steps: Micro-batches per optimisation step.
        max_grad_norm: Gradient clipping norm over the trained tensors (``None``: no clipping).
        max_timestep: Train (and measure `denoising_loss`) on timesteps below this only
            (``None``: all of the scheduler's ``num_train_timesteps``). The noisiest steps are
            where the layout and the background are decided.
        lr_decay: Both learning rates are multiplied by ``lr_decay ** k`` when warm-starting
            an identity that `refine` has already trained ``k`` times (``1.0``: no decay), so
            later iterations of the loop move the identity less.
        row_norm_cap: After every step, scale down any new token row whose L2 norm exceeds
            this multiple of the mean norm of the encoder's own rows (``None``: no cap). Rows
            trained at a high learning rate can grow far longer than any word's, and such a
            token can then outweigh the rest of the prompt.
        prior_preservation: Weight of a prior-preservation term (DreamBooth's): when `refine`
            is given prior images (the base model's own images of the prompt, captioned without
            the token), every step also takes the denoising loss on a micro-batch of them,
            times this weight, so the LoRA learns the identity without unlearning how the
            model draws (``0``: off, the paper's loss).
        caption_dropout: Fraction of the identity's training images whose caption is dropped:
            both prompt embeddings zeroed, the unconditional input SDXL was trained with and
            that its pipelines use (``force_zeros_for_empty_prompt``). The unguided branch then
            learns the identity too, so classifier-free guidance amplifies only what the
            caption adds (the scene) rather than the identity again at every iteration of the
            loop (``0``: off, the paper's loss). Only the LoRA learns from a dropped caption.
        height: Training image height; ``None`` is the first image's height.
        width: Training image width; ``None`` is the first image's width.
        mixed_precision: ``"auto"`` (bfloat16 autocast on CUDA, none on CPU), ``"bf16"`` or
            ``"no"``. Trained tensors are float32 in every case.
        gradient_checkpointing: Trade UNet compute for memory during training.
        compile_blocks: Compile the UNet's repeated blocks (diffusers' ``_repeated_blocks``,
            SDXL's 70 transformer blocks) with `torch.compile` while `refine` trains, and restore
            them afterwards. At SDXL's training batch of 1 the step is bound by dispatching ops,
            not by arithmetic (`benchmarks/README.md` counts them), and these blocks issue 96%
            of the UNet's forward ops. The first `refine` pays the compile time; later calls
            reuse the compiled code.
        cuda_graphs: Capture the training step (forward, backward, clipping, optimizer) in a
            CUDA graph after `CUDA_GRAPH_WARMUP_STEPS` (3) eager warm-up steps and replay it
            for the rest of each `refine`, so the host issues one launch per step instead of
            tens of thousands of ops. CUDA only; not with `compile_blocks`. Each `refine`
            captures anew (its LoRA and rows are new tensors); if the capture fails, the refine
            goes on eagerly and logs a warning. Off by default until a GPU run shows it pays.
        show_progress: Show a tqdm bar over the steps.

    Example:
        >>> from consistent_char.refiners import TextualInversionLoRARefiner
        >>> from consistent_char.testing import tiny_sdxl_pipeline
        >>> pipe = tiny_sdxl_pipeline()
        >>> refiner = TextualInversionLoRARefiner.from_pipeline(
        ...     pipe, token="<cat>", initializer_token="cat", steps=2
        ... )
        >>> images = pipe(["a cat"] * 2, num_inference_steps=2).images
        >>> identity = refiner.refine(None, images, ["a photo of <cat>"] * 2, seed=0)
        >>> identity.token, tuple(identity.clip_l.shape), tuple(identity.clip_g.shape)
        ('<cat>', (1, 32), (1, 48))
    """

    def __init__(
        self,
        pipeline: StableDiffusionXLPipeline,
        *,
        mode: RefineMode = "ti_lora",
        token: str = "<cc-char>",
        initializer_token: str = "person",
        num_vectors: int = 1,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        lora_lr: float = 3e-5,
        embedding_lr: float = 5e-3,
        weight_decay: float = 0.0,
        steps: int = 500,
        batch_size: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        max_timestep: int | None = None,
        lr_decay: float = 1.0,
        row_norm_cap: float | None = None,
        prior_preservation: float = 0.0,
        caption_dropout: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        mixed_precision: MixedPrecision = "auto",
        gradient_checkpointing: bool = False,
        compile_blocks: bool = False,
        cuda_graphs: bool = False,
        show_progress: bool = False,
    ) -> None:
        _check_settings(
            mode=mode,
            token=token,
            initializer_token=initializer_token,
            num_vectors=num_vectors,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            lora_lr=lora_lr,
            embedding_lr=embedding_lr,
            weight_decay=weight_decay,
            steps=steps,
            batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            max_grad_norm=max_grad_norm,
            max_timestep=max_timestep,
            lr_decay=lr_decay,
            row_norm_cap=row_norm_cap,
            prior_preservation=prior_preservation,
            caption_dropout=caption_dropout,
            height=height,
            width=width,
            mixed_precision=mixed_precision,
        )
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if getattr(pipeline, name, None) is None:
                raise ValueError(
                    f"the pipeline has no {name}: the refiner needs an SDXL-architecture "
                    f"pipeline with both text encoders, got {type(pipeline).__name__}"
                )
        # Any: diffusers registers the components at run time, invisible to type checkers.
        self.pipeline: Any = pipeline
        self.mode: RefineMode = mode
        self.token = token
        self.initializer_token = initializer_token
        self.num_vectors = num_vectors
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        self.target_modules = list(target_modules)
        self.lora_lr = lora_lr
        self.embedding_lr = embedding_lr
        self.weight_decay = weight_decay
        self.steps = steps
        self.batch_size = batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.max_timestep = max_timestep
        self.lr_decay = lr_decay
        self.row_norm_cap = row_norm_cap
        self.prior_preservation = float(prior_preservation)
        self.caption_dropout = float(caption_dropout)
        self.height = height
        self.width = width
        self.mixed_precision: MixedPrecision = mixed_precision
        self.gradient_checkpointing = gradient_checkpointing
        if compile_blocks and not _repeated_blocks(pipeline.unet):
            raise ValueError(
                "compile_blocks=True needs a UNet that names its repeated blocks (diffusers' "
                f"_repeated_blocks); {type(pipeline.unet).__name__} has none"
            )
        self.compile_blocks = compile_blocks
        if cuda_graphs and compile_blocks:
            raise ValueError(
                "cuda_graphs=True and compile_blocks=True are two ways of cutting the step's "
                "host work: choose one"
            )
        self.cuda_graphs = cuda_graphs
        self.show_progress = show_progress

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_pipeline(
        cls, pipeline: StableDiffusionXLPipeline, **settings: Any
    ) -> TextualInversionLoRARefiner:
        """Trains on an already loaded pipeline (shared with e.g. `SDXLGenerator`).

        Example:
            >>> from consistent_char.generators import SDXLGenerator
            >>> from consistent_char.testing import tiny_sdxl_pipeline
            >>> generator = SDXLGenerator.from_pipeline(tiny_sdxl_pipeline())
            >>> refiner = TextualInversionLoRARefiner.from_pipeline(generator.pipeline, steps=10)
        """
        return cls(pipeline, **settings)

    @classmethod
    def from_pretrained(
        cls,
        id_or_local_dir: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        **settings: Any,
    ) -> TextualInversionLoRARefiner:
        """Loads a diffusers SDXL checkpoint and trains on it.

        Args:
            id_or_local_dir: A hub id or a folder written by `save_pretrained`.
            device: ``None`` is CUDA when available, else CPU.
            dtype: ``None`` is bfloat16 on CUDA, float32 on CPU (trained tensors are float32
                either way).
            variant: The checkpoint variant (e.g. ``"fp16"``), if any.
            **settings: Keyword settings of `TextualInversionLoRARefiner`.

        Raises:
            FileNotFoundError: A local path that does not exist or is not a pipeline folder.

        Example:
            >>> refiner = TextualInversionLoRARefiner.from_pretrained(
            ...     "stabilityai/stable-diffusion-xl-base-1.0", steps=500
            ... )  # doctest: +SKIP
        """
        from consistent_char.generators.sdxl import load_sdxl_pipeline

        _check_known(settings)
        return cls(
            load_sdxl_pipeline(id_or_local_dir, device=device, dtype=dtype, variant=variant),
            **settings,
        )

    # ----------------------------------------------------------------- check

    def check_ready(self, identity: Identity | None = None) -> None:
        """Raises the errors `refine` would raise about its settings, without training: the
        token is free in both tokenizers, `initializer_token` tokenizes, and every LoRA target
        module names a layer of the UNet that a LoRA can wrap. Cheap; the extractor calls it
        before it draws iteration 0.

        Raises:
            InvalidValueError: One of those does not hold; the message says what to change.

        Example:
            >>> refiner.check_ready()  # doctest: +SKIP
        """
        token = identity.token if identity is not None else self.token
        names = identity.tokens if identity is not None else _token_names(token, self.num_vectors)
        self._check_tokens_free(names)
        if identity is None:
            for tokenizer in (self.pipeline.tokenizer, self.pipeline.tokenizer_2):
                if not tokenizer(self.initializer_token, add_special_tokens=False).input_ids:
                    raise InvalidValueError(
                        f"refiner.initializer_token {self.initializer_token!r} tokenizes to "
                        "nothing; choose an ordinary word, e.g. 'person'"
                    )
        warm_lora = identity is not None and identity.lora is not None
        if self.mode != "ti" or warm_lora:
            targets = identity.target_modules if warm_lora and identity else self.target_modules
            _check_target_modules(self.pipeline.unet, targets)

    def _check_tokens_free(self, names: Sequence[str]) -> None:
        for tokenizer in (self.pipeline.tokenizer, self.pipeline.tokenizer_2):
            vocab = tokenizer.get_vocab()
            # "cat</w>" is the word "cat": a token spelled like a word would hijack it.
            taken = [t for t in names if t in vocab or f"{t}</w>" in vocab]
            if taken:
                raise InvalidValueError(
                    f"token(s) {taken} are already in the pipeline's tokenizer; choose another "
                    "token (e.g. '<my-char>') or remove the identity that added them "
                    "(Identity.remove_from)"
                )

    # ---------------------------------------------------------------- refine

    def refine(
        self,
        identity: Identity | None,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        *,
        seed: int,
        callback: StepCallback | None = None,
        prior_images: Sequence[Image.Image] | None = None,
        prior_captions: Sequence[str] | None = None,
    ) -> Identity:
        """Trains an identity on `images`, starting from `identity` (warm start) or afresh.

        Args:
            identity: The previous identity (its token, rows, LoRA, rank and alpha are kept and
                trained further) or ``None`` (new token rows from `initializer_token`, peft's
                default LoRA initialisation: ``lora_B`` zero, so the LoRA starts as a no-op).
            images: The training images (e.g. the most cohesive cluster).
            captions: One caption per image, each containing the identity's token.
            seed: Seeds the LoRA initialisation, the VAE latent samples, the noise, the
                timesteps and the image order: the same inputs and seed give the same identity
                (bit-identical on CPU).
            callback: Called as ``callback(step, total, loss)`` after each optimisation step.
            prior_images: The base model's own images of the prompt, for `prior_preservation`
                (ignored when it is 0).
            prior_captions: One caption per prior image, without the identity's token.

        Returns:
            A new `Identity` holding detached CPU float32 tensors; the pipeline is left as it was.

        Raises:
            ValueError: Empty images, captions of another length, a caption without the token,
                a seed out of range, or a token the pipeline's tokenizers already hold.
            IdentityError: A warm-start identity that does not fit the pipeline.

        Example:
            >>> identity = refiner.refine(None, images, captions, seed=0)  # doctest: +SKIP
            >>> identity = refiner.refine(identity, new_images, captions, seed=1)  # doctest: +SKIP
        """
        # 1. Check inputs
        token = identity.token if identity is not None else self.token
        images, captions = self._check_inputs(identity, token, images, captions, seed)
        prior = _check_prior(token, prior_images, prior_captions, self.prior_preservation)
        height, width = self._training_size(images)
        pipe = self.pipeline
        device = pipe.unet.device
        if self.cuda_graphs:
            _StepRunner.check_device(device)
        # A captured step must not keep autocast's cast weights past its own call.
        autocast = self._autocast(device, cache=not self.cuda_graphs)
        gen = torch.Generator(device="cpu").manual_seed(seed)

        with (
            _seeded(seed, device),
            self._trainable(identity, token, seed) as state,
            self._no_lora_input_cast(device),
            _compiled(_repeated_blocks(pipe.unet) if self.compile_blocks else []),
        ):
            # 2. Encode the training images once: the VAE is frozen. Prior images (if any) come
            #    after the identity's, with their own captions.
            all_images = [*images, *prior[0]]
            latents = self._encode_images(all_images, height, width, gen)
            # 3. Tokenise the captions once (the new tokens expanded as diffusers does).
            ids_1, ids_2 = state.tokenize(captions)
            if prior[1]:
                prior_1, prior_2 = state.tokenize(prior[1], with_token=False)
                ids_1, ids_2 = torch.cat([ids_1, prior_1]), torch.cat([ids_2, prior_2])
            time_ids = _time_ids(height, width, len(all_images), device)

            # 4. Optimise the new rows and the LoRA with SDXL's denoising loss
            final_loss = self._optimise(
                state, latents, ids_1, ids_2, time_ids, gen, autocast, callback, len(images)
            )

            # 5. Read the identity out before the pipeline is restored
            result = state.identity(
                metadata=_metadata(identity, self._settings(), seed, len(images), final_loss)
            )
        return result

    def _optimise(
        self,
        state: _TrainingState,
        latents: torch.Tensor,
        ids_1: torch.Tensor,
        ids_2: torch.Tensor,
        time_ids: torch.Tensor,
        gen: torch.Generator,
        autocast: contextlib.AbstractContextManager[Any],
        callback: StepCallback | None,
        n_identity: int,
    ) -> float:
        """Runs `steps` optimisation steps; returns the last step's loss (NaN for 0 steps).

        The first `n_identity` latents are the identity's; any after them are prior images,
        of which each micro-batch also takes one micro-batch at weight `prior_preservation`.
        """
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(self.pipeline.scheduler.config)
        scale = self.lr_decay**state.earlier_refines
        optimizer = state.optimizer(
            self.embedding_lr * scale,
            self.lora_lr * scale,
            self.weight_decay,
            self.mode,
            # The step count on the device, which a replayed step needs (CUDA only).
            capturable=self.cuda_graphs and latents.device.type == "cuda",
        )
        row_caps = None if self.row_norm_cap is None else state.row_caps(self.row_norm_cap)
        order = _IndexStream(n_identity, gen)
        n_prior = latents.shape[0] - n_identity
        prior_order = _IndexStream(n_prior, gen) if n_prior > 0 else None
        # diffusers' ModelMixin.dtype walks every module of the UNet (LoRA layers included): read
        # once here, not four times a step (that was 11% of a ToyWorld refine on the CPU).
        unet_dtype = self.pipeline.unet.dtype
        final_loss = math.nan
        bar = _progress(self.steps, self.show_progress)

        def report(step: int, loss: torch.Tensor) -> float:
            value = float(loss)  # waits for the device to finish that step
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if step == 1 or step == self.steps or step % 50 == 0:
                logger.debug("refine step %d/%d: loss %.5f", step, self.steps, value)
            if callback is not None:
                callback(step, self.steps, value)
            return value

        # One optimisation step on the device, reading its random draws from `inputs`: the same
        # tensors every step, refilled from the host, so that a CUDA graph captured from this
        # function can replay it (`cuda_graphs`). It must not read a device value on the host.
        inputs = _StepInputs.allocate(
            self.gradient_accumulation_steps, self.batch_size, latents.shape[1:], latents.device
        )
        prior_inputs = _StepInputs.allocate(
            self.gradient_accumulation_steps if n_prior else 0,
            self.batch_size,
            latents.shape[1:],
            latents.device,
        )
        accumulation = self.gradient_accumulation_steps
        dropout = self.caption_dropout
        trained = [p for group in optimizer.param_groups for p in group["params"]]

        def device_step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=latents.device)
            for k in range(accumulation):
                idx = inputs.indices[k]
                loss = self._loss(
                    state,
                    noise_scheduler,
                    latents[idx],
                    ids_1[idx],
                    ids_2[idx],
                    time_ids[idx],
                    inputs.noise[k],
                    inputs.timesteps[k],
                    autocast,
                    unet_dtype,
                    inputs.keep[k] if dropout else None,
                )
                total += loss.detach().float() / accumulation
                if n_prior:
                    # DreamBooth's prior preservation: the model's own images of the prompt
                    # must still be explained, without the token.
                    j = prior_inputs.indices[k]
                    loss = loss + self.prior_preservation * self._loss(
                        state,
                        noise_scheduler,
                        latents[j],
                        ids_1[j],
                        ids_2[j],
                        time_ids[j],
                        prior_inputs.noise[k],
                        prior_inputs.timesteps[k],
                        autocast,
                        unet_dtype,
                    )
                (loss / accumulation).backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trained, self.max_grad_norm)
            optimizer.step()
            if row_caps is not None:
                state.cap_rows(row_caps)
            return total

        run_step = _StepRunner(device_step, graphed=self.cuda_graphs)
        high = self._timestep_limit(noise_scheduler)
        # A step's loss is read (and reported) once the next step is queued: reading it waits
        # for the device, and waiting one step late lets the host queue step k while the device
        # still runs step k - 1. Host-to-device copies are non-blocking for the same reason.
        pending: tuple[int, torch.Tensor] | None = None
        try:
            for step in range(1, self.steps + 1):
                # Drawn on the host in the same order as ever: indices, then the noise and the
                # timesteps of each micro-batch.
                for k in range(accumulation):
                    indices = order.take(self.batch_size)
                    noise, timesteps = _draw_noise(gen, inputs.noise.shape[1:], high)
                    # Drawn only when on, so that runs without dropout draw as they always did.
                    keep = (
                        (torch.rand(self.batch_size, generator=gen) >= dropout).float()
                        if dropout
                        else None
                    )
                    inputs.fill(k, indices, noise, timesteps, keep)
                    if prior_order is not None:
                        indices = prior_order.take(self.batch_size) + n_identity
                        noise, timesteps = _draw_noise(gen, inputs.noise.shape[1:], high)
                        prior_inputs.fill(k, indices, noise, timesteps)
                total = run_step()
                if pending is not None:
                    final_loss = report(*pending)
                pending = (step, total)
            if pending is not None:
                final_loss = report(*pending)
        finally:
            bar.close()
        return final_loss

    def denoising_loss(
        self,
        identity: Identity | None,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        *,
        seed: int,
        repeats: int = 4,
    ) -> float:
        """The mean denoising loss of `identity` on `images` at fixed, seeded noise and timesteps.

        The same conditioning as `refine` (so a lower value means the identity explains the
        images better); nothing is trained and the pipeline is left as it was. With ``None``, a
        fresh identity as `refine` would start from is measured.

        Example:
            >>> before = refiner.denoising_loss(None, images, captions, seed=0)  # doctest: +SKIP
        """
        token = identity.token if identity is not None else self.token
        images, captions = self._check_inputs(identity, token, images, captions, seed)
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        height, width = self._training_size(images)
        pipe = self.pipeline
        device = pipe.unet.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        losses: list[float] = []
        with (
            _seeded(seed, device),
            self._trainable(identity, token, seed) as state,
            self._no_lora_input_cast(device),
            torch.no_grad(),
        ):
            latents = self._encode_images(images, height, width, gen)
            ids_1, ids_2 = state.tokenize(captions)
            time_ids = _time_ids(height, width, len(images), device)
            autocast, unet_dtype = self._autocast(device), pipe.unet.dtype  # once, as in refine
            high = self._timestep_limit(noise_scheduler)
            for _ in range(repeats):
                noise, timesteps = _draw_noise(gen, latents.shape, high)
                loss = self._loss(
                    state,
                    noise_scheduler,
                    latents,
                    ids_1,
                    ids_2,
                    time_ids,
                    _to_device(noise, device),
                    _to_device(timesteps, device),
                    autocast,
                    unet_dtype,
                )
                losses.append(float(loss))
        return sum(losses) / len(losses)

    # --------------------------------------------------------------- helpers

    def _check_inputs(
        self,
        identity: Identity | None,
        token: str,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        seed: int,
    ) -> tuple[list[Image.Image], list[str]]:
        if (
            isinstance(seed, bool)
            or not isinstance(seed, Integral)
            or not 0 <= int(seed) < MAX_SEED
        ):
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        images = list(images)
        if not images:
            raise ValueError("images is empty: refine needs at least one training image")
        for j, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise ValueError(f"images[{j}] must be a PIL.Image.Image, got {type(im).__name__}")
        if isinstance(captions, str):
            raise ValueError("captions must be a sequence of strings (one per image), got a str")
        captions = list(captions)
        if len(captions) != len(images):
            raise ValueError(
                f"need one caption per image: got {len(images)} images and {len(captions)} captions"
            )
        for j, caption in enumerate(captions):
            if not isinstance(caption, str) or token not in caption:
                raise ValueError(
                    f"captions[{j}] must contain the identity's token {token!r}, got {caption!r}"
                )
        if identity is not None:
            identity.check_fits(self.pipeline)
        names = identity.tokens if identity is not None else _token_names(token, self.num_vectors)
        self._check_tokens_free(names)
        return images, captions

    def _training_size(self, images: list[Image.Image]) -> tuple[int, int]:
        height = self.height or images[0].height
        width = self.width or images[0].width
        factor = self.pipeline.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"training size {height}x{width} is not a multiple of the VAE's factor {factor}: "
                "pass height= and width= to the refiner"
            )
        return height, width

    def _autocast(
        self, device: torch.device, *, cache: bool = True
    ) -> contextlib.AbstractContextManager[Any]:
        if not self._uses_autocast(device):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)

    def _uses_autocast(self, device: torch.device) -> bool:
        return self.mixed_precision == "bf16" or (
            self.mixed_precision == "auto" and device.type == "cuda"
        )

    def _no_lora_input_cast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Under autocast the LoRA matmuls run in bfloat16 anyway: peft's cast of each LoRA input
        to the float32 of the trained weights would only add copies (and their backward)."""
        try:
            from peft.helpers import disable_input_dtype_casting
        except ImportError:  # older peft: keep its casts
            return contextlib.nullcontext()
        return disable_input_dtype_casting(self.pipeline.unet, active=self._uses_autocast(device))

    @torch.no_grad()
    def _encode_images(
        self, images: list[Image.Image], height: int, width: int, gen: torch.Generator
    ) -> torch.Tensor:
        pipe = self.pipeline
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(
            [im.convert("RGB") for im in images], height=height, width=width
        )
        original_dtype = vae.dtype
        # As the pipeline does for decoding: SDXL's VAE overflows in float16.
        upcast = original_dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        per_call = _encode_batch(height, width)
        try:
            chunks = []
            for start in range(0, len(images), per_call):
                batch = pixels[start : start + per_call].to(vae.device, vae.dtype)
                # The posterior mean, not a sample: the UNet learned the distribution of clean
                # latents, and a VAE with a wide posterior (ToyWorld's: std 0.24 against a
                # latent spread of 2.7) would otherwise teach the identity a noisy look.
                chunks.append(vae.encode(batch).latent_dist.mode().float())
            latents = torch.cat(chunks)
        finally:
            if upcast:
                vae.to(original_dtype)
        config = vae.config
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, latents.shape[1], 1, 1)
            mean_t = torch.tensor(mean, device=latents.device).view(shape)
            std_t = torch.tensor(std, device=latents.device).view(shape)
            return (latents - mean_t) * config.scaling_factor / std_t
        return latents * config.scaling_factor

    def _timestep_limit(self, noise_scheduler: Any) -> int:
        """Timesteps are drawn below this: the scheduler's count, or `max_timestep` if lower."""
        high = int(noise_scheduler.config.num_train_timesteps)
        return high if self.max_timestep is None else min(high, self.max_timestep)

    def _loss(
        self,
        state: _TrainingState,
        noise_scheduler: Any,
        latents: torch.Tensor,
        ids_1: torch.Tensor,
        ids_2: torch.Tensor,
        time_ids: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        autocast: contextlib.AbstractContextManager[Any],
        dtype: torch.dtype,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SDXL's denoising loss of `latents` noised with `noise` at `timesteps` (all on the
        device): device work only, as a CUDA graph needs. Where `keep` is 0 the caption is
        dropped: both prompt embeddings are zeroed, SDXL's unconditional input."""
        unet = self.pipeline.unet
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(
                f"the scheduler's prediction_type {prediction_type!r} is not supported; "
                "expected 'epsilon' or 'v_prediction'"
            )
        with autocast:
            prompt_embeds, pooled = state.encode(ids_1, ids_2)
            if keep is not None:
                prompt_embeds = prompt_embeds * keep[:, None, None].to(prompt_embeds.dtype)
                pooled = pooled * keep[:, None].to(pooled.dtype)
            pred = unet(
                noisy.to(dtype),
                timesteps,
                encoder_hidden_states=prompt_embeds.to(dtype),
                added_cond_kwargs={
                    "text_embeds": pooled.to(dtype),
                    "time_ids": time_ids.to(dtype),
                },
                return_dict=False,
            )[0]
        return F.mse_loss(pred.float(), target.float())

    @contextlib.contextmanager
    def _trainable(
        self, identity: Identity | None, token: str, seed: int
    ) -> Iterator[_TrainingState]:
        """Installs the trainable rows and LoRA on the pipeline and restores it on exit."""
        pipe = self.pipeline
        modules: dict[str, nn.Module] = {
            "unet": pipe.unet,
            "vae": pipe.vae,
            "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2,
        }
        requires_grad = {
            name: [p.requires_grad for p in m.parameters()] for name, m in modules.items()
        }
        training = {name: [s.training for s in m.modules()] for name, m in modules.items()}
        encoders = (pipe.text_encoder, pipe.text_encoder_2)
        embeddings = [enc.get_input_embeddings() for enc in encoders]
        checkpointing = bool(getattr(pipe.unet, "is_gradient_checkpointing", False))
        had_adapters = bool(getattr(pipe.unet, "peft_config", None))
        active = list(pipe.unet.active_adapters()) if had_adapters else []
        added_adapter = False
        try:
            for m in modules.values():
                m.requires_grad_(False)
                m.eval()
            state = _TrainingState.build(
                pipe, identity, token, self, embeddings, train_rows=self.mode != "lora"
            )
            for enc, emb, wrapper in zip(encoders, embeddings, state.wrappers, strict=True):
                enc.set_input_embeddings(wrapper)
                del emb
            use_lora = self.mode != "ti" or (identity is not None and identity.lora is not None)
            if use_lora:
                added_adapter = True
                state.add_lora(pipe.unet, identity, self, seed, train=self.mode != "ti")
                pipe.unet.train()
            if self.gradient_checkpointing and not checkpointing:
                pipe.unet.enable_gradient_checkpointing()
            yield state
        finally:
            # Restore in reverse order; each step is safe if the matching install never ran.
            if self.gradient_checkpointing and not checkpointing:
                pipe.unet.disable_gradient_checkpointing()
            if added_adapter:
                _remove_adapter(pipe.unet, TRAIN_ADAPTER, active)
            for enc, emb in zip(encoders, embeddings, strict=True):
                enc.set_input_embeddings(emb)
            for name, m in modules.items():
                for p, flag in zip(m.parameters(), requires_grad[name], strict=True):
                    p.requires_grad_(flag)
                for s, flag in zip(m.modules(), training[name], strict=True):
                    s.training = flag

    def _settings(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "initializer_token": self.initializer_token,
            "lora_lr": self.lora_lr,
            "embedding_lr": self.embedding_lr,
            "weight_decay": self.weight_decay,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_grad_norm": self.max_grad_norm,
            "max_timestep": self.max_timestep,
            "lr_decay": self.lr_decay,
            "row_norm_cap": self.row_norm_cap,
            "prior_preservation": self.prior_preservation,
            "caption_dropout": self.caption_dropout,
            "mixed_precision": self.mixed_precision,
        }


# ---------------------------------------------------------------------- training state


class _EmbeddingWithNewRows(nn.Module):
    """The encoder's own token embedding, with trainable rows at the new token ids.

    The base matrix is used read-only, so no other row can change; ids at or beyond its size
    (the new tokens) are looked up as a placeholder row and replaced.
    """

    def __init__(self, base: nn.Embedding, token_ids: list[int], rows: nn.Parameter) -> None:
        super().__init__()
        self.base = base
        self.token_ids = token_ids
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `get_input_embeddings().weight` for shapes and dtypes.
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        for k, token_id in enumerate(self.token_ids):
            mask = (input_ids == token_id).unsqueeze(-1)
            out = torch.where(mask, self.rows[k].to(out.dtype), out)
        return out


@dataclass
class _TrainingState:
    token: str
    tokens: list[str]
    tokenizers: list[Any]
    wrappers: list[_EmbeddingWithNewRows]
    rows: list[nn.Parameter]
    train_rows: bool
    pipe: Any
    lora_params: list[nn.Parameter] = field(default_factory=list)
    train_lora: bool = False
    lora_rank: int = 4
    lora_alpha: float = 4.0
    target_modules: list[str] = field(default_factory=list)
    has_lora: bool = False
    #: How many times `refine` trained the warm-start identity before (0 for a new one).
    earlier_refines: int = 0

    @classmethod
    def build(
        cls,
        pipe: Any,
        identity: Identity | None,
        token: str,
        refiner: TextualInversionLoRARefiner,
        embeddings: list[nn.Module],
        *,
        train_rows: bool,
    ) -> _TrainingState:
        n = identity.num_vectors if identity is not None else refiner.num_vectors
        names = _token_names(token, n)
        tokenizers, wrappers, rows = [], [], []
        pairs = zip((pipe.tokenizer, pipe.tokenizer_2), embeddings, strict=True)
        for k, (tokenizer, emb) in enumerate(pairs):
            if not isinstance(emb, nn.Embedding):
                raise TypeError(
                    f"text encoder {k + 1}'s input embedding is a {type(emb).__name__}, "
                    "expected torch.nn.Embedding"
                )
            # A copy: the shared tokenizer must not learn the tokens.
            tok = copy.deepcopy(tokenizer)
            added = tok.add_tokens(names)
            if added != n:
                raise ValueError(f"could not add the tokens {names} to tokenizer {k + 1}")
            ids = tok.convert_tokens_to_ids(names)
            if identity is not None:
                init = (identity.clip_l, identity.clip_g)[k]
            else:
                init = _initial_rows(tokenizer, emb, refiner.initializer_token, n)
            param = nn.Parameter(
                init.detach().to(emb.weight.device, torch.float32).clone(),
                requires_grad=train_rows,
            )
            tokenizers.append(tok)
            rows.append(param)
            wrappers.append(_EmbeddingWithNewRows(emb, ids, param))
        return cls(
            token=token,
            tokens=names,
            tokenizers=tokenizers,
            wrappers=wrappers,
            rows=rows,
            train_rows=train_rows,
            pipe=pipe,
            earlier_refines=int(identity.metadata.get("refine_count", 0)) if identity else 0,
        )

    def add_lora(
        self,
        unet: Any,
        identity: Identity | None,
        refiner: TextualInversionLoRARefiner,
        seed: int,
        *,
        train: bool,
    ) -> None:
        from peft import LoraConfig, set_peft_model_state_dict

        warm = identity is not None and identity.lora is not None
        if warm:
            assert identity is not None and identity.lora is not None
            rank, alpha, targets = identity.lora_rank, identity.lora_alpha, identity.target_modules
        else:
            rank, alpha, targets = refiner.lora_rank, refiner.lora_alpha, refiner.target_modules
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: a float works
            target_modules=list(targets),
            init_lora_weights=True,
        )
        # peft draws lora_A from the global RNG: seed it so a seed gives one initialisation.
        torch.manual_seed(seed)
        try:
            unet.add_adapter(config, adapter_name=TRAIN_ADAPTER)
        except ValueError as err:
            raise IdentityError(f"cannot add a LoRA on {list(targets)} to the UNet: {err}") from err
        params = [p for n, p in unet.named_parameters() if f".{TRAIN_ADAPTER}." in n]
        if not params:
            raise IdentityError(f"no UNet module matches the LoRA target_modules {list(targets)}")
        for p in params:
            # float32 master weights whatever the UNet's dtype.
            p.data = p.data.float()
        if warm:
            assert identity is not None and identity.lora is not None
            state = {k: v.to(torch.float32) for k, v in identity.lora.items()}
            result = set_peft_model_state_dict(unet, state, adapter_name=TRAIN_ADAPTER)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            missing = [
                k for k in (getattr(result, "missing_keys", []) or []) if f".{TRAIN_ADAPTER}." in k
            ]
            if unexpected or missing:
                raise IdentityError(
                    f"identity {identity.token!r}'s LoRA does not match this UNet: "
                    f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:2]}), "
                    f"{len(missing)} missing (e.g. {missing[:2]})"
                )
        for p in params:
            p.requires_grad_(train)
        self.lora_params = params
        self.train_lora = train
        self.lora_rank, self.lora_alpha, self.target_modules = rank, float(alpha), list(targets)
        self.has_lora = True

    def optimizer(
        self,
        embedding_lr: float,
        lora_lr: float,
        weight_decay: float,
        mode: str,
        *,
        capturable: bool = False,
    ) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = []
        if self.train_rows:
            groups.append({"params": list(self.rows), "lr": embedding_lr})
        if self.train_lora:
            groups.append({"params": list(self.lora_params), "lr": lora_lr})
        if not groups:
            raise ValueError(f"mode {mode!r} leaves nothing to train")
        # One fused kernel for all tensors on CUDA: a LoRA on every attention projection of
        # SDXL is over a thousand small tensors.
        fused = self.rows[0].device.type == "cuda"
        return torch.optim.AdamW(
            groups, weight_decay=weight_decay, fused=fused or None, capturable=capturable
        )

    @torch.no_grad()
    def row_caps(self, ratio: float) -> list[torch.Tensor]:
        """`ratio` times the mean norm of each encoder's own rows, kept on the device (a
        read-back at every step would wait for the device)."""
        return [ratio * w.base.weight.float().norm(dim=-1).mean() for w in self.wrappers]

    @torch.no_grad()
    def cap_rows(self, caps: list[torch.Tensor]) -> None:
        """Scales each new row whose norm exceeds its encoder's cap down to the cap."""
        for cap, rows in zip(caps, self.rows, strict=True):
            norms = rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            rows.mul_(torch.clamp(cap / norms, max=1.0))

    def tokenize(
        self, captions: list[str], *, with_token: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of `captions` for both encoders; each must keep the identity's token
        (unless `with_token` is False: prior captions hold none)."""
        device = self.rows[0].device
        out = []
        for k, tok in enumerate(self.tokenizers):
            # The pipeline's own multi-vector expansion ("<t>" -> "<t> <t>_1 ...").
            expanded = [self.pipe.maybe_convert_prompt(c, tok) for c in captions]
            ids = tok(
                expanded,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            first = self.wrappers[k].token_ids[0]
            lost = [j for j in range(len(captions)) if not bool((ids[j] == first).any())]
            if lost and with_token:
                raise ValueError(
                    f"captions {lost} lose the token {self.token!r} to truncation at "
                    f"{tok.model_max_length} tokens: shorten them"
                )
            out.append(ids.to(device))
        return out[0], out[1]

    def encode(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's prompt encoding: both encoders' penultimate hidden states, encoder 2's pooled."""
        pipe = self.pipe
        out_1 = pipe.text_encoder(ids_1, output_hidden_states=True)
        out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        pooled = out_2[0]
        prompt_embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return prompt_embeds, pooled

    def identity(self, metadata: dict[str, Any]) -> Identity:
        lora = None
        if self.has_lora:
            from peft import get_peft_model_state_dict

            lora = {
                k: v.detach().to("cpu", torch.float32).clone()
                for k, v in get_peft_model_state_dict(
                    self.pipe.unet, adapter_name=TRAIN_ADAPTER
                ).items()
            }
        return Identity(
            token=self.token,
            clip_l=self.rows[0].detach().to("cpu", torch.float32).clone(),
            clip_g=self.rows[1].detach().to("cpu", torch.float32).clone(),
            lora=lora,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            target_modules=self.target_modules,
            metadata=metadata,
        )


# ----------------------------------------------------------------------------- helpers


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


def _check_prior(
    token: str,
    images: Sequence[Image.Image] | None,
    captions: Sequence[str] | None,
    weight: float,
) -> tuple[list[Image.Image], list[str]]:
    """The prior images and captions to train on: none when the weight is 0 or none are given."""
    if weight == 0 or not images:
        return [], []
    if captions is None or len(captions) != len(images):
        raise ValueError(
            f"got {len(images)} prior images but "
            f"{'no' if captions is None else len(captions)} prior captions"
        )
    for caption in captions:
        if not isinstance(caption, str) or token in caption.split():
            raise ValueError(
                f"a prior caption must be text without the identity's token {token!r}, "
                f"got {caption!r}"
            )
    return [im.convert("RGB") for im in images], list(captions)


def _draw_noise(
    gen: torch.Generator, shape: Sequence[int], high: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's noise and timesteps, drawn on the CPU generator so that a seed gives the
    same draws on every device."""
    noise = torch.randn(tuple(shape), generator=gen)
    timesteps = torch.randint(0, high, (shape[0],), generator=gen)
    return noise, timesteps


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
        _copy_from_host(self.indices[k], indices)
        _copy_from_host(self.noise[k], noise)
        _copy_from_host(self.timesteps[k], timesteps)
        if keep is not None:
            _copy_from_host(self.keep[k], keep)


class _StepRunner:
    """Runs a training step: eagerly, or (``graphed``) as a CUDA graph.

    Graphed, the first `warmup` calls run eagerly on a side stream (what PyTorch asks before a
    capture: lazy initialisation, the optimizer's state, cuBLAS workspaces). The next call
    captures the step and replays it, and every later call only replays it. A capture that fails
    leaves the runner eager. The step's returned tensor is graph memory that the next replay
    overwrites, so callers get a copy.
    """

    def __init__(
        self,
        step: Callable[[], torch.Tensor],
        *,
        graphed: bool,
        warmup: int = CUDA_GRAPH_WARMUP_STEPS,
    ) -> None:
        self.step = step
        self.graphed = graphed
        self.warmup = warmup
        self.calls = 0
        self.graph: Any = None
        self.output: torch.Tensor | None = None
        self.side: Any = None

    def __call__(self) -> torch.Tensor:
        if not self.graphed:
            return self.step()
        self.calls += 1
        if self.calls <= self.warmup:
            return self._on_side_stream()
        if self.graph is None:
            started = time.perf_counter()
            try:
                self.graph, self.output = self._capture()
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager
                logger.warning(
                    "could not capture the training step in a CUDA graph (%s: %s); "
                    "training on without one",
                    type(err).__name__,
                    err,
                )
                self.graphed, self.graph, self.output = False, None, None
                return self.step()
            logger.info(
                "captured the training step in a CUDA graph in %.2f s after %d eager steps",
                time.perf_counter() - started,
                self.warmup,
            )
        assert self.output is not None
        self.graph.replay()
        return self.output.clone()

    @staticmethod
    def check_device(device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs the pipeline on a CUDA device; its UNet is on {device}"
            )

    def _on_side_stream(self) -> torch.Tensor:
        if self.side is None:
            self.side = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)  # the inputs were filled on the main stream
        with torch.cuda.stream(self.side), warnings.catch_warnings():
            # AdamW warns that a capturable optimizer runs uncaptured: here it must, to warm up.
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            output = self.step()
        main.wait_stream(self.side)
        # Read on the main stream: its memory must not be reused before that read.
        output.record_stream(main)
        return output

    def _capture(self) -> tuple[Any, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.step()
        return graph, output


def _copy_from_host(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copies a host tensor into `target`; into CUDA from pinned memory without blocking, since
    a pageable copy waits for every kernel already queued on the stream."""
    cuda = target.device.type == "cuda"
    target.copy_(source.pin_memory() if cuda else source, non_blocking=cuda)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of a host tensor on `device`, made as `_copy_from_host` makes it."""
    out = torch.empty_like(tensor, device=device)
    _copy_from_host(out, tensor)
    return out


def _check_target_modules(unet: nn.Module, targets: Sequence[str]) -> None:
    """Every name in `targets` must name (as peft matches it: the whole module path or its end
    after a ".") at least one layer of `unet` that a LoRA can wrap."""
    wrappable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    layers = [name for name, m in unet.named_modules() if isinstance(m, wrappable)]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in layers):
            ends = []
            for name in layers:
                parts = name.split(".")
                end = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
                if end not in ends:
                    ends.append(end)
            raise InvalidValueError(
                f"refiner.target_modules names {target!r}, but no layer of the UNet that a LoRA "
                f"can wrap is called that; its layers end in {', '.join(ends[:10])}, ..."
            )


def _token_names(token: str, n: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _initial_rows(tokenizer: Any, embedding: nn.Embedding, word: str, n: int) -> torch.Tensor:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"initializer_token {word!r} tokenizes to nothing")
    rows = embedding.weight.detach()[torch.tensor(ids, device=embedding.weight.device)]
    return rows.float().mean(dim=0, keepdim=True).repeat(n, 1)


def _encode_batch(height: int, width: int) -> int:
    """Images per VAE encoder call at `height` x `width`: `ENCODE_BATCH`, fewer for large images
    so that a call holds at most `ENCODE_PIXELS` (never fewer than one)."""
    return max(1, min(ENCODE_BATCH, ENCODE_PIXELS // (height * width)))


def _time_ids(height: int, width: int, n: int, device: torch.device) -> torch.Tensor:
    # SDXL's micro-conditioning: original size, crop top-left, target size.
    return (
        torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        .repeat(n, 1)
        .to(device)
    )


def _remove_adapter(unet: Any, name: str, previously_active: list[str]) -> None:
    if name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(name)
    if getattr(unet, "peft_config", None):
        if previously_active:
            unet.set_adapter(previously_active)
    else:
        # delete_adapters leaves peft's wrappers (`to_q.base_layer`); unwrap to the original
        # modules.
        unet.unload_lora()


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds the global RNG for the block and restores the caller's state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _repeated_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's sub-modules whose class diffusers lists in ``_repeated_blocks``."""
    names = set(getattr(unet, "_repeated_blocks", None) or ())
    return [m for m in unet.modules() if type(m).__name__ in names]


@contextlib.contextmanager
def _compiled(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Compiles each block's call for the duration (what `nn.Module.compile` does) and gives
    back whatever the block had before, compiled by the caller or not."""
    # torch.compile caches by code object, so identical blocks, and later refines with new
    # LoRA layers of the same shapes, reuse one compiled graph instead of compiling again.
    before = [m._compiled_call_impl for m in blocks]
    try:
        for m in blocks:
            m.compile()
        yield
    finally:
        for m, impl in zip(blocks, before, strict=True):
            m._compiled_call_impl = impl


def _progress(total: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="refine", disable=not show, leave=False)


def _metadata(
    previous: Identity | None,
    settings: dict[str, Any],
    seed: int,
    num_images: int,
    final_loss: float,
) -> dict[str, Any]:
    metadata = dict(previous.metadata) if previous is not None else {}
    refines = int(metadata.get("refine_count", 0)) + 1
    metadata["refine_count"] = refines
    metadata["refiner"] = {
        **settings,
        "seed": int(seed),
        "num_images": num_images,
        "final_loss": None if math.isnan(final_loss) else final_loss,
        "warm_start": previous is not None,
    }
    return metadata


def _check_known(settings: dict[str, Any]) -> None:
    import inspect

    params = inspect.signature(TextualInversionLoRARefiner.__init__).parameters
    known = [name for name, p in params.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise TypeError(
            f"unknown TextualInversionLoRARefiner setting(s) {unknown}; known: {', '.join(known)}"
        )
    values = {name: settings.get(name, params[name].default) for name in known}
    values.pop("gradient_checkpointing")
    values.pop("compile_blocks")
    values.pop("cuda_graphs")
    values.pop("show_progress")
    _check_settings(**values)


def _check_settings(
    *,
    mode: str,
    token: str,
    initializer_token: str,
    num_vectors: int,
    lora_rank: int,
    lora_alpha: float | None,
    target_modules: Sequence[str],
    lora_lr: float,
    embedding_lr: float,
    weight_decay: float,
    steps: int,
    batch_size: int,
    gradient_accumulation_steps: int,
    max_grad_norm: float | None,
    max_timestep: int | None,
    lr_decay: float,
    row_norm_cap: float | None,
    prior_preservation: float,
    caption_dropout: float,
    height: int | None,
    width: int | None,
    mixed_precision: str,
) -> None:
    if (
        isinstance(caption_dropout, bool)
        or not isinstance(caption_dropout, int | float)
        or not 0 <= caption_dropout < 1
    ):
        raise ValueError(f"caption_dropout must be a number in [0, 1), got {caption_dropout!r}")
    if (
        isinstance(prior_preservation, bool)
        or not isinstance(prior_preservation, int | float)
        or not math.isfinite(prior_preservation)
        or prior_preservation < 0
    ):
        raise ValueError(
            f"prior_preservation must be a finite number >= 0, got {prior_preservation!r}"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise ValueError(f"token must be a non-empty word without spaces, got {token!r}")
    if not isinstance(initializer_token, str) or not initializer_token.strip():
        raise ValueError(f"initializer_token must be a non-empty word, got {initializer_token!r}")
    for name, value in (
        ("num_vectors", num_vectors),
        ("lora_rank", lora_rank),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    for name, rate in (("lora_lr", lora_lr), ("embedding_lr", embedding_lr)):
        if not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"{name} must be a number > 0, got {rate!r}")
    if lora_alpha is not None and (not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0):
        raise ValueError(f"lora_alpha must be None or a number > 0, got {lora_alpha!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and (
        not isinstance(max_grad_norm, (int, float)) or max_grad_norm <= 0
    ):
        raise ValueError(f"max_grad_norm must be None or a number > 0, got {max_grad_norm!r}")
    if max_timestep is not None and (
        isinstance(max_timestep, bool) or not isinstance(max_timestep, int) or max_timestep < 1
    ):
        raise ValueError(f"max_timestep must be None or an int >= 1, got {max_timestep!r}")
    if (
        isinstance(lr_decay, bool)
        or not isinstance(lr_decay, (int, float))
        or not 0 < lr_decay <= 1
    ):
        raise ValueError(f"lr_decay must be a number in (0, 1], got {lr_decay!r}")
    if row_norm_cap is not None and (
        isinstance(row_norm_cap, bool)
        or not isinstance(row_norm_cap, (int, float))
        or not row_norm_cap > 0
    ):
        raise ValueError(f"row_norm_cap must be None or a number > 0, got {row_norm_cap!r}")
    if isinstance(target_modules, str) or not list(target_modules):
        raise ValueError(
            f"target_modules must be a non-empty list of module names, got {target_modules!r}"
        )
    for name, size in (("height", height), ("width", width)):
        if size is not None and (not isinstance(size, int) or size < 8):
            raise ValueError(f"{name} must be None or an int >= 8, got {size!r}")
    if mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'no'; got {mixed_precision!r}")
