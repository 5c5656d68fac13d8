"""`SDXLGenerator`: the default `Generator`, over diffusers' `StableDiffusionXLPipeline`.

Every image has its own `torch.Generator`, seeded from its own seed, so image j depends only on
``prompts[j]`` and ``seeds[j]``: not on the images drawn before it, and on its batch only by
rounding (a batched matmul rounds differently: a grey level at most on the tiny models).
The generators live on the CPU, as diffusers recommends for reproducibility, so the starting noise
of a seed is the same on every device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from numbers import Integral
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from consistent_char.config import SettingsAttributes
from consistent_char.errors import InvalidValueError
from consistent_char.generators.loading import check_sdxl_components, load_sdxl_pipeline
from consistent_char.generators.schedulers import scheduler_class
from consistent_char.generators.settings import GeneratorSettings
from consistent_char.generators.sharding import (
    copy_pipeline,
    draw_shards,
    plan_shards,
    resolve_devices,
)
from consistent_char.identity import Identity

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = ["ProgressCallback", "SDXLGenerator", "check_sdxl_components", "load_sdxl_pipeline"]

logger = logging.getLogger(__name__)

#: ``callback(done, total)``: images finished so far out of the images asked for.
ProgressCallback = Callable[[int, int], None]

MAX_SEED = 2**63
#: Images per batch on CPU when `batch_size` is automatic.
CPU_BATCH_CAP = 8
#: Images per batch on CUDA, at most, when `batch_size` is automatic.
CUDA_BATCH_CAP = 64
#: CUDA memory one image costs beyond the weights, per latent pixel and per UNet pass
#: (classifier-free guidance makes two). Full-size SDXL in bfloat16 at 1024x1024 with guidance
#: peaked at 2.0 GiB per image on an H200 (65,536 bytes per latent pixel and pass, linear in
#: the batch size from 1 to 8); doubled here as headroom for float16 pipelines, whose VAE
#: decodes in float32. An out-of-memory error still halves the batch.
CUDA_BYTES_PER_LATENT_PIXEL = 131_072


class SDXLGenerator(SettingsAttributes):
    """Draws images with an SDXL-architecture pipeline, one seed per image.

    Build it with `from_pretrained` (loads a checkpoint) or `from_pipeline` (wraps a loaded
    pipeline, which is shared, not copied). The constructor itself takes a pipeline too.

    Args:
        pipeline: A loaded `StableDiffusionXLPipeline` (or an instance of a subclass).
        num_inference_steps: Denoising steps per image.
        guidance_scale: Classifier-free guidance scale (1 or less disables guidance).
        guidance_rescale: Rescales the guided noise prediction to the standard deviation of
            the conditional one, mixed in by this fraction (0 is off, 1 fully rescaled; Lin et
            al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2023). Guidance
            inflates the prediction's scale, which shows as over-saturated colours; a loop that
            trains on its own guided images compounds that every round.
        height: Image height in pixels; ``None`` is the pipeline's default (1024 for SDXL).
        width: Image width in pixels; ``None`` is the pipeline's default.
        batch_size: Images per pipeline call; ``None`` picks one: all images at once on CPU up to
            `CPU_BATCH_CAP`, on CUDA as many as the free memory is estimated to hold (memory
            PyTorch has cached but not used counts as free); in both cases split evenly over
            the fewest calls.
        negative_prompt: Negative prompt for every image.
        lora_scale: Strength of an identity's LoRA while it is applied (1 = as learned).
        fuse_identity: Merge the identity's LoRA into the UNet weights for the call, and restore
            the exact weights after it. ``None`` fuses on CUDA only. On an H200 the UNet ran
            14% faster fused than with peft's LoRA layers (16.9 against 19.6 ms per sample at
            1024², `benchmarks/iteration.py`). Fused images differ from unfused ones by
            rounding, so stock diffusers' unfused loading matches the library exactly only
            unfused. Skipped when another LoRA adapter is active: a merged peft layer would
            stop applying it.
        show_progress: Show diffusers' per-batch denoising progress bar.
        scheduler: The name of a diffusers scheduler class to sample with instead of the
            pipeline's own, e.g. ``"EulerAncestralDiscreteScheduler"``. It is built from the
            pipeline's scheduler config (same noise schedule) and swapped in for each call only,
            so a shared pipeline keeps its own. A stochastic ("ancestral" or SDE) sampler draws
            its fresh noise from each image's own generator, so image j still depends only on
            its prompt and seed.
        devices: Devices that draw each call's images together (`sharding` says how): ``None``
            is the pipeline's device alone, ``"auto"`` every visible CUDA device, or a list
            starting with the pipeline's device (``["cuda:0", "cuda:1"]``). The pipeline is
            copied onto each further device when the generator is built (copies of its state
            then: a LoRA the user loads into it later is not copied); the images are byte for
            byte those of one device drawing the same batches.

    Example:
        >>> from consistent_char.generators.sdxl import SDXLGenerator
        >>> from consistent_char.testing import tiny_sdxl_pipeline
        >>> gen = SDXLGenerator.from_pipeline(tiny_sdxl_pipeline(), num_inference_steps=2)
        >>> images = gen.generate(["a photo of a cat", "a dog"], seeds=[0, 1])
        >>> [im.size for im in images]
        [(32, 32), (32, 32)]
    """

    SETTINGS = GeneratorSettings
    settings: GeneratorSettings

    def __init__(self, pipeline: StableDiffusionXLPipeline, **settings: Any) -> None:
        self.settings = GeneratorSettings.from_keywords(settings, "SDXLGenerator")
        check_sdxl_components(pipeline, "SDXLGenerator")
        # Any: diffusers registers the components at run time, invisible to type checkers.
        self.pipeline: Any = pipeline
        self._workers()  # the devices are checked, and the pipeline copied, at the door

    @property
    def _scheduler(self) -> Any:
        """The scheduler to sample with (built from the pipeline's own config), or None."""
        name = self.settings.scheduler
        if name is None:
            return None
        # Built once per name: `scheduler` may be assigned after construction.
        if getattr(self, "_built_scheduler", (None, None))[0] != name:
            built = scheduler_class(name).from_config(self.pipeline.scheduler.config)
            self._built_scheduler = (name, built)
        return self._built_scheduler[1]

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_pretrained(
        cls,
        id_or_local_dir: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        **settings: Any,
    ) -> SDXLGenerator:
        """Loads a diffusers SDXL checkpoint (hub id or local folder) and wraps it.

        Args:
            id_or_local_dir: A hub id (``"stabilityai/stable-diffusion-xl-base-1.0"``) or a
                folder written by `save_pretrained`.
            device: Where the pipeline runs; ``None`` is CUDA when available, else CPU.
            dtype: Weight dtype; ``None`` is bfloat16 on CUDA (SDXL's VAE overflows in float16)
                and float32 on CPU.
            variant: The checkpoint variant to load (e.g. ``"fp16"``), if any.
            **settings: Keyword settings of `SDXLGenerator`.

        Raises:
            FileNotFoundError: A local path that does not exist or holds no ``model_index.json``
                (checked before anything loads).

        Example:
            >>> gen = SDXLGenerator.from_pretrained(
            ...     "stabilityai/stable-diffusion-xl-base-1.0", device="cuda"
            ... )  # doctest: +SKIP
        """
        # Validate settings (and devices) before the (slow) load.
        checked = GeneratorSettings.from_keywords(settings, "SDXLGenerator")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        resolve_devices(checked.devices, torch.device(device))
        pipe = load_sdxl_pipeline(id_or_local_dir, device=device, dtype=dtype, variant=variant)
        return cls(pipe, **settings)

    @classmethod
    def from_pipeline(cls, pipeline: StableDiffusionXLPipeline, **settings: Any) -> SDXLGenerator:
        """Wraps an already loaded pipeline (shared: nothing is copied or moved, but for the
        copies that further `devices` draw on).

        Example:
            >>> from consistent_char.testing import tiny_sdxl_pipeline
            >>> gen = SDXLGenerator.from_pipeline(tiny_sdxl_pipeline(), guidance_scale=5.0)
        """
        return cls(pipeline, **settings)

    # -------------------------------------------------------------- generate

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        identity: Identity | None = None,
        *,
        callback: ProgressCallback | None = None,
    ) -> list[Image.Image]:
        """Draws one RGB image per prompt, image j from ``seeds[j]`` alone.

        Args:
            prompts: One prompt per image. With an `identity`, write its token in the prompt
                (``f"{identity.token} in the snow"``).
            seeds: One seed per image, ints in ``[0, 2**63)``.
            identity: Applied (tokens in both text encoders, LoRA active) for this call only.
            callback: Called as ``callback(done, total)`` after each batch.

        Returns:
            ``len(prompts)`` RGB `PIL.Image.Image`\\ s.

        Raises:
            ValueError: Empty input, lengths that differ, or a seed out of range.
            IdentityError: The identity does not fit the pipeline (embedding widths).

        Example:
            >>> from consistent_char.testing import tiny_sdxl_pipeline, tiny_identity
            >>> pipe = tiny_sdxl_pipeline()
            >>> gen = SDXLGenerator.from_pipeline(pipe, num_inference_steps=2)
            >>> fox = tiny_identity(pipe, "<fox>")
            >>> len(gen.generate(["a <fox> in the snow"], [7], identity=fox))
            1
        """
        # 1. Check inputs
        prompts, seed_list = self.check_inputs(prompts, seeds)
        if identity is not None:
            identity.check_fits(self.pipeline)
            if not any(identity.token in p for p in prompts):
                logger.warning(
                    "identity %r is applied but no prompt contains its token", identity.token
                )

        # 2. Deal the batches one device would draw to the devices, a contiguous run each
        workers = self._workers()
        batch = self.batch_size or self._auto_batch_size(
            len(prompts), *self.resolution, workers[1:]
        )
        shards = plan_shards(len(prompts), batch, len(workers))
        if len(shards) < len(workers):
            logger.warning(
                "%d image(s) in batches of %d keep %d of %d devices busy: lower batch_size",
                len(prompts),
                batch,
                len(shards),
                len(workers),
            )
        with contextlib.ExitStack() as applied:
            # 3. Apply the identity to each pipeline used, for this call only. In turn: applying
            #    draws from the global RNG and puts its state back, which threads would tangle.
            for worker, _ in zip(workers, shards, strict=False):
                applied.enter_context(worker.applied(identity))
            # 4. Each device draws its shard, all at once; the images come back in order
            jobs = [
                functools.partial(worker._draw_shard, prompts[a:b], seed_list[a:b], batch)
                for worker, (a, b) in zip(workers, shards, strict=False)
            ]
            return draw_shards(jobs, len(prompts), callback)

    def _workers(self) -> list[SDXLGenerator]:
        """This generator and one per further device of `devices`, each on its own copy of the
        pipeline and sharing these settings (copied once per device list)."""
        devices = resolve_devices(self.devices, self.pipeline.device)
        key = tuple(str(d) for d in devices)
        if getattr(self, "_copies", (None, None))[0] != key:
            copies = []
            for device in devices[1:]:
                logger.info("copying the pipeline onto %s", device)
                worker = SDXLGenerator(copy_pipeline(self.pipeline, device))
                worker.settings = self.settings  # a setting assigned later reaches every device
                copies.append(worker)
            self._copies = (key, copies)
        return [self, *self._copies[1]]

    @contextlib.contextmanager
    def applied(self, identity: Identity | None) -> Iterator[None]:
        """Applies `identity` (tokens, LoRA at `lora_scale`, fused as `fuse_identity` says) and
        this generator's `sampler` for the block, and leaves the pipeline as it was after it.

        `generate` draws inside it; other pipelines built from ``self.pipeline``'s components
        (diffusers' ``from_pipe``: inpainting, img2img) inside the block share the identity and
        the sampler.

        Example:
            >>> with generator.applied(identity):  # doctest: +SKIP
            ...     pipe = StableDiffusionXLInpaintPipeline.from_pipe(generator.pipeline)
        """
        if identity is not None:
            identity.apply_to(self.pipeline, scale=self.lora_scale)
        try:
            with self._fused(identity), self.sampler():
                yield
        finally:
            # Leave the pipeline as it was
            if identity is not None:
                identity.remove_from(self.pipeline)

    def _draw_shard(
        self, prompts: list[str], seeds: list[int], batch: int, report: ProgressCallback
    ) -> list[Image.Image]:
        device = self.pipeline.device
        # On a worker thread the current CUDA device is the default one: make it this one's.
        place = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with place:
            return self._generate_batches(prompts, seeds, report, batch)

    @contextlib.contextmanager
    def sampler(self) -> Iterator[None]:
        """Swaps in the `scheduler` setting's sampler, and puts the pipeline's own back after.

        `generate` samples inside it; use it to call ``self.pipeline`` directly (e.g. with
        ``prompt_embeds``) with the sampler this generator draws with.

        Example:
            >>> with generator.sampler():  # doctest: +SKIP
            ...     images = generator.pipeline(prompt_embeds=embeds, ...).images
        """
        own = self.pipeline.scheduler
        if self._scheduler is not None:
            self.pipeline.scheduler = self._scheduler
        try:
            yield
        finally:
            self.pipeline.scheduler = own

    @contextlib.contextmanager
    def _fused(self, identity: Identity | None) -> Iterator[None]:
        """Merges the applied identity's LoRA into the UNet weights (see `fuse_identity`)."""
        unet = self.pipeline.unet
        fuse = self.fuse_identity
        if fuse is None:
            fuse = unet.device.type == "cuda"
        if not fuse or identity is None or identity.lora is None:
            yield
            return
        from peft.tuners.lora import LoraLayer

        name = identity.adapter_name
        layers: list[Any] = [
            m for m in unet.modules() if isinstance(m, LoraLayer) and name in m.lora_A
        ]
        others = set(self.pipeline.get_active_adapters()) - {name}
        if not layers or others:
            yield
            return
        # peft's unmerge subtracts the update again, which is not exact in bfloat16: keep the
        # original weights and copy them back.
        originals = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        unet.fuse_lora(adapter_names=[name])
        try:
            yield
        finally:
            unet.unfuse_lora()
            with torch.no_grad():
                for layer, weight in zip(layers, originals, strict=True):
                    layer.get_base_layer().weight.copy_(weight)

    def check_inputs(
        self, prompts: Sequence[str], seeds: Sequence[int]
    ) -> tuple[list[str], list[int]]:
        """The prompts and seeds as lists, checked: one int seed in ``[0, 2**63)`` per prompt.

        Raises:
            InvalidValueError: Empty input, lengths that differ, or a bad prompt or seed.
        """
        if isinstance(prompts, str):
            raise InvalidValueError("prompts must be a sequence of strings, got a single string")
        prompts = list(prompts)
        seed_list = list(seeds)
        if not prompts:
            raise InvalidValueError("prompts is empty: need at least one prompt")
        if len(prompts) != len(seed_list):
            raise InvalidValueError(
                f"need one seed per prompt: got {len(prompts)} prompts and {len(seed_list)} seeds"
            )
        for j, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InvalidValueError(f"prompts[{j}] must be a str, got {type(p).__name__}")
        out: list[int] = []
        for j, s in enumerate(seed_list):
            if isinstance(s, bool) or not isinstance(s, Integral):
                raise InvalidValueError(f"seeds[{j}] must be an int, got {type(s).__name__} {s!r}")
            if not 0 <= int(s) < MAX_SEED:
                raise InvalidValueError(f"seeds[{j}] must be in [0, 2**63), got {s}")
            out.append(int(s))
        return prompts, out

    def _generate_batches(
        self, prompts: list[str], seeds: list[int], callback: ProgressCallback, batch: int
    ) -> list[Image.Image]:
        pipe = self.pipeline
        height, width = self.resolution
        total = len(prompts)
        images: list[Image.Image] = []
        previous_bar = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=not self.show_progress)
        try:
            start = 0
            while start < total:
                stop = min(start + batch, total)
                try:
                    images += self._call_pipeline(
                        prompts[start:stop],
                        seeds[start:stop],
                        height,
                        width,
                        **self._call_kwargs(start, stop),
                    )
                except torch.cuda.OutOfMemoryError:
                    if batch == 1 or self.batch_size is not None:
                        raise
                    batch = max(1, batch // 2)
                    logger.warning("CUDA out of memory: retrying with batch_size=%d", batch)
                    torch.cuda.empty_cache()
                    continue
                start = stop
                logger.debug("generated %d/%d images", start, total)
                callback(start, total)
        finally:
            pipe._progress_bar_config = previous_bar
        return images

    def _call_kwargs(self, start: int, stop: int) -> dict[str, Any]:
        """Further pipeline arguments for images ``start:stop`` of a call (a subclass's, e.g.
        the control images of `consistent_char.control.ControlledGenerator`)."""
        return {}

    def _call_pipeline(
        self, prompts: list[str], seeds: list[int], height: int, width: int, **extra: Any
    ) -> list[Image.Image]:
        # One generator per image: diffusers draws image j's starting noise from generator[j].
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        negative = [self.negative_prompt] * len(prompts) if self.negative_prompt else None
        out = self.pipeline(
            prompt=prompts,
            negative_prompt=negative,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            guidance_rescale=self.guidance_rescale,
            height=height,
            width=width,
            generator=generators,
            output_type="pil",
            **extra,
        )
        return [im.convert("RGB") for im in out.images]

    # --------------------------------------------------------------- helpers

    @property
    def resolution(self) -> tuple[int, int]:
        """``(height, width)`` of the generated images."""
        pipe = self.pipeline
        # What SDXL pipelines call default_sample_size (other SDXL pipelines lack the name).
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return (self.height or default, self.width or default)

    def _auto_batch_size(
        self, n: int, height: int, width: int, others: Sequence[SDXLGenerator] = ()
    ) -> int:
        """Batches as large as this device and the `others` all hold, split evenly over `n`."""
        caps = [worker._batch_cap(height, width) for worker in (self, *others)]
        return _even_batch_size(n, min(caps))

    def _batch_cap(self, height: int, width: int) -> int:
        """The most images this pipeline's device draws at once, by its free memory."""
        device = self.pipeline.device
        if device.type != "cuda":
            return CPU_BATCH_CAP
        free = _cuda_free_bytes(device)
        passes = 2 if self.guidance_scale > 1 else 1
        latent_pixels = (height // self.pipeline.vae_scale_factor) * (
            width // self.pipeline.vae_scale_factor
        )
        per_image = CUDA_BYTES_PER_LATENT_PIXEL * latent_pixels * passes
        fit = max(1, math.floor(0.8 * free / per_image))
        logger.debug(
            "at most %d images a batch on %s (%.1f GiB free, ~%.2f GiB per image)",
            fit,
            device,
            free / 2**30,
            per_image / 2**30,
        )
        return min(fit, CUDA_BATCH_CAP)


def _even_batch_size(n: int, cap: int) -> int:
    """The batch size that splits `n` images into the fewest calls of at most `cap` images, as
    evenly as those calls allow: 16 images under a cap of 13 go as 8 + 8, not 13 + 3, whose
    small last batch would keep the GPU half idle."""
    calls = math.ceil(n / max(1, cap))
    return max(1, math.ceil(n / max(1, calls)))


def _cuda_free_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: what the driver reports free, plus
    what PyTorch's caching allocator holds without a tensor in it (the refiner's activations,
    an earlier batch's), which the allocator releases when an allocation needs it; at most what
    `torch.cuda.set_per_process_memory_fraction` leaves this process."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += max(0, torch.cuda.memory_reserved(device) - allocated)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:  # torch >= 2.8
        free = min(free, int(fraction(device) * total) - allocated)
    return max(0, int(free))
