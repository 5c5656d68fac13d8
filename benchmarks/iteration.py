"""One iteration of The Chosen One on full-size SDXL and DINOv2-L: the library's path against a
naive diffusers loop, side by side in one process on one device.

Both paths run the same four stages of Algorithm 1 (generate N images, embed them, cluster the
embeddings, refine the identity on the chosen cluster) plus the PNG writes a run directory does,
on the same modules:

* **library**: `SDXLGenerator.from_pipeline` (bf16, the generator's own batching),
  `DINOv2Embedder.from_model` (bf16), `FaissKMeansClusterer` + `choose_cluster`,
  `TextualInversionLoRARefiner.from_pipeline`, `RunDirectory.save_images`, every setting at its
  `ExtractorConfig` default unless ``--set key=value`` overrides it.
* **naive**: the diffusers pipeline one image at a time in fp16 (prompt re-encoded per image),
  DINOv2 in fp32 one image at a time, plain `faiss.Kmeans`, `PIL.Image.save`, and a plain TI+LoRA
  training loop at batch 1 (the pattern of diffusers' textual-inversion/LoRA examples): caption
  tokenised and both text encoders run every step, the image VAE-encoded every step, whole
  embedding matrices trainable with the other rows restored after each step, unfused fp32 AdamW.

The models are built from their configs with random weights (the real models' cost, no
download). ``--reduced`` measures fewer images and training steps and extrapolates per-unit costs
to the defaults; ``--tiny`` runs the same code on CPU with tiny models. The result is one JSON
object on stdout (progress on stderr), also written to ``--out`` after every part, so a run cut
short still leaves what it measured.

Example:
    PYTHONPATH=src python benchmarks/iteration.py --tiny --out /tmp/iteration.json
    PYTHONPATH=src python benchmarks/iteration.py --reduced --compile --time-budget-s 230 \\
        --out "$OUT/iteration.json"
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import math
import os
import platform
import statistics
import string
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_char.refiners.ti_lora import CUDA_GRAPH_WARMUP_STEPS

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
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    from consistent_char.tokenizers import build_clip_tokenizer

    tiny = plan.mode == "tiny"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        words = make_words(None if tiny else CLIP_VOCAB_SIZE)
        tokenizer = build_clip_tokenizer(words, Path(tmp) / "tokenizer")
        tokenizer_2 = copy.deepcopy(tokenizer)
    clock.log(f"tokenizers built: {len(tokenizer)} tokens")

    def text_config(base: dict[str, Any]) -> CLIPTextConfig:
        return CLIPTextConfig(
            **base,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    half = torch.float16 if device.is_cuda else torch.float32
    torch.manual_seed(plan.seed)
    with torch.device(device.torch_device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SDXL_UNET)).to(half)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE)).to(half)
        text_encoder = CLIPTextModel(text_config(TINY_CLIP_L if tiny else CLIP_L)).to(half)
        text_encoder_2 = CLIPTextModelWithProjection(
            text_config(TINY_CLIP_G if tiny else CLIP_G)
        ).to(half)
        dino = Dinov2Model(Dinov2Config(**(TINY_DINOV2 if tiny else DINOV2_L)))
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(0.5)
    for module in (unet, vae, text_encoder, text_encoder_2, dino):
        module.requires_grad_(False)
        module.eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1,
        prediction_type="epsilon",
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    device.sync()
    return Models(
        pipe=pipe,
        dino=dino,
        vocab_size=len(tokenizer),
        unet_params_m=sum(p.numel() for p in unet.parameters()) / 1e6,
        build_s=time.perf_counter() - t0,
    )


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


# ---------------------------------------------------------------------------- naive path


def naive_image(pipe: Any, plan: Plan, seed: int, steps: int) -> Any:
    """One image from a plain pipeline call, the prompt encoded inside it."""
    return pipe(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=plan.guidance_scale,
        height=plan.resolution,
        width=plan.resolution,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images[0]


def run_naive(
    models: Models, plan: Plan, device: Device, clock: Clock, flops: float, peak: float
) -> dict[str, Any]:
    """Plain diffusers and transformers, one image at a time (fp16 generation, bf16 training)."""
    import faiss

    from consistent_char.embedders._preprocess import ResizeCropNormalize

    pipe = models.pipe
    out: dict[str, Any] = {"dtype_generation": str(pipe.unet.dtype).removeprefix("torch.")}
    stages: dict[str, Any] = {}
    out["stages"] = stages
    device.reset_peak()
    n = plan.naive_images
    seeds = seeds_for(plan, n)
    times: dict[str, float] = {}

    # 1. Generation: one pipeline call per image, the prompt encoded each time.
    with device.timed(times, "warmup"):
        naive_image(pipe, plan, seeds[0], 2)
    clock.log(f"naive: warm-up image {times['warmup']:.1f}s; generating {n} images")
    with generation_spans(device, pipe) as probe, device.timed(times, "generation"):
        images = [naive_image(pipe, plan, s, plan.num_inference_steps) for s in seeds]
    spans = probe.summary()
    stages["generation"] = stage(times["generation"], n, "image", plan.images_at_defaults)
    out["generation_warmup_s"] = times["warmup"]
    out["generation_batch_size"] = 1
    out["images_per_s"] = n / times["generation"]
    out["generation_breakdown"] = breakdown(spans, times["generation"])
    out["unet"] = unet_rate(spans, flops, peak)
    clock.log(f"naive: generation {times['generation']:.1f}s ({n / times['generation']:.3f} img/s)")

    out["image_pixel_std"] = pixel_std(images)

    # 2. Saving: PIL's PNG writer, one file after another.
    with tempfile.TemporaryDirectory() as tmp, device.timed(times, "saving"):
        for j, image in enumerate(images):
            image.save(os.path.join(tmp, f"{j:04d}.png"))
    stages["saving"] = stage(times["saving"], n, "image", plan.images_at_defaults)

    # 3. Embedding: DINOv2 in fp32, one image per forward.
    dino = models.dino
    preprocess = ResizeCropNormalize(int(dino.config.image_size))

    def embed_one(image: Any) -> np.ndarray:
        pixels = torch.from_numpy(preprocess([image])).to(device.torch_device)
        with torch.no_grad():
            return dino(pixel_values=pixels).last_hidden_state[:, 0].float().cpu().numpy()

    embed_one(images[0])
    with device.timed(times, "embedding"):
        embeddings = np.concatenate([embed_one(im) for im in images])
    stages["embedding"] = stage(times["embedding"], n, "image", plan.images_at_defaults)

    # 4. Clustering: plain faiss k-means (its own random init), the largest cluster.
    x = finite_embeddings(embeddings, out)
    k = min(plan.num_clusters, n)
    with device.timed(times, "clustering"):
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=plan.seed, min_points_per_centroid=1)
        km.train(x)
        _, labels = km.index.search(x, 1)
        labels = labels.reshape(-1)
        largest = int(np.bincount(labels, minlength=k).argmax())
        members = np.flatnonzero(labels == largest)
    stages["clustering"] = stage(times["clustering"], n, "image", plan.images_at_defaults)
    subset = training_subset(x, members, km.centroids[largest], plan.train_images_at_defaults)
    out["train_images"] = len(subset)
    out["peak_gib_generation_and_embedding"] = device.peak_gib()
    clock.log(f"naive: embedding {times['embedding']:.2f}s, clustering {times['clustering']:.3f}s")

    # 5. Refinement: TI (both encoders) + LoRA, batch 1, everything recomputed every step.
    train_dtype = torch.bfloat16 if device.is_cuda else torch.float32
    with device.timed(times, "dtype_switch"):
        set_dtype(models, train_dtype, torch.float32)
    out["dtype_training"] = str(train_dtype).removeprefix("torch.")
    out["dtype_switch_s"] = times["dtype_switch"]
    device.empty_cache()
    device.reset_peak()
    refine = naive_refine(models, plan, device, [images[i] for i in subset], flops)
    out["refinement_breakdown"] = refine["breakdown"]
    out["peak_gib_refinement"] = device.peak_gib()
    stages["refinement"] = stage(
        refine["setup_s"] + refine["steps_s"],
        refine["steps"],
        "train step",
        plan.train_steps_at_defaults,
        fixed_s=refine["setup_s"],
    )
    out["refinement_warmup_s"] = refine["warmup_s"]
    out["train_batch_size"] = 1
    out["train_steps_per_s"] = refine["steps"] / refine["steps_s"]
    out["train_samples_per_s"] = out["train_steps_per_s"]
    out["peak_gib"] = max_or_none(
        out["peak_gib_generation_and_embedding"], out["peak_gib_refinement"]
    )
    clock.log(
        f"naive: refinement {refine['steps']} steps in {refine['steps_s']:.1f}s "
        f"({out['train_steps_per_s']:.2f} steps/s), setup {refine['setup_s']:.1f}s"
    )
    return out


def naive_refine(
    models: Models, plan: Plan, device: Device, images: Sequence[Any], flops: float
) -> dict[str, Any]:
    """The plain training loop of diffusers' TI and LoRA examples, at batch 1."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    pipe, dev, res = models.pipe, device.torch_device, plan.resolution
    unet, vae = pipe.unet, pipe.vae
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    # An existing word stands for the new token: a real script adds a row, the cost is the same.
    caption = f"a photo of {PROMPT_WORDS[4]} creature"
    adapter = "naive_benchmark"
    times: dict[str, float] = {}
    with device.timed(times, "setup"):
        noise_scheduler = DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000,
        )  # fmt: skip
        unet.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            ),
            adapter_name=adapter,
        )  # fmt: skip
        lora = [p for p in unet.parameters() if p.requires_grad]
        for p in lora:
            p.data = p.data.float()
        tables = [enc.get_input_embeddings().weight for enc in encoders]
        originals = [t.detach().clone() for t in tables]
        token_id = tokenizers[0].convert_tokens_to_ids(PROMPT_WORDS[4] + "</w>")
        keep = torch.ones(tables[0].shape[0], dtype=torch.bool, device=dev)
        keep[token_id] = False
        for t in tables:
            t.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [{"params": lora, "lr": 1e-4}, {"params": tables, "lr": 5e-3}], fused=False
        )
        unet.train()
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=dev, dtype=unet.dtype)

    def step(i: int) -> None:
        image = images[i % len(images)]
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1)[None].to(dev, vae.dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            ids = tokenizer(
                caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids.to(dev)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", pooled)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device=dev)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(
            noisy,
            t,
            torch.cat(hidden, dim=-1),
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for table, original in zip(tables, originals, strict=True):
                table[keep] = original[keep]

    try:
        with device.timed(times, "warmup"):
            for i in range(plan.warmup_train_steps):
                step(i)
        with training_spans(device, pipe) as probe, device.timed(times, "steps"):
            for i in range(plan.naive_train_steps):
                step(i)
        spans = probe.summary()
    finally:
        # Leave the modules as they were for the library's path.
        unet.unload_lora()
        unet.requires_grad_(False)
        unet.eval()
        with torch.no_grad():
            for table, original in zip(tables, originals, strict=True):
                table.requires_grad_(False)
                table.copy_(original)
        device.empty_cache()
    return {
        "setup_s": times["setup"],
        "warmup_s": times["warmup"],
        "steps_s": times["steps"],
        "steps": plan.naive_train_steps,
        "breakdown": training_breakdown(spans, times["steps"], plan.naive_train_steps, flops),
    }


# -------------------------------------------------------------------------- library path


def library_config(plan: Plan) -> Any:
    from consistent_char.config import ExtractorConfig

    return ExtractorConfig.from_overrides(plan.overrides)


def make_generator(
    pipe: Any, plan: Plan, cfg: Any, steps: int, batch_size: int | None = None
) -> Any:
    from consistent_char.generators.sdxl import SDXLGenerator

    g = cfg.generator
    return SDXLGenerator.from_pipeline(
        pipe,
        num_inference_steps=steps,
        guidance_scale=plan.guidance_scale,
        height=plan.resolution,
        width=plan.resolution,
        batch_size=batch_size or g.batch_size,
        negative_prompt=g.negative_prompt,
    )


def make_refiner(pipe: Any, cfg: Any, steps: int, **overrides: Any) -> Any:
    """The refiner exactly as `consistent_char.stages.build_stages` makes it, at `steps`."""
    from consistent_char.stages import build_refiner

    return build_refiner(cfg.refiner, pipe, steps=steps, **overrides)


def timed_refine(
    models: Models,
    plan: Plan,
    device: Device,
    library: dict[str, Any],
    steps: int,
    into: dict[str, float],
    key: str,
    **settings: Any,
) -> Any:
    """One refine of the main fit's images and seed, at `steps` and with `settings` changed,
    its wall seconds written to ``into[key]``; returns the identity."""
    refiner = make_refiner(models.pipe, library_config(plan), steps, **settings)
    with device.timed(into, key):
        return refiner.refine(None, library["_train_images"], library["_captions"], seed=plan.seed)


def fit_steps(
    short_steps: int, short_s: float, long_steps: int, long_s: float
) -> tuple[float, float, str]:
    """(seconds per step, fixed seconds, how) from two refines of different lengths: their
    difference is the per-step cost, the rest of the short one the fixed cost. Timing noise can
    beat the difference (on tiny models): then the longer run's total / steps, with no fixed
    cost."""
    slope = (long_s - short_s) / (long_steps - short_steps)
    if slope > 0 and short_s - short_steps * slope >= 0 and slope >= 0.2 * long_s / long_steps:
        return slope, short_s - short_steps * slope, "two runs"
    return long_s / long_steps, 0.0, "total / steps"


def run_library(
    models: Models, plan: Plan, device: Device, clock: Clock, flops: float, peak: float
) -> dict[str, Any]:
    """The library's stages, built as `build_stages` builds them, in bf16 (fp32 on CPU)."""
    from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
    from consistent_char.clusterers.selection import choose_cluster
    from consistent_char.embedders.dinov2 import DINOv2Embedder
    from consistent_char.rundir import RunDirectory

    cfg = library_config(plan)
    dtype = torch.bfloat16 if device.is_cuda else torch.float32
    set_dtype(models, dtype, dtype)
    device.empty_cache()
    pipe = models.pipe
    out: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "config_overrides": plan.overrides,
        "refiner_settings": cfg.refiner.model_dump(mode="json"),
    }
    stages: dict[str, Any] = {}
    out["stages"] = stages
    device.reset_peak()
    n = plan.library_images
    seeds, prompts = seeds_for(plan, n), [PROMPT] * n
    times: dict[str, float] = {}

    # 1. Generation. The warm-up call has the same images (so the same batches) and 2 steps.
    warm = make_generator(pipe, plan, cfg, 2)
    with device.timed(times, "warmup"):
        warm.generate(prompts, seeds)
    clock.log(f"library: warm-up generation {times['warmup']:.1f}s; generating {n} images")
    generator = make_generator(pipe, plan, cfg, plan.num_inference_steps)
    with generation_spans(device, pipe) as probe, device.timed(times, "generation"):
        images = generator.generate(prompts, seeds)
    spans = probe.summary()
    passes = 2 if plan.guidance_scale > 1 else 1
    stages["generation"] = stage(times["generation"], n, "image", plan.images_at_defaults)
    out["generation_warmup_s"] = times["warmup"]
    out["generation_batch_size"] = spans["unet"]["max_batch"] // passes
    out["images_per_s"] = n / times["generation"]
    out["generation_breakdown"] = breakdown(spans, times["generation"])
    out["unet"] = unet_rate(spans, flops, peak)
    clock.log(
        f"library: generation {times['generation']:.1f}s ({n / times['generation']:.3f} img/s, "
        f"batch {out['generation_batch_size']}, UNet {out['unet']['achieved_tflops']:.0f} TFLOP/s)"
    )

    out["image_pixel_std"] = pixel_std(images)

    # 2. Saving: the run directory's atomic PNG writer.
    with tempfile.TemporaryDirectory() as tmp, device.timed(times, "saving"):
        RunDirectory(tmp).save_images(0, 0, images)
    stages["saving"] = stage(times["saving"], n, "image", plan.images_at_defaults)

    # 3. Embedding.
    embedder = DINOv2Embedder.from_model(models.dino, batch_size=cfg.embedder.batch_size)
    embedder.embed(images[:2])
    with device.timed(times, "embedding"):
        embeddings = embedder.embed(images)
    stages["embedding"] = stage(times["embedding"], n, "image", plan.images_at_defaults)

    # 4. Clustering and the choice of c*.
    x = finite_embeddings(embeddings, out)
    k = min(plan.num_clusters, n)
    clusterer = FaissKMeansClusterer(niter=cfg.clusterer.niter, nredo=cfg.clusterer.nredo)
    with device.timed(times, "clustering"):
        labels, centroids = clusterer.cluster(x, k, plan.seed)
        choice = choose_cluster(x, labels, centroids, cfg.d_min_c)
    stages["clustering"] = stage(times["clustering"], n, "image", plan.images_at_defaults)
    subset = training_subset(
        x, choice.members(labels), centroids[choice.index], plan.train_images_at_defaults
    )
    train_images = [images[i] for i in subset]
    out["train_images"] = len(subset)
    out["peak_gib_generation_and_embedding"] = device.peak_gib()
    clock.log(
        f"library: embedding {times['embedding']:.2f}s, clustering {times['clustering']:.3f}s"
    )

    # 5. Refinement: a short warm-up run, then (reduced) a short and a long run, whose difference
    #    is the per-step cost; the rest of the short run is the fixed cost.
    captions = [cfg.identity_prompt_template.format(token=cfg.refiner.token, prompt=PROMPT)]
    captions = captions * len(train_images)
    device.empty_cache()
    device.reset_peak()
    with device.timed(times, "refiner_construct"):
        make_refiner(pipe, cfg, plan.warmup_train_steps)
    with device.timed(times, "refine_warmup"):
        make_refiner(pipe, cfg, plan.warmup_train_steps).refine(
            None, train_images, captions, seed=plan.seed
        )
    clock.log(
        f"library: refiner warm-up ({plan.warmup_train_steps} steps) {times['refine_warmup']:.1f}s"
    )
    long_steps, short_steps = plan.library_train_steps, plan.library_train_steps_short
    if short_steps:
        with device.timed(times, "refine_short"):
            make_refiner(pipe, cfg, short_steps).refine(
                None, train_images, captions, seed=plan.seed
            )
    with training_spans(device, pipe) as probe, device.timed(times, "refine"):
        identity = make_refiner(pipe, cfg, long_steps).refine(
            None, train_images, captions, seed=plan.seed
        )
    # Per step over the whole run: the fixed part (latents, identity) is in `other`.
    out["refinement_breakdown"] = training_breakdown(
        probe.summary(), times["refine"], long_steps, flops
    )
    if short_steps:
        out["refinement_short_run"] = {"steps": short_steps, "seconds": times["refine_short"]}
        per_step, fixed, fit = fit_steps(
            short_steps, times["refine_short"], long_steps, times["refine"]
        )
    else:
        per_step, fixed, fit = times["refine"] / long_steps, 0.0, "total / steps"
    out["refinement_fit"] = fit
    stages["refinement"] = stage(
        times["refine"],
        long_steps,
        "train step",
        plan.train_steps_at_defaults,
        fixed_s=fixed,
        per_unit_s=per_step,
    )
    out["refiner_construct_s"] = times["refiner_construct"]
    out["refinement_warmup_s"] = times["refine_warmup"]
    out["peak_gib_refinement"] = device.peak_gib()
    out["train_batch_size"] = cfg.refiner.batch_size
    out["train_steps_per_s"] = 1.0 / per_step if per_step > 0 else None
    out["train_samples_per_s"] = cfg.refiner.batch_size / per_step if per_step > 0 else None
    out["peak_gib"] = max_or_none(
        out["peak_gib_generation_and_embedding"], out["peak_gib_refinement"]
    )
    clock.log(
        f"library: refinement {long_steps} steps in {times['refine']:.1f}s "
        f"(per step {per_step:.3f}s, fixed {fixed:.1f}s)"
    )
    # For the optional training-batch part; keys starting with "_" are never written.
    out["_train_images"], out["_captions"], out["_identity"] = train_images, captions, identity
    return out


# ------------------------------------------------------------- optional: the naive path, checked


def run_naive_check(
    models: Models, plan: Plan, device: Device, clock: Clock, naive: dict[str, Any]
) -> dict[str, Any]:
    """Is the naive path's generation as fast as shared/bench's reference measured it?

    The reference script passed precomputed prompt embeddings and called the pipeline under
    `torch.inference_mode`; the naive path encodes the prompt in every call, under the
    pipeline's own `no_grad`. Here both, in fp16 and in one process, on a few images at the
    plan's steps, and the UNet alone at batch 2 (one image with guidance) under each grad mode.
    A faster reference style means the naive path's generation, and so the iteration speedup,
    is flattered; `summary.iteration_speedup_reference_style_naive` has the speedup with it.
    """
    pipe = models.pipe
    unet_dtype, dino_dtype = pipe.unet.dtype, models.dino.dtype
    half = torch.float16 if device.is_cuda else torch.float32
    n = 1 if plan.mode == "tiny" else 2
    seeds = seeds_for(plan, n)
    out: dict[str, Any] = {"images": n, "dtype": str(half).removeprefix("torch.")}
    try:
        set_dtype(models, half, dino_dtype)
        with torch.no_grad():
            embeds = pipe.encode_prompt(
                PROMPT, device=device.torch_device, num_images_per_prompt=1,
                do_classifier_free_guidance=plan.guidance_scale > 1,
            )  # fmt: skip
        prompt, negative, pooled, negative_pooled = embeds

        def reference_style(steps: int) -> None:
            with torch.inference_mode():
                pipe(
                    prompt_embeds=prompt, negative_prompt_embeds=negative,
                    pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                    num_inference_steps=steps, guidance_scale=plan.guidance_scale,
                    height=plan.resolution, width=plan.resolution, output_type="pil",
                )  # fmt: skip

        times: dict[str, float] = {}
        reference_style(2)  # warm-up
        with device.timed(times, "reference_style"):
            for _ in seeds:
                reference_style(plan.num_inference_steps)
        naive_image(pipe, plan, seeds[0], 2)  # warm-up
        with device.timed(times, "naive_style"):
            for seed in seeds:
                naive_image(pipe, plan, seed, plan.num_inference_steps)
        out["reference_style_s_per_image"] = times["reference_style"] / n
        out["naive_style_s_per_image"] = times["naive_style"] / n
        out["naive_path_s_per_image"] = naive["stages"]["generation"]["s_per_unit"]
        out["naive_style_over_reference_style"] = times["naive_style"] / times["reference_style"]
        for name, mode in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
            _, per_call = time_unet(pipe, device, 2, plan.resolution, 5, False, mode)
            out[f"unet_batch2_ms_{name}"] = 1e3 * per_call
    finally:
        set_dtype(models, unet_dtype, dino_dtype)
    clock.log(
        f"naive check: {out['naive_style_s_per_image']:.2f} s/image as the naive path calls the "
        f"pipeline, {out['reference_style_s_per_image']:.2f} as the reference did; UNet batch 2 "
        f"{out['unet_batch2_ms_no_grad']:.1f} ms (no_grad), "
        f"{out['unet_batch2_ms_inference_mode']:.1f} ms (inference_mode)"
    )
    return out


# ------------------------------------------------------------------- optional: UNet variants


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


@contextlib.contextmanager
def unet_setting(pipe: Any, name: str) -> Iterator[bool]:
    """Applies one speed setting to the UNet for the block; yields whether inputs go
    channels_last. Everything is undone afterwards."""
    unet = pipe.unet
    cudnn_before = torch.backends.cudnn.benchmark
    names = set(name.split("+"))
    attention = contextlib.ExitStack()
    try:
        for setting, backend in ATTENTION_BACKENDS.items():
            if setting in names:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                attention.enter_context(sdpa_kernel([getattr(SDPBackend, backend)]))
        if "channels_last" in names:
            unet.to(memory_format=torch.channels_last)
        if "fused_qkv" in names:
            unet.fuse_qkv_projections()
        if "cudnn_benchmark" in names:
            torch.backends.cudnn.benchmark = True
        yield "channels_last" in names
    finally:
        if "fused_qkv" in names:
            unet.unfuse_qkv_projections()
            for module in unet.modules():
                for fused in ("to_qkv", "to_kv"):
                    if hasattr(module, fused) and hasattr(module, "fused_projections"):
                        delattr(module, fused)
                        module.fused_projections = False
        if "channels_last" in names:
            unet.to(memory_format=torch.contiguous_format)
        torch.backends.cudnn.benchmark = cudnn_before
        attention.close()


VARIANTS = ("eager", "channels_last", "fused_qkv", "cudnn_benchmark",
            "channels_last+fused_qkv+cudnn_benchmark")  # fmt: skip
#: Attention variants (CUDA only): `scaled_dot_product_attention` held to one backend. Eager
#: lets PyTorch choose (flash attention for these shapes on an H200, as far as is known).
ATTENTION_BACKENDS = {
    "flash_attention": "FLASH_ATTENTION",
    "cudnn_attention": "CUDNN_ATTENTION",
    "efficient_attention": "EFFICIENT_ATTENTION",
}


def run_unet_variants(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    flops: float,
    peak: float,
    batch: int,
    identity: Any | None = None,
) -> dict[str, Any]:
    """UNet forward throughput of the library's generation batch (both CFG halves) under each
    candidate setting, in the library's dtype; with an `identity`, also with its LoRA active
    (as every iteration after the first generates), unfused and fused into the weights."""
    repeats = 2 if device.is_cuda else 1
    out: dict[str, Any] = {"batch": batch, "repeats": repeats, "variants": {}}
    for name in VARIANTS + (tuple(ATTENTION_BACKENDS) if device.is_cuda else ()):
        try:
            with unet_setting(models.pipe, name) as channels_last:
                first, per_call = time_unet(
                    models.pipe, device, batch, plan.resolution, repeats, channels_last
                )
        except Exception as err:  # noqa: BLE001 - one failing setting leaves the others
            out["variants"][name] = {"error": repr(err)[:300]}
            clock.log(f"variant {name} FAILED: {err!r}")
            device.empty_cache()
            continue
        tflops = flops * batch / per_call / 1e12
        out["variants"][name] = {
            "first_call_s": first,
            "ms_per_sample": per_call / batch * 1e3,
            "achieved_tflops": tflops,
            "fraction_of_matmul_peak": tflops / peak if peak else 0.0,
        }
        clock.log(f"variant {name}: {per_call / batch * 1e3:.2f} ms/sample, {tflops:.0f} TFLOP/s")
    if identity is not None:
        identity_variants(models, plan, device, clock, flops, peak, batch, identity, out)
    eager = out["variants"]["eager"].get("ms_per_sample")
    for v in out["variants"].values():
        if eager and "ms_per_sample" in v:
            v["speedup_vs_eager"] = eager / v["ms_per_sample"]
    return out


def identity_variants(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    flops: float,
    peak: float,
    batch: int,
    identity: Any,
    out: dict[str, Any],
) -> None:
    """The UNet with the identity's LoRA (peft layers, as `Identity.apply_to` leaves them) and
    with it fused into the weights; plus what applying and removing the identity costs (the
    generator does both on every `generate` call)."""
    pipe, repeats = models.pipe, out["repeats"]
    times: dict[str, float] = {}

    def record(name: str, per_call: float, first: float) -> None:
        tflops = flops * batch / per_call / 1e12
        out["variants"][name] = {
            "first_call_s": first,
            "ms_per_sample": per_call / batch * 1e3,
            "achieved_tflops": tflops,
            "fraction_of_matmul_peak": tflops / peak if peak else 0.0,
        }
        clock.log(f"variant {name}: {per_call / batch * 1e3:.2f} ms/sample, {tflops:.0f} TFLOP/s")

    with device.timed(times, "apply"):
        identity.apply_to(pipe)
    try:
        first, per_call = time_unet(pipe, device, batch, plan.resolution, repeats, False)
        record("identity_lora", per_call, first)
        if identity.lora is not None:
            pipe.unet.fuse_lora()
            try:
                first, per_call = time_unet(pipe, device, batch, plan.resolution, repeats, False)
                record("identity_lora_fused", per_call, first)
            finally:
                pipe.unet.unfuse_lora()
    except Exception as err:  # noqa: BLE001 - recorded; the identity is still removed
        out["variants"]["identity_lora"] = {"error": repr(err)[:300]}
        clock.log(f"identity variants FAILED: {err!r}")
    finally:
        with device.timed(times, "remove"):
            identity.remove_from(pipe)
    out["identity_apply_s"], out["identity_remove_s"] = times["apply"], times["remove"]


def run_refine_batches(
    models: Models, plan: Plan, device: Device, clock: Clock, library: dict[str, Any]
) -> dict[str, Any]:
    """The library's refiner at larger training batches: one short run each, its fixed cost
    taken from the main fit. The first call at a batch includes any warm-up for that shape, so
    the per-sample figure is conservative."""
    main = library["stages"]["refinement"]
    base_batch = library_config(plan).refiner.batch_size
    base_per_sample = main["s_per_unit"] / base_batch
    steps = plan.library_train_steps_short or max(2, plan.library_train_steps // 4)
    out: dict[str, Any] = {
        "steps": steps,
        "fixed_s_from_main_fit": main["fixed_s"],
        "library_batch": base_batch,
        "batches": {},
    }
    for batch in (4,):
        if batch == base_batch:
            continue
        times: dict[str, float] = {}
        device.empty_cache()
        device.reset_peak()
        timed_refine(models, plan, device, library, steps, times, "refine", batch_size=batch)
        per_step = max(times["refine"] - main["fixed_s"], 1e-9) / steps
        out["batches"][str(batch)] = {
            "seconds": times["refine"],
            "s_per_step": per_step,
            "samples_per_s": batch / per_step,
            "per_sample_speedup_vs_library_batch": base_per_sample / (per_step / batch),
            "peak_gib": device.peak_gib(),
        }
        clock.log(
            f"refine batch {batch}: {per_step:.3f}s/step, {batch / per_step:.2f} samples/s "
            f"(batch {base_batch}: {1 / base_per_sample:.2f} samples/s)"
        )
    return out


def run_refine_compiled(
    models: Models, plan: Plan, device: Device, clock: Clock, library: dict[str, Any]
) -> dict[str, Any]:
    """The library's refiner with ``refiner.compile_blocks``: a short first refine (which
    compiles the transformer blocks for training), then the main fit's step count, timed and
    set against the eager per-step cost. The main fit's fixed cost is taken as the same."""
    main = library["stages"]["refinement"]
    first_steps, steps = max(2, plan.warmup_train_steps), plan.library_train_steps
    times: dict[str, float] = {}
    graphs = compiled_graphs()
    device.empty_cache()
    device.reset_peak()
    timed_refine(models, plan, device, library, first_steps, times, "first", compile_blocks=True)
    clock.log(f"refine compiled: first refine ({first_steps} steps) {times['first']:.1f}s")
    timed_refine(models, plan, device, library, steps, times, "timed", compile_blocks=True)
    per_step = max(times["timed"] - main["fixed_s"], 1e-9) / steps
    compile_s = max(0.0, times["first"] - main["fixed_s"] - first_steps * per_step)
    out = {
        "what": "refiner.compile_blocks: torch.compile of the UNet's BasicTransformerBlocks",
        "first_refine_s": times["first"],
        "first_refine_steps": first_steps,
        "compile_s": compile_s,
        "graphs_compiled": compiled_graphs() - graphs,
        "timed_refine_s": times["timed"],
        "steps": steps,
        "s_per_step": per_step,
        "eager_s_per_step": main["s_per_unit"],
        "per_step_speedup_vs_eager": main["s_per_unit"] / per_step,
        "refinement_s_at_defaults": main["fixed_s"] + plan.train_steps_at_defaults * per_step,
        "peak_gib": device.peak_gib(),
    }
    clock.log(
        f"refine compiled: {per_step:.3f}s/step (eager {main['s_per_unit']:.3f}), "
        f"compile {compile_s:.1f}s"
    )
    return out


#: Refiner settings measured against the library's default training step (optional parts, each
#: two refines). With a bf16 pipeline, ``mixed_precision="no"`` trains without autocast: the
#: frozen model computes in bf16 throughout (as shared/bench's reference step does), where
#: autocast runs every norm and the loss in fp32 and casts around them.
REFINE_VARIANTS: dict[str, dict[str, Any]] = {
    "refine_graphed": {"cuda_graphs": True},
    "refine_no_autocast": {"mixed_precision": "no"},
    "refine_graphed_no_autocast": {"cuda_graphs": True, "mixed_precision": "no"},
}


def run_refine_variant(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    library: dict[str, Any],
    name: str,
) -> dict[str, Any]:
    """The library's refiner with the settings `REFINE_VARIANTS[name]`, fitted as the main fit
    is: two refines of different lengths, whose difference is the per-step cost; the rest of
    the shorter one is the fixed cost, which with ``cuda_graphs`` includes the eager warm-up
    steps and the capture (both runs capture, so the short one is longer than the warm-up). The
    longer one has the main fit's images, seed and steps, so its identity is set against the
    main fit's: a graph that replayed stale inputs would drift far from it."""
    settings = {**REFINE_VARIANTS[name], "compile_blocks": False}
    main = library["stages"]["refinement"]
    steps = plan.library_train_steps
    short = min(steps - 1, max(CUDA_GRAPH_WARMUP_STEPS + 2, plan.library_train_steps_short or 0))
    times: dict[str, float] = {}
    device.empty_cache()
    device.reset_peak()
    with logged("consistent_char.refiners.ti_lora") as messages:
        timed_refine(models, plan, device, library, short, times, "short", **settings)
        identity = timed_refine(models, plan, device, library, steps, times, "timed", **settings)
    per_step, fixed, fit = fit_steps(short, times["short"], steps, times["timed"])
    at_defaults = fixed + plan.train_steps_at_defaults * per_step
    out: dict[str, Any] = {
        "settings": settings,
        "short_refine_s": times["short"],
        "short_refine_steps": short,
        "timed_refine_s": times["timed"],
        "steps": steps,
        "s_per_step": per_step,
        "fixed_s": fixed,
        "fit": fit,
        "main_fit_s_per_step": main["s_per_unit"],
        "main_fit_fixed_s": main["fixed_s"],
        "per_step_speedup_vs_main_fit": main["s_per_unit"] / per_step,
        "refinement_s_at_defaults": at_defaults,
        "refinement_speedup_vs_main_fit": main["s_at_defaults"] / at_defaults,
        "peak_gib": device.peak_gib(),
        "refiner_log": messages,
        "against_main_fit": identity_difference(identity, library["_identity"]),
    }
    if settings.get("cuda_graphs"):
        out["eager_warmup_steps"] = CUDA_GRAPH_WARMUP_STEPS
        out["captured"] = any("captured the training step" in m for m in messages)
    clock.log(
        f"{name}: {per_step:.3f}s/step (main fit {main['s_per_unit']:.3f}), fixed {fixed:.1f}s "
        f"(main fit {main['fixed_s']:.1f}s), captured {out.get('captured', '-')}"
    )
    return out


def graphs_possible(device: Device) -> bool:
    """CUDA graphs need CUDA (the tests stand a fake graph in on the CPU)."""
    return device.is_cuda


@contextlib.contextmanager
def logged(name: str) -> Iterator[list[str]]:
    """The messages (INFO and up) that logger `name` emits inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.levelname}: {record.getMessage()}")

    log = logging.getLogger(name)
    handler, level = Collect(logging.INFO), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def identity_difference(a: Any, b: Any) -> dict[str, float]:
    """How far two identities trained on the same data and seed are apart: the largest
    difference of a token row, and of a LoRA tensor, relative to that tensor's largest value."""

    def relative(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).abs().max() / y.abs().max().clamp(min=1e-12))

    rows = max(relative(a.clip_l, b.clip_l), relative(a.clip_g, b.clip_g))
    lora = max((relative(a.lora[k], b.lora[k]) for k in b.lora), default=0.0) if b.lora else 0.0
    return {"rows_max_relative": rows, "lora_max_relative": lora}


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_compiled(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    flops: float,
    peak: float,
    batch: int,
    eager_s_per_image: float,
) -> dict[str, Any]:
    """Regional torch.compile of the UNet's transformer blocks (the repeated blocks that hold most
    of its FLOPs), with channels_last and cuDNN autotuning: compile time, UNet forward rate, and
    one generation batch through the library's generator (the same UNet batch, so no
    recompilation)."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    pipe = models.pipe
    device.empty_cache()
    out: dict[str, Any] = {
        "what": "BasicTransformerBlock.compile() + channels_last + cudnn.benchmark"
    }
    pipe.unet.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    compiled = 0
    for module in pipe.unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.compile()
            compiled += 1
    out["compiled_blocks"] = compiled
    repeats = 3 if device.is_cuda else 1
    clock.log(f"compile: {compiled} transformer blocks, first forward at batch {batch}")
    first, per_call = time_unet(pipe, device, batch, plan.resolution, repeats, True)
    out["compile_s"] = max(0.0, first - per_call)
    out["graphs_compiled"] = compiled_graphs()
    tflops = flops * batch / per_call / 1e12
    out["unet_forward"] = {
        "batch": batch,
        "ms_per_sample": per_call / batch * 1e3,
        "achieved_tflops": tflops,
        "fraction_of_matmul_peak": tflops / peak if peak else 0.0,
    }
    clock.log(f"compile: {out['compile_s']:.1f}s; {tflops:.0f} TFLOP/s")
    cfg = library_config(plan)
    passes = 2 if plan.guidance_scale > 1 else 1
    n = max(1, batch // passes)
    if not clock.allows(n * eager_s_per_image + 5.0):
        out["generation"] = "skipped: time budget"
        clock.log("compile: compiled generation skipped (time budget)")
        return out
    # One batch: the UNet shape compiled above.
    generator = make_generator(pipe, plan, cfg, plan.num_inference_steps, batch_size=n)
    times: dict[str, float] = {}
    graphs_before = compiled_graphs()
    with generation_spans(device, pipe) as probe, device.timed(times, "generation"):
        generator.generate([PROMPT] * n, seeds_for(plan, n))
    spans = probe.summary()
    out["graphs_compiled_during_generation"] = compiled_graphs() - graphs_before
    out["generation"] = {
        "images": n,
        "measured_s": times["generation"],
        "s_per_image": times["generation"] / n,
        "images_per_s": n / times["generation"],
        "breakdown": breakdown(spans, times["generation"]),
        "unet": unet_rate(spans, flops, peak),
    }
    clock.log(f"compile: generation {n / times['generation']:.3f} img/s")
    return out


# ---------------------------------------------------------------------------- the summary


def iteration_seconds(path: dict[str, Any]) -> float:
    return sum(s["s_at_defaults"] for s in path["stages"].values())


def summarize(result: dict[str, Any]) -> None:
    paths = result["paths"]
    lib, naive = paths.get("library"), paths.get("naive")
    for path in (lib, naive):
        if path and "stages" in path and len(path["stages"]) == 5:
            path["iteration_s_at_defaults"] = iteration_seconds(path)
    summary: dict[str, Any] = {}
    if lib and naive and "iteration_s_at_defaults" in lib and "iteration_s_at_defaults" in naive:
        summary["iteration_speedup"] = (
            naive["iteration_s_at_defaults"] / lib["iteration_s_at_defaults"]
        )
        summary["stage_speedups"] = {
            name: naive["stages"][name]["s_at_defaults"] / s["s_at_defaults"]
            for name, s in lib["stages"].items()
            if s["s_at_defaults"] > 0
        }
    compiled = result.get("compiled") or {}
    gen = compiled.get("generation") if isinstance(compiled, dict) else None
    if isinstance(gen, dict) and lib and "iteration_s_at_defaults" in lib and naive:
        compiled_iteration = (
            lib["iteration_s_at_defaults"]
            - lib["stages"]["generation"]["s_at_defaults"]
            + gen["s_per_image"] * result["plan"]["images_at_defaults"]
        )
        summary["compiled_iteration_s_at_defaults"] = compiled_iteration
        if "iteration_s_at_defaults" in naive:
            summary["compiled_iteration_speedup"] = (
                naive["iteration_s_at_defaults"] / compiled_iteration
            )
        summary["compile_s"] = compiled["compile_s"]
    check = result.get("naive_check")
    if isinstance(check, dict) and "iteration_speedup" in summary:
        assert lib is not None and naive is not None
        reference_style = (
            naive["iteration_s_at_defaults"]
            - naive["stages"]["generation"]["s_at_defaults"]
            + check["reference_style_s_per_image"] * result["plan"]["images_at_defaults"]
        )
        summary["iteration_speedup_reference_style_naive"] = (
            reference_style / lib["iteration_s_at_defaults"]
        )
    # Each refiner variant swaps its refinement into the library iteration (and, when the
    # compiled generation was measured, that generation too: they change different stages).
    variants: dict[str, Any] = {}
    for name in REFINE_VARIANTS:
        part = result.get(name)
        if not (isinstance(part, dict) and lib and naive and "iteration_s_at_defaults" in lib):
            continue
        iteration = (
            lib["iteration_s_at_defaults"]
            - lib["stages"]["refinement"]["s_at_defaults"]
            + part["refinement_s_at_defaults"]
        )
        entry = {"iteration_s_at_defaults": iteration}
        if "iteration_s_at_defaults" in naive:
            entry["iteration_speedup"] = naive["iteration_s_at_defaults"] / iteration
            if "compiled_iteration_s_at_defaults" in summary:
                both = iteration - lib["iteration_s_at_defaults"] + compiled_iteration
                entry["with_compiled_generation_speedup"] = naive["iteration_s_at_defaults"] / both
        variants[name] = entry
    if variants:
        summary["refine_variants"] = variants
    fractions = {}
    if lib and "unet" in lib:
        fractions["library_eager"] = lib["unet"]["fraction_of_matmul_peak"]
    if isinstance(gen, dict):
        fractions["library_compiled"] = gen["unet"]["fraction_of_matmul_peak"]
    summary["unet_fraction_of_peak"] = fractions
    # The best of the library's configurations measured in this run, and which one it was (the
    # default path is `iteration_speedup`; the others turn on settings that are off by default).
    speedups = {k: v for k, v in summary.items() if k.endswith("iteration_speedup")}
    speedups |= {
        f"refine_variants.{name}.{k}": v
        for name, entry in variants.items()
        for k, v in entry.items()
        if "speedup" in k
    }
    best_key = max(speedups, key=speedups.__getitem__, default=None)
    best_speedup = speedups[best_key] if best_key else None
    best_fraction_key = max(fractions, key=fractions.__getitem__, default=None)
    best_fraction = fractions[best_fraction_key] if best_fraction_key else None
    summary["targets"] = {
        "iteration_speedup": {
            "target": TARGET_ITERATION_SPEEDUP,
            "best": best_speedup,
            "best_from": best_key,
            "met": best_speedup is not None and best_speedup >= TARGET_ITERATION_SPEEDUP,
        },
        "unet_fraction_of_peak": {
            "target": TARGET_UNET_FRACTION_OF_PEAK,
            "best": best_fraction,
            "best_from": best_fraction_key,
            "met": best_fraction is not None and best_fraction >= TARGET_UNET_FRACTION_OF_PEAK,
        },
    }
    result["summary"] = summary


def clean(value: Any) -> Any:
    """JSON-ready: floats rounded to 6 significant digits, private keys dropped."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return clean(value.item())
    return value


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(clean(result), indent=1) + "\n")
    os.replace(tmp, target)


def environment(device: Device) -> dict[str, Any]:
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": str(device.torch_device),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    if device.is_cuda:
        props = torch.cuda.get_device_properties(device.torch_device)
        env["device_name"] = props.name
        env["device_memory_gib"] = props.total_memory / 2**30
        env["multiprocessors"] = props.multi_processor_count
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
        env["cpu_threads"] = torch.get_num_threads()
    return env


# ---------------------------------------------------------------------------------- main


def quiet_libraries() -> None:
    """diffusers warns on every dtype switch of a model; keep the log to what we print."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--reduced", action="store_true",
                      help="measure fewer images and train steps (library: 16 images, "
                           "8+30 steps; naive: 8 images, 20 steps), extrapolate to the "
                           "defaults")  # fmt: skip
    mode.add_argument("--tiny", action="store_true", help="tiny models on CPU (tests, < 1 min)")
    p.add_argument("--out", help="also write the JSON here (after every part)")
    p.add_argument("--device", help="torch device (default: cuda; cpu with --tiny)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="skip the optional parts (refiner variants, naive check, UNet "
                        "variants, batch-4 and compiled training, compile) that would end "
                        "past this many seconds; recorded in the JSON")  # fmt: skip
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure regional torch.compile of the UNet (compile time, "
                        "UNet rate, one compiled generation batch)")  # fmt: skip
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the UNet under candidate settings (channels_last, fused QKV, "
                        "cuDNN autotuning; on CUDA each attention backend)")  # fmt: skip
    p.add_argument("--naive-check", action=argparse.BooleanOptionalAction, default=True,
                   help="time the naive generation as shared/bench's reference called the "
                        "pipeline too (precomputed prompt, inference_mode)")  # fmt: skip
    p.add_argument("--refine-variants", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the library's refiner with the settings of REFINE_VARIANTS "
                        "(refiner.cuda_graphs, CUDA only; no autocast)")  # fmt: skip
    p.add_argument("--refine-batches", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the library's refiner at training batch 4 too")  # fmt: skip
    p.add_argument("--skip-naive", action="store_true", help="library path only")
    p.add_argument("--memory-cap-gib", type=float,
                   help="run as on a smaller card: cap this process's CUDA memory "
                        "(torch.cuda.set_per_process_memory_fraction)")  # fmt: skip
    p.add_argument("--library-images", type=int)
    p.add_argument("--naive-images", type=int)
    p.add_argument("--library-train-steps", type=int)
    p.add_argument("--library-train-steps-short", type=int,
                   help="steps of the short refine run of the per-step fit (0: none)")  # fmt: skip
    p.add_argument("--naive-train-steps", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="ExtractorConfig override for the library path, e.g. "
                        "refiner.batch_size=4 (repeatable)")  # fmt: skip
    return p.parse_args(argv)


def memory_cap(device: Device, gib: float | None) -> dict[str, float] | None:
    """Caps this process's CUDA memory at `gib`, so that the run shows what a smaller card
    would (the allocator raises out-of-memory past the cap; the generator sizes its batches
    within it)."""
    if gib is None:
        return None
    if not device.is_cuda:
        raise SystemExit("--memory-cap-gib needs a CUDA device")
    total = torch.cuda.get_device_properties(device.torch_device).total_memory
    if not 0 < gib * 2**30 <= total:
        raise SystemExit(f"--memory-cap-gib must be in (0, {total / 2**30:.1f}], got {gib}")
    fraction = gib * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(fraction, device.torch_device)
    return {"gib": gib, "fraction_of_card": fraction}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    clock = Clock(args.time_budget_s)
    quiet_libraries()
    plan = make_plan(args)
    device = Device(plan.device)
    if plan.mode == "tiny":
        # Tiny ops are all overhead: with a second intra-op thread on a shared 2-core machine,
        # spinning threads made a UNet call 25x slower (measured). One thread is the fair setting.
        torch.set_num_threads(1)
    if device.is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    cap = memory_cap(device, args.memory_cap_gib)
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "mode": plan.mode,
        "extrapolated": plan.extrapolated,
        "plan": asdict(plan),
        "time_budget_s": args.time_budget_s,
        "memory_cap": cap,
        "paths": {},
        "skipped": [],
        "errors": [],
    }

    def part(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - a failed part is recorded, the run goes on
            clock.log(f"{name} FAILED: {err!r}")
            result["errors"].append(
                {
                    "part": name,
                    "error": repr(err)[:500],
                    "traceback": traceback.format_exc()[-3000:],
                }
            )
            return None
        finally:
            result["elapsed_s"] = clock.elapsed()
            result["timeline"] = clock.timeline
            write_json(args.out, result)

    # 1. Environment and the card's matmul ceiling
    result["environment"] = environment(device)
    clock.log(f"{plan.mode} run on {result['environment']['device_name']}")
    peak = part("matmul_peak", lambda: matmul_peak_tflops(device)) or {"median_tflops": 0.0}
    result["matmul_peak"] = peak
    clock.log(f"matmul peak {peak['median_tflops']:.1f} TFLOP/s")

    # 2. Models
    models = part("build", lambda: build_models(plan, device, clock))
    if models is None:
        return finish(result, args, clock)
    result["models"] = {
        "build_s": models.build_s,
        "unet_params_m": models.unet_params_m,
        "vocab_size": models.vocab_size,
        "resolution": plan.resolution,
    }
    clock.log(f"models built in {models.build_s:.1f}s (UNet {models.unet_params_m:.0f}M params)")
    flops = part("unet_flops", lambda: unet_flops_per_sample(models.pipe, plan.resolution)) or 0.0
    result["unet_flops_per_sample"] = flops
    result["unet_tflop_per_sample"] = flops / 1e12
    clock.log(f"UNet forward: {flops / 1e12:.3f} TFLOP per sample at {plan.resolution}px")
    # The ceiling again, on a card that has now been busy: the higher median is the peak that
    # every fraction below is taken against.
    again = part("matmul_peak_again", lambda: matmul_peak_tflops(device)) or {"median_tflops": 0.0}
    result["matmul_peak_again"] = again
    peak_tflops = max(peak["median_tflops"], again["median_tflops"])
    result["matmul_peak_tflops"] = peak_tflops
    clock.log(f"matmul peak again {again['median_tflops']:.1f} TFLOP/s; using {peak_tflops:.1f}")

    # 3. The naive reference, then 4. the library's path (on the same modules)
    if args.skip_naive:
        result["skipped"].append({"part": "naive", "reason": "--skip-naive"})
    else:
        naive = part("naive", lambda: run_naive(models, plan, device, clock, flops, peak_tflops))
        if naive is not None:
            result["paths"]["naive"] = naive
    library = part("library", lambda: run_library(models, plan, device, clock, flops, peak_tflops))
    if library is not None:
        result["paths"]["library"] = library
    summarize(result)
    write_json(args.out, result)

    # 5. Optional parts, each only if its estimate (from what the library path measured) fits
    #    the budget: refiner variants, the naive path checked against the reference's way of
    #    calling the pipeline, the UNet under candidate settings, training at batch 4, compiled
    #    training, regional compile.
    batch = (library or {}).get("unet", {}).get("max_batch") or 2
    est = optional_estimates(library, batch, plan, device, result["paths"].get("naive"))
    per_image = (library or {}).get("stages", {}).get("generation", {}).get("s_per_unit", 1.0)
    result["optional_estimates_s"] = est

    def optional(name: str, fn: Callable[[], Any]) -> None:
        if clock.allows(est[name]):
            result[name] = part(name, fn)
        else:
            result["skipped"].append({"part": name, "reason": "time budget"})
            clock.log(f"{name} skipped (time budget)")

    # The refiner variants first: the most likely gain, and before unet_variants, whose fused
    # and unfused identity LoRA leaves the UNet's weights a rounding error away from the main
    # fit's, which each variant's identity is checked against.
    if args.refine_variants and library is not None:
        for name, settings in REFINE_VARIANTS.items():
            if settings.get("cuda_graphs") and not graphs_possible(device):
                result["skipped"].append({"part": name, "reason": "needs CUDA"})
                continue
            optional(
                name,
                lambda name=name: run_refine_variant(models, plan, device, clock, library, name),
            )
    # After the refiner variants: its round trip through fp16 moves the weights by rounding.
    naive = result["paths"].get("naive")
    if args.naive_check and naive is not None:
        optional("naive_check", lambda: run_naive_check(models, plan, device, clock, naive))
    if args.variants:
        identity = (library or {}).get("_identity")
        optional(
            "unet_variants",
            lambda: run_unet_variants(
                models, plan, device, clock, flops, peak_tflops, batch, identity
            ),
        )
    if args.refine_batches and library is not None:
        optional("refine_batches", lambda: run_refine_batches(models, plan, device, clock, library))
    if args.compile and library is not None:
        # Before run_compiled, which leaves the UNet channels_last with its blocks compiled.
        optional(
            "refine_compiled", lambda: run_refine_compiled(models, plan, device, clock, library)
        )
    if args.compile:
        result["compiled"] = "started"  # what a run killed while compiling leaves behind
        write_json(args.out, result)
        if clock.allows(est["compile"]):
            result["compiled"] = part(
                "compile",
                lambda: run_compiled(
                    models, plan, device, clock, flops, peak_tflops, batch, per_image
                ),
            )
            if isinstance(result.get("compiled"), dict) and isinstance(
                result["compiled"].get("generation"), str
            ):
                result["skipped"].append({"part": "compiled_generation", "reason": "time budget"})
        else:
            result["compiled"] = None
            result["skipped"].append({"part": "compile", "reason": "time budget"})
            clock.log("compile skipped (time budget)")
    else:
        result["skipped"].append({"part": "compile", "reason": "--no-compile"})
    return finish(result, args, clock)


def optional_estimates(
    library: dict[str, Any] | None,
    batch: int,
    plan: Plan,
    device: Device,
    naive: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Seconds each optional part should take, from the library path's own measurements.

    The compile estimate assumes 60 s of compilation (regional compile of SDXL's transformer
    blocks: not measured here before; the part records what it took)."""
    if not device.is_cuda or not library or "stages" not in library:
        return {
            "unet_variants": 5.0,
            "refine_batches": 5.0,
            "refine_compiled": 30.0,
            **dict.fromkeys(REFINE_VARIANTS, 30.0),
            "naive_check": 10.0,
            "compile": 30.0,
        }
    unet = library["unet"]
    s_per_sample = unet["seconds_inside_unet"] / max(1, unet["samples"])
    refine = library["stages"]["refinement"]
    short = plan.library_train_steps_short or max(2, plan.library_train_steps // 4)
    per_image = library["stages"]["generation"]["s_per_unit"]
    naive_per_image = (naive or {}).get("stages", {}).get("generation", {}).get("s_per_unit")
    naive_per_image = naive_per_image or 4 * per_image
    passes = 2 if plan.guidance_scale > 1 else 1
    return {
        # Each variant (+2 with the identity's LoRA): one first call and two timed forwards;
        # cuDNN autotuning and applying/removing the identity on top.
        "unet_variants": (len(VARIANTS) + len(ATTENTION_BACKENDS) + 2) * 3 * batch * s_per_sample
        + 15.0,
        # At worst batch 4 costs 4x a batch-1 step.
        "refine_batches": refine["fixed_s"] + short * 4 * refine["s_per_unit"] + 5.0,
        # Compiling the blocks for training (forward and backward) is assumed at 90 s; the two
        # refines at no better than the eager rate.
        "refine_compiled": 90.0
        + 2 * refine["fixed_s"]
        + (max(2, plan.warmup_train_steps) + plan.library_train_steps) * refine["s_per_unit"],
        # Four images at the naive path's rate (two timed, each with a warm-up), the UNet 12 times.
        "naive_check": 4 * naive_per_image + 12 * 2 * s_per_sample + 10.0,
        # Two refines each at no better than the main fit's rate, and 20 s for any captures.
        **dict.fromkeys(
            REFINE_VARIANTS,
            20.0
            + 2 * refine["fixed_s"]
            + (max(CUDA_GRAPH_WARMUP_STEPS + 2, short) + plan.library_train_steps)
            * refine["s_per_unit"],
        ),
        "compile": 60.0 + 4 * batch * s_per_sample + (batch // passes) * per_image,
    }


def finish(result: dict[str, Any], args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    summarize(result)
    result["complete"] = True
    result["elapsed_s"] = clock.elapsed()
    clock.log("done")
    result["timeline"] = clock.timeline
    write_json(args.out, result)
    print_table(result)
    print(json.dumps(clean(result), indent=1), flush=True)
    return clean(result)


def print_table(result: dict[str, Any]) -> None:
    """A short human summary on stderr."""
    lines = [f"device: {result['environment'].get('device_name')}  mode: {result['mode']}"
             f"  extrapolated: {result['extrapolated']}"]  # fmt: skip
    for name, path in result["paths"].items():
        st = path.get("stages", {})
        cells = "  ".join(f"{k} {v['s_at_defaults']:.1f}s" for k, v in st.items())
        lines.append(
            f"{name:8s} iteration {path.get('iteration_s_at_defaults', float('nan')):.1f}s: {cells}"
        )
    summary = result.get("summary", {})
    lines.append(f"speedup {summary.get('iteration_speedup')}")
    lines.append(f"UNet fraction of peak {summary.get('unet_fraction_of_peak')}")
    for line in lines:
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
