"""The iteration benchmark's setup (`iteration.py`): the plan, the model configs, the clock and
device, timed spans, building the models, the matmul ceiling and UNet FLOPs, and the helpers
both paths' stages share."""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA_VERSION = 1

#: Targets of issue 5, as ratios measured in one run on one device.
TARGET_ITERATION_SPEEDUP = 3.5
TARGET_UNET_FRACTION_OF_PEAK = 0.6

PROMPT = "a photo of a creature"

#: Full-size SDXL UNet and VAE, as in shared/bench/sdxl_naive_baseline.py (SDXL base 1.0 configs).
#: force_upcast=False: the naive path keeps its fp16 VAE in fp16, as the baseline measured it.
SDXL_UNET: dict[str, Any] = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4,
    out_channels=4, layers_per_block=2, norm_num_groups=32,
    projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, flip_sin_to_cos=True,
    freq_shift=0,
)  # fmt: skip
SDXL_VAE: dict[str, Any] = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
    force_upcast=False,
)  # fmt: skip
#: CLIP ViT-L/14 text tower and OpenCLIP ViT-bigG/14 text tower (the baseline's configs).
CLIP_L: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
CLIP_G: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    projection_dim=1280, hidden_act="gelu",
)  # fmt: skip
#: DINOv2 ViT-L/14 (facebook/dinov2-large).
DINOV2_L: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
    image_size=224,
)  # fmt: skip
#: Words of SDXL's vocabulary size (49408) are made up, so the embedding matrices that textual
#: inversion touches have the real model's shape.
CLIP_VOCAB_SIZE = 49408

TINY_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 1],
    "sample_size": 8,
    "addition_time_embed_dim": 8,
    "cross_attention_dim": 32 + 48,
    "projection_class_embeddings_input_dim": 6 * 8 + 48,
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    **SDXL_VAE,
    "block_out_channels": [16, 32, 32, 32],
    "norm_num_groups": 8,
}
TINY_CLIP_L: dict[str, Any] = {
    **CLIP_L,
    **dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
    "projection_dim": 32,
}
TINY_CLIP_G: dict[str, Any] = {
    **CLIP_G,
    **dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2),
    "projection_dim": 48,
}
TINY_DINOV2: dict[str, Any] = {
    **DINOV2_L,
    **dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2),
    "image_size": 28,
}

PROMPT_WORDS = ("a", "photo", "of", "creature", "person", "picture", "the", "in", "snow")


# ----------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What one run measures. ``*_at_defaults`` are the units one real iteration has; a stage
    measured on fewer units is extrapolated to them (and says so)."""

    mode: str
    device: str
    resolution: int
    num_inference_steps: int
    guidance_scale: float
    images_at_defaults: int
    train_steps_at_defaults: int
    library_images: int
    naive_images: int
    library_train_steps: int
    #: A shorter library refine run timed before the main one: the two give a per-step cost and
    #: a fixed cost (setup, latents, saving the identity). 0 = time the main run only.
    library_train_steps_short: int
    naive_train_steps: int
    warmup_train_steps: int
    num_clusters: int
    #: Images the refiner trains on at the defaults: the chosen cluster, about N / K.
    train_images_at_defaults: int
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def extrapolated(self) -> bool:
        return (
            self.library_images != self.images_at_defaults
            or self.naive_images != self.images_at_defaults
            or self.library_train_steps != self.train_steps_at_defaults
            or self.naive_train_steps != self.train_steps_at_defaults
        )


def make_plan(args: argparse.Namespace) -> Plan:
    overrides = parse_overrides(args.set)
    if args.tiny:
        plan = Plan(
            mode="tiny", device=args.device or "cpu", resolution=64, num_inference_steps=2,
            guidance_scale=7.5, images_at_defaults=8, train_steps_at_defaults=16,
            library_images=4, naive_images=2, library_train_steps=12,
            library_train_steps_short=2, naive_train_steps=3, warmup_train_steps=1,
            num_clusters=2, train_images_at_defaults=4, overrides=overrides,
        )  # fmt: skip
    else:
        reduced = args.reduced
        plan = Plan(
            mode="reduced" if reduced else "full",
            device=args.device or "cuda",
            resolution=1024,
            num_inference_steps=35,
            guidance_scale=7.5,
            images_at_defaults=128,
            train_steps_at_defaults=500,
            library_images=16 if reduced else 128,
            naive_images=8 if reduced else 128,
            library_train_steps=30 if reduced else 500,
            library_train_steps_short=8 if reduced else 0,
            naive_train_steps=20 if reduced else 500,
            warmup_train_steps=2,
            num_clusters=6,
            train_images_at_defaults=21,
            overrides=overrides,
        )
    for name in ("library_images", "naive_images", "library_train_steps", "naive_train_steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(plan, name, value)
    if args.library_train_steps_short is not None:
        plan.library_train_steps_short = args.library_train_steps_short
    if plan.library_train_steps_short >= plan.library_train_steps:
        plan.library_train_steps_short = 0
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("this run needs CUDA but torch sees no GPU; use --tiny for a CPU run")
    return plan


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set refiner.batch_size=4`` -> ``{"refiner.batch_size": 4}`` (values read as JSON)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


# ------------------------------------------------------------------------- clock and device


class Clock:
    """Wall time since start, progress lines on stderr, and the optional parts' time budget."""

    def __init__(self, budget_s: float | None) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.timeline: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        at = self.elapsed()
        self.timeline.append({"at_s": round(at, 2), "event": message})
        print(f"[{at:7.1f}s] {message}", file=sys.stderr, flush=True)

    def allows(self, estimate_s: float) -> bool:
        """True when `estimate_s` more seconds still fit in the budget (always, without one)."""
        return self.budget_s is None or self.elapsed() + estimate_s <= self.budget_s


class Device:
    """Synchronisation, timing marks and peak memory, the same calls on CUDA and on CPU."""

    def __init__(self, name: str) -> None:
        self.torch_device = torch.device(name)
        self.is_cuda = self.torch_device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def mark(self) -> Any:
        """A point in the device's stream of work: a CUDA event, or the host clock on CPU."""
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def seconds(start: Any, end: Any) -> float:
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1e3

    @contextlib.contextmanager
    def timed(self, into: dict[str, float], key: str) -> Iterator[None]:
        """Wall seconds of the block, synchronised at both ends."""
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            into[key] = time.perf_counter() - t

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_gib(self) -> float | None:
        if not self.is_cuda:
            return None
        return torch.cuda.max_memory_allocated(self.torch_device) / 2**30

    def empty_cache(self) -> None:
        if self.is_cuda:
            torch.cuda.empty_cache()


class Spans:
    """Device time spent inside calls of modules and methods, recorded without synchronising.

    Each call is bracketed by two marks (CUDA events on a GPU), so the loop being measured is not
    slowed; `summary` synchronises once at the end.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self.calls: dict[str, list[tuple[Any, Any, int]]] = {}
        self._open: dict[str, list[tuple[Any, int]]] = {}
        self._undo: list[Callable[[], None]] = []

    def module(self, name: str, module: torch.nn.Module) -> None:
        self.calls.setdefault(name, [])
        self._open.setdefault(name, [])

        def before(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            batch = int(first.shape[0]) if isinstance(first, torch.Tensor) else 0
            self._open[name].append((self.device.mark(), batch))

        def after(_mod: Any, _args: Any, _out: Any) -> None:
            start, batch = self._open[name].pop()
            self.calls[name].append((start, self.device.mark(), batch))

        h1 = module.register_forward_pre_hook(before, with_kwargs=True)
        h2 = module.register_forward_hook(after)
        self._undo += [h1.remove, h2.remove]

    def method(self, name: str, owner: Any, attribute: str) -> None:
        self.calls.setdefault(name, [])
        original = getattr(owner, attribute)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else None
            batch = int(first.shape[0]) if isinstance(first, torch.Tensor) else 0
            start = self.device.mark()
            out = original(*args, **kwargs)
            self.calls[name].append((start, self.device.mark(), batch))
            return out

        setattr(owner, attribute, wrapped)
        self._undo.append(lambda: delattr(owner, attribute))

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        self.device.sync()
        out = {}
        for name, calls in self.calls.items():
            seconds = sum(Device.seconds(s, e) for s, e, _ in calls)
            out[name] = {
                "calls": len(calls),
                "samples": sum(b for _, _, b in calls),
                "max_batch": max((b for _, _, b in calls), default=0),
                "batches": sorted({b for _, _, b in calls}),
                "seconds": seconds,
            }
        return out


@contextlib.contextmanager
def training_spans(device: Device, pipe: Any) -> Iterator[Spans]:
    """Spans of the forward passes during training (backward and optimizer are the rest)."""
    spans = Spans(device)
    spans.module("unet", pipe.unet)
    spans.module("text_encoder", pipe.text_encoder)
    spans.module("text_encoder_2", pipe.text_encoder_2)
    spans.method("vae_encode", pipe.vae, "encode")
    try:
        yield spans
    finally:
        spans.close()


def training_breakdown(
    spans: dict[str, dict[str, float]], total_s: float, steps: int, flops: float
) -> dict[str, float]:
    """Per-step seconds inside each forward; `other` is backward, optimizer and host work."""
    unet = spans["unet"]
    text = spans["text_encoder"]["seconds"] + spans["text_encoder_2"]["seconds"]
    out = {
        "unet_forward_s_per_step": unet["seconds"] / steps,
        "text_encoders_forward_s_per_step": text / steps,
        "vae_encode_s_per_step": spans["vae_encode"]["seconds"] / steps,
        "unet_samples_per_step": unet["samples"] / steps,
    }
    out["other_s_per_step"] = total_s / steps - sum(
        v for k, v in out.items() if k.endswith("_s_per_step")
    )
    out["unet_forward_tflops"] = (
        flops * unet["samples"] / unet["seconds"] / 1e12 if unet["seconds"] else 0.0
    )
    return out


@contextlib.contextmanager
def generation_spans(device: Device, pipe: Any) -> Iterator[Spans]:
    """Spans of the UNet, the VAE decoder and both text encoders during generation."""
    spans = Spans(device)
    spans.module("unet", pipe.unet)
    spans.module("text_encoder", pipe.text_encoder)
    spans.module("text_encoder_2", pipe.text_encoder_2)
    spans.method("vae_decode", pipe.vae, "decode")
    try:
        yield spans
    finally:
        spans.close()


# ---------------------------------------------------------------------------------- models


@dataclass
class Models:
    pipe: Any  # diffusers.StableDiffusionXLPipeline
    dino: Any  # transformers.Dinov2Model
    vocab_size: int
    unet_params_m: float
    build_s: float


def make_words(target_vocab: int | None) -> list[str]:
    """The prompt words plus made-up four-letter words, about `target_vocab` tokens in all."""
    words = list(PROMPT_WORDS)
    if target_vocab:
        # The BPE trainer adds about 980 merges and characters to these words (measured: 48552
        # words gave 49530 tokens).
        extra = max(0, target_vocab - 978 - len(words))
        made = ("".join(p) for p in itertools.product(string.ascii_lowercase, repeat=4))
        words += itertools.islice((w for w in made if w not in PROMPT_WORDS), extra)
    return words


def build_models(plan: Plan, device: Device, clock: Clock) -> Models:
    """Full-size (or tiny) SDXL and DINOv2 from configs with random weights, on `device`.

    SDXL is built in fp16 (the naive path's generation dtype; bf16 on CPU runs stay fp32), its VAE
    weights halved so that random-weight decoding stays finite in fp16 (as in the baseline script;
    the cost is unchanged). DINOv2 starts in fp32 (the naive path's dtype).
    """
    from transformers import Dinov2Config, Dinov2Model

    tiny = plan.mode == "tiny"
    t0 = time.perf_counter()
    half = torch.float16 if device.is_cuda else torch.float32
    torch.manual_seed(plan.seed)
    pipe = random_sdxl(tiny, half, device.torch_device, log=clock.log)
    with torch.device(device.torch_device):
        # Drawn after SDXL's four models, from the same seeded stream.
        dino = Dinov2Model(Dinov2Config(**(TINY_DINOV2 if tiny else DINOV2_L)))
    dino.requires_grad_(False)
    dino.eval()
    pipe.set_progress_bar_config(disable=True)
    device.sync()
    return Models(
        pipe=pipe,
        dino=dino,
        vocab_size=len(pipe.tokenizer),
        unet_params_m=sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
        build_s=time.perf_counter() - t0,
    )


def random_sdxl(
    tiny: bool,
    dtype: torch.dtype,
    torch_device: Any,
    *,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Full-size (or tiny) SDXL from configs with random weights, from the global RNG, on
    `torch_device` in `dtype`, frozen, its VAE weights halved (see `freeze`)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from consistent_char.tokenizers import build_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        words = make_words(None if tiny else CLIP_VOCAB_SIZE)
        tokenizer = build_clip_tokenizer(words, Path(tmp) / "tokenizer")
        tokenizer_2 = copy.deepcopy(tokenizer)
    if log is not None:
        log(f"tokenizers built: {len(tokenizer)} tokens")
    with torch.device(torch_device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SDXL_UNET)).to(dtype)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE)).to(dtype)
        text_encoder = CLIPTextModel(
            clip_text_config(TINY_CLIP_L if tiny else CLIP_L, tokenizer)
        ).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(
            clip_text_config(TINY_CLIP_G if tiny else CLIP_G, tokenizer)
        ).to(dtype)
    freeze(unet, vae, text_encoder, text_encoder_2, halve=vae)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sdxl_scheduler(),
        add_watermarker=False,
    )


def freeze(*modules: torch.nn.Module, halve: torch.nn.Module) -> None:
    """Puts `modules` in eval mode without gradients, after halving the weights of `halve` (the
    VAE: random-weight decoding then stays finite in fp16, at the same cost)."""
    with torch.no_grad():
        for p in halve.parameters():
            p.mul_(0.5)
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def clip_text_config(base: dict[str, Any], tokenizer: Any) -> Any:
    """A CLIP text encoder's config (`base`) sized for `tokenizer`'s vocabulary and tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **base,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sdxl_scheduler() -> Any:
    """SDXL's Euler scheduler, as its ``scheduler_config.json`` sets it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1,
        prediction_type="epsilon",
    )  # fmt: skip


def set_dtype(models: Models, sdxl: torch.dtype, dino: torch.dtype) -> None:
    pipe = models.pipe
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.to(sdxl)
    models.dino.to(dino)


# ----------------------------------------------------------------------- ceilings and FLOPs


def matmul_peak_tflops(device: Device) -> dict[str, Any]:
    """bf16 8192³ matrix product on random data (fp32 512³ on CPU), as the baseline measures it."""
    n, dtype = (8192, torch.bfloat16) if device.is_cuda else (512, torch.float32)
    a = torch.randn(n, n, device=device.torch_device, dtype=dtype)
    b = torch.randn_like(a)
    # Enough warm-up for the clocks to leave idle (an H200 here idled at 345 MHz).
    for _ in range(25):
        a @ b
    times = []
    for _ in range(20):
        start = device.mark()
        a @ b
        end = device.mark()
        device.sync()
        times.append(Device.seconds(start, end))
    flops = 2 * n**3
    return {
        "size": n,
        "dtype": str(dtype).removeprefix("torch."),
        "median_tflops": flops / statistics.median(times) / 1e12,
        "mean_tflops": flops / statistics.mean(times) / 1e12,
    }


def unet_inputs(pipe: Any, batch: int, resolution: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    unet = pipe.unet
    dev, dtype = unet.device, unet.dtype
    side = resolution // pipe.vae_scale_factor
    sample = torch.randn(batch, unet.config.in_channels, side, side, device=dev, dtype=dtype)
    timestep = torch.full((batch,), 500, device=dev)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
    pooled = pipe.text_encoder_2.config.projection_dim
    cond = {
        "text_embeds": torch.randn(batch, pooled, device=dev, dtype=dtype),
        "time_ids": torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]] * batch,
            device=dev,
            dtype=dtype,
        ),
    }
    return (sample, timestep, context), {"added_cond_kwargs": cond}


def unet_flops_per_sample(pipe: Any, resolution: int) -> float:
    """FLOPs of one UNet forward of one sample at `resolution`, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = unet_inputs(pipe, 1, resolution)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        pipe.unet(*args, **kwargs)
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------- the stages


def stage(
    measured_s: float,
    units: int,
    unit: str,
    units_at_defaults: int,
    *,
    fixed_s: float = 0.0,
    per_unit_s: float | None = None,
) -> dict[str, Any]:
    """A stage's measured time and its cost at the defaults: fixed + per unit × units."""
    per = per_unit_s if per_unit_s is not None else (measured_s - fixed_s) / units
    return {
        "measured_s": measured_s,
        "units_measured": units,
        "unit": unit,
        "fixed_s": fixed_s,
        "s_per_unit": per,
        "units_at_defaults": units_at_defaults,
        "s_at_defaults": fixed_s + per * units_at_defaults,
        "extrapolated": units != units_at_defaults,
    }


def unet_rate(
    spans: dict[str, dict[str, float]], flops_per_sample: float, peak_tflops: float
) -> dict[str, Any]:
    unet = spans.get("unet", {"samples": 0, "seconds": 0.0, "calls": 0, "max_batch": 0})
    tflops = flops_per_sample * unet["samples"] / unet["seconds"] / 1e12 if unet["seconds"] else 0.0
    return {
        "forwards": unet["calls"],
        "samples": unet["samples"],
        "max_batch": unet["max_batch"],
        "batch_sizes": unet.get("batches", []),
        "seconds_inside_unet": unet["seconds"],
        "achieved_tflops": tflops,
        "fraction_of_matmul_peak": tflops / peak_tflops if peak_tflops else 0.0,
    }


def breakdown(spans: dict[str, dict[str, float]], total_s: float) -> dict[str, float]:
    text = spans["text_encoder"]["seconds"] + spans["text_encoder_2"]["seconds"]
    out = {
        "text_encoders_s": text,
        "unet_s": spans["unet"]["seconds"],
        "vae_decode_s": spans["vae_decode"]["seconds"],
        "text_encoder_calls": spans["text_encoder"]["calls"],
    }
    out["other_s"] = total_s - text - out["unet_s"] - out["vae_decode_s"]
    return out


def max_or_none(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def seeds_for(plan: Plan, n: int) -> list[int]:
    return [plan.seed * 1_000_003 + j for j in range(n)]


def pixel_std(images: Sequence[Any]) -> float:
    """Spread of the pixel values (0-255) over a few images: near 0 means blank images, whose
    PNGs compress faster than real ones (random weights can give those in 16-bit)."""
    return float(np.std(np.stack([np.asarray(im, dtype=np.float32) for im in images[:4]])))


def finite_embeddings(embeddings: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    # Random weights can give non-finite pixels in 16-bit; clustering needs finite input and its
    # cost does not depend on the values.
    bad = int((~np.isfinite(embeddings)).any(axis=1).sum())
    record["nonfinite_embedding_rows"] = bad
    return np.nan_to_num(embeddings, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def training_subset(
    embeddings: np.ndarray, members: np.ndarray, centroid: np.ndarray, size: int
) -> list[int]:
    """The chosen cluster, topped up with the images nearest its centroid to `size` images: a
    reduced run has tiny clusters, but the refiner should see about N / K images as at the
    defaults."""
    chosen = [int(i) for i in members]
    if len(chosen) >= size:
        return chosen
    order = np.argsort(np.linalg.norm(embeddings - centroid[None, :], axis=1))
    for i in order:
        if len(chosen) >= size:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return chosen


def time_unet(
    pipe: Any,
    device: Device,
    batch: int,
    resolution: int,
    repeats: int,
    channels_last: bool,
    grad_mode: Callable[[], Any] = torch.no_grad,
) -> tuple[float, float]:
    """(first call seconds, median seconds per later call) of one UNet forward at `batch`."""
    args, kwargs = unet_inputs(pipe, batch, resolution)
    if channels_last:
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    # no_grad by default, not inference_mode: the pipeline runs under no_grad, and compiled code
    # guards on the grad mode (a mismatch recompiles inside the timed generation).
    with grad_mode():
        t0 = time.perf_counter()
        pipe.unet(*args, **kwargs)
        device.sync()
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            start = device.mark()
            pipe.unet(*args, **kwargs)
            end = device.mark()
            device.sync()
            times.append(Device.seconds(start, end))
    return first, statistics.median(times)
