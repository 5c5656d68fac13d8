"""`TextualInversionLoRARefiner`: the paper's refinement step, ``Θ ← refine(Θ, S[c*])``.

Θ is a new token in each of SDXL's two text encoders (textual inversion) plus a LoRA on the UNet's
attention projections, trained together with SDXL's own denoising loss (`denoising`). How the
shared pipeline is patched for training and restored is in `state`, the optimisation in
`training`, the optional speed-ups in `acceleration`, and every setting's default and check in
`settings`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from consistent_char.config import SettingsAttributes
from consistent_char.errors import InvalidValueError
from consistent_char.generators.sdxl import check_sdxl_components
from consistent_char.identity import Identity
from consistent_char.refiners.ti_lora import acceleration, denoising, encoding
from consistent_char.refiners.ti_lora.acceleration import (
    _StepRunner,
    compiled,
    no_lora_input_cast,
    repeated_blocks,
    to_device,
    uses_autocast,
)
from consistent_char.refiners.ti_lora.control import TrainingControl
from consistent_char.refiners.ti_lora.denoising import Batch
from consistent_char.refiners.ti_lora.inputs import (
    check_inputs,
    check_prior,
    training_size,
)
from consistent_char.refiners.ti_lora.settings import RefinerSettings
from consistent_char.refiners.ti_lora.state import (
    _TrainingState,
    check_target_modules,
    check_tokens_free,
    token_names,
    trainable,
)
from consistent_char.refiners.ti_lora.training import StepCallback, optimise

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

    from consistent_char.config import RefinerConfig

#: The settings an identity's metadata records of the refine that trained it.
RECORDED_SETTINGS = (
    "mode",
    "initializer_token",
    "lora_lr",
    "embedding_lr",
    "weight_decay",
    "steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "max_timestep",
    "lr_decay",
    "row_norm_cap",
    "prior_preservation",
    "caption_dropout",
    "mixed_precision",
    "controlnet",
    "control_annotator",
    "control_scale",
)


class TextualInversionLoRARefiner(SettingsAttributes):
    """Learns an identity from images: new tokens in both text encoders + a UNet LoRA.

    Build it with `from_pipeline` (shares a loaded pipeline, e.g. `SDXLGenerator.pipeline`, so
    the model is in memory once), `from_config` (the loop's `RefinerConfig`) or `from_pretrained`.
    The keyword settings below are the fields of `RefinerSettings`, which holds their defaults
    and checks them; each also reads (and, checked again, writes) as an attribute of the
    refiner (``refiner.steps``).

    Args:
        pipeline: A loaded `StableDiffusionXLPipeline`; trained in place and restored.
        mode: ``"ti_lora"`` (the paper: tokens and LoRA), ``"ti"`` (tokens only; no LoRA, or a
            warm-start LoRA kept frozen) or ``"lora"`` (LoRA only; the token rows stay at their
            initialisation or warm-start values).
        token: The placeholder token of a new identity (a warm start keeps the identity's own).
        initializer_token: Word whose embedding (the mean over its sub-word tokens) initialises
            the new token rows of a new identity, in each encoder.
        num_vectors: Rows per text encoder for a new identity (diffusers' multi-vector names
            ``token``, ``token_1``, ...). The first starts at the initializer word's embedding;
            each further one at that embedding moved in a random direction (drawn from the
            refine's seed) by a tenth of its norm, so the vectors start distinct.
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
        controlnet, control_annotator, control_scale: Refine through a ControlNet (a folder,
            a hub id or ``"toy"``): every loss adds its residuals, at `control_scale`, for each
            image's own control image, made by the annotator (``"module:function"``); see
            `consistent_char.refiners.ti_lora.control` (``None``: off, the paper's loss).
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

    Raises:
        TypeError: A keyword that is no setting.
        ConfigError: A setting's value is out of range or of the wrong type (a `ValueError`;
            the message names each such setting and why).
        ValueError: The pipeline lacks an SDXL component, or `compile_blocks` on a UNet that
            names no repeated blocks.

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

    SETTINGS = RefinerSettings
    settings: RefinerSettings

    def __init__(self, pipeline: StableDiffusionXLPipeline, **settings: Any) -> None:
        self.settings = RefinerSettings.from_keywords(settings, "TextualInversionLoRARefiner")
        check_sdxl_components(pipeline, "the refiner")
        if self.settings.compile_blocks and not repeated_blocks(pipeline.unet):
            raise ValueError(
                "compile_blocks=True needs a UNet that names its repeated blocks (diffusers' "
                f"_repeated_blocks); {type(pipeline.unet).__name__} has none"
            )
        # Any: diffusers registers the components at run time, invisible to type checkers.
        self.pipeline: Any = pipeline
        self._control: tuple[tuple[Any, ...], TrainingControl] | None = None

    @property
    def lora_alpha(self) -> float:
        """The LoRA alpha a new identity gets: `lora_alpha`, or the rank when that is None."""
        return self.settings.lora_alpha_value

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
    def from_config(
        cls, pipeline: StableDiffusionXLPipeline, config: RefinerConfig, **settings: Any
    ) -> TextualInversionLoRARefiner:
        """Trains on `pipeline` with the loop's refiner settings (`ExtractorConfig.refiner`);
        `settings` replace some of them or set those the loop leaves at their defaults.

        Example:
            >>> from consistent_char.config import ExtractorConfig
            >>> from consistent_char.testing import tiny_sdxl_pipeline
            >>> config = ExtractorConfig.build({"refiner": {"steps": 20}}).refiner
            >>> TextualInversionLoRARefiner.from_config(tiny_sdxl_pipeline(), config).steps
            20
        """
        return cls(pipeline, **{**config.model_dump(), **settings})

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

        # Before the minutes a load takes.
        RefinerSettings.from_keywords(settings, "TextualInversionLoRARefiner")
        return cls(
            load_sdxl_pipeline(id_or_local_dir, device=device, dtype=dtype, variant=variant),
            **settings,
        )

    # ----------------------------------------------------------------- check

    def check_ready(self, identity: Identity | None = None) -> None:
        """Raises the errors `refine` would raise about its settings, without training: the
        token is free in both tokenizers, `initializer_token` tokenizes, and every LoRA target
        module names a layer of the UNet that a LoRA can wrap, and a `controlnet` loads, fits
        the UNet and has an annotator. Cheap (but for loading that ControlNet); the extractor
        calls it before it draws iteration 0.

        Raises:
            InvalidValueError: One of those does not hold; the message says what to change.
            consistent_char.control.ControlNetMismatchError: The ControlNet is for another
                base model.

        Example:
            >>> refiner.check_ready()  # doctest: +SKIP
        """
        s = self.settings
        token = identity.token if identity is not None else s.token
        names = identity.tokens if identity is not None else token_names(token, s.num_vectors)
        check_tokens_free(self.pipeline, names)
        if identity is None:
            for tokenizer in (self.pipeline.tokenizer, self.pipeline.tokenizer_2):
                if not tokenizer(s.initializer_token, add_special_tokens=False).input_ids:
                    raise InvalidValueError(
                        f"refiner.initializer_token {s.initializer_token!r} tokenizes to "
                        "nothing; choose an ordinary word, e.g. 'person'"
                    )
        warm_lora = identity is not None and identity.lora is not None
        if s.mode != "ti" or warm_lora:
            targets = identity.target_modules if warm_lora and identity else s.target_modules
            check_target_modules(self.pipeline.unet, targets)
        self.training_control()

    def training_control(self) -> TrainingControl | None:
        """The ControlNet the loss runs through (`controlnet`, loaded once), or None."""
        s = self.settings
        if s.controlnet is None or s.control_annotator is None:
            return None
        key = (s.controlnet, s.control_annotator, s.control_scale)
        if self._control is None or self._control[0] != key:
            self._control = (key, TrainingControl.load(self.pipeline, *key))
        return self._control[1]

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
        # 1. Check the inputs
        pipe, s = self.pipeline, self.settings
        token = identity.token if identity is not None else s.token
        images, captions = check_inputs(pipe, identity, token, images, captions, seed, s)
        prior_images, prior_captions = check_prior(
            token, prior_images, prior_captions, s.prior_preservation
        )
        height, width = training_size(pipe, images, s.height, s.width)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with self._training(identity, token, seed, accelerate=True) as state:
            # 2. Encode the images and tokenise the captions once (the VAE is frozen); prior
            #    images, if any, come after the identity's, with their own captions.
            data = self._batch(
                state, [*images, *prior_images], captions, prior_captions, height, width
            )
            control = self._with_control(data, [*images, *prior_images], height, width)
            # 3. Optimise the new rows and the LoRA with SDXL's denoising loss
            autocast = self._autocast(pipe.unet.device, cache=not s.cuda_graphs)
            final_loss = optimise(
                s, pipe, state, data, len(images), gen, autocast, callback, control
            )
            # 4. Read the identity out before the pipeline is restored
            metadata = _metadata(identity, self._settings(), seed, len(images), final_loss)
            return state.identity(metadata=metadata)

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
        pipe, s = self.pipeline, self.settings
        token = identity.token if identity is not None else s.token
        images, captions = check_inputs(pipe, identity, token, images, captions, seed, s)
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        height, width = training_size(pipe, images, s.height, s.width)
        unet = pipe.unet
        device = unet.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        scheduler = denoising.noise_scheduler(pipe)
        high = denoising.timestep_limit(scheduler, s.max_timestep)
        losses: list[float] = []
        with self._training(identity, token, seed, accelerate=False) as state, torch.no_grad():
            data = self._batch(state, images, captions, [], height, width)
            control = self._with_control(data, images, height, width)
            autocast, unet_dtype = self._autocast(device), unet.dtype  # once, as in refine
            for _ in range(repeats):
                noise, timesteps = denoising.draw_noise(gen, data.latents.shape, high)
                loss = denoising.sdxl_loss(
                    unet,
                    state,
                    scheduler,
                    data,
                    to_device(noise, device),
                    to_device(timesteps, device),
                    autocast,
                    unet_dtype,
                    control=control,
                )
                losses.append(float(loss))
        return sum(losses) / len(losses)

    # --------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _training(
        self, identity: Identity | None, token: str, seed: int, *, accelerate: bool
    ) -> Iterator[_TrainingState]:
        """The pipeline ready to train `identity`: the global RNG seeded, the new rows and the
        LoRA installed (`state.trainable`), and with `accelerate` the step's optional speed-ups;
        all of it undone on exit."""
        unet, s = self.pipeline.unet, self.settings
        if accelerate and s.cuda_graphs:
            _StepRunner.check_device(unet.device)
        blocks = repeated_blocks(unet) if accelerate and s.compile_blocks else []
        with (
            _seeded(seed, unet.device),
            trainable(self.pipeline, s, identity, token, seed) as state,
            no_lora_input_cast(unet, active=self._uses_autocast(unet.device)),
            compiled(blocks),
        ):
            yield state

    def _batch(
        self,
        state: _TrainingState,
        images: list[Image.Image],
        captions: list[str],
        prior_captions: list[str],
        height: int,
        width: int,
    ) -> Batch:
        """The images' latents, the token ids of the captions (the new tokens expanded as
        diffusers does) followed by those of `prior_captions`, and SDXL's time ids."""
        latents = encoding.encode_images(self.pipeline, images, height, width)
        ids_1, ids_2 = state.tokenize(captions)
        if prior_captions:
            prior_1, prior_2 = state.tokenize(prior_captions, with_token=False)
            ids_1, ids_2 = torch.cat([ids_1, prior_1]), torch.cat([ids_2, prior_2])
        device = self.pipeline.unet.device
        return Batch(latents, ids_1, ids_2, denoising.time_ids(height, width, len(images), device))

    def _with_control(
        self, data: Batch, images: list[Image.Image], height: int, width: int
    ) -> TrainingControl | None:
        """Puts the control images of `images` (the rows of `data`) into `data`, when refining
        through a ControlNet; returns that ControlNet's `TrainingControl` or None."""
        control = self.training_control()
        if control is not None:
            data.control = control.control_images(images, height, width)
        return control

    def _autocast(
        self, device: torch.device, *, cache: bool = True
    ) -> contextlib.AbstractContextManager[Any]:
        """The autocast region the UNet runs in on `device` (none without mixed precision)."""
        return acceleration.autocast(self._uses_autocast(device), device, cache=cache)

    def _uses_autocast(self, device: torch.device) -> bool:
        """Whether the UNet runs under bfloat16 autocast on `device` (`mixed_precision`)."""
        return uses_autocast(self.settings.mixed_precision, device)

    def _settings(self) -> dict[str, Any]:
        """The settings an identity records (`RECORDED_SETTINGS`)."""
        return {name: getattr(self.settings, name) for name in RECORDED_SETTINGS}


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds the global RNG for the block and restores the caller's state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _metadata(
    previous: Identity | None,
    settings: dict[str, Any],
    seed: int,
    num_images: int,
    final_loss: float,
) -> dict[str, Any]:
    """The new identity's metadata: the previous identity's, the refine count, and this
    refine's settings, seed and outcome."""
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
