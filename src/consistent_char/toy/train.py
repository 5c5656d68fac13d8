"""Trains every ToyWorld model from a seed: ``python -m consistent_char.toy.train --out DIR``.

Stages, each checkpointed under ``DIR/checkpoints/`` (safetensors + json) so a cut run resumes:

1. ``vae``: the AutoencoderKL, on reconstruction (MSE + L1) and a small KL term (on crops on a
   CPU: it is fully convolutional). Its latent scaling factor is set to ``1 / std(latents)``.
2. ``unet``: both text encoders and the UNet jointly, on latents encoded once: epsilon prediction
   with min-SNR weighting, SDXL's added conditioning (size/crop time ids + the pooled projection
   of ``text_encoder_2``), captions from the grammar naming random attribute subsets, 10% of
   captions dropped by zeroing both embeddings (what ``force_zeros_for_empty_prompt`` assumes),
   and an EMA of the weights, which is what ships.
3. ``dino``: the DINOv2, without identity labels: SimCLR on its CLS embedding, where the two
   views of a creature are two renders of it in independently drawn contexts (scene, position,
   size) plus pixel augmentations (affine, brightness, blur, noise, VAE round trip), so that
   identity, not context, dominates the embedding.
4. ``probe``: the identity probe, with ground-truth labels, on augmented renders.

Then ``DIR/pipeline`` (diffusers), ``DIR/dinov2`` (transformers + preprocessor config) and
``DIR/probe`` are written, reloaded from disk and evaluated into ``DIR/metrics.json``.

On CUDA the stages run in bf16 autocast with large batches; on a CPU with small ones. ``--scale``
multiplies every step count (``--scale 0.01`` is a smoke test). ``--time-budget SECONDS`` caps
each stage's share of the wall time (the learning-rate schedule follows whichever of steps or
time runs out first), at the price of bit-reproducibility.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from consistent_char.toy.captions import VOCABULARY
from consistent_char.toy.data import MAX_CAPTION_WORDS, RenderedSet, render_set
from consistent_char.toy.models import (
    VALID,
    IdentityProbe,
    ToyModelConfig,
    build_dinov2,
    build_scheduler,
    build_text_encoders,
    build_tokenizers,
    build_unet,
    build_vae,
    dinov2_pixels,
    save_dinov2,
)
from consistent_char.toy.world import ATTRIBUTES, render, sample_record

STAGES = ("vae", "unet", "dino", "probe")
_START = time.perf_counter()


# ----------------------------------------------------------------------------- plan


@dataclass
class StagePlan:
    """Optimisation settings of one stage."""

    steps: int
    batch: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.0
    checkpoint_every: int = 500
    log_every: int = 50
    time_share: float = 0.1  # of --time-budget


@dataclass
class Plan:
    """Everything a run does, derived from the device and ``--scale``."""

    n_pairs: int
    heldout_pairs: int
    captions_per_image: int
    # DINOv2 and the probe learn from creatures drawn uniformly over identities (every identity
    # often), the VAE and the text-to-image model from the world's prior (its peaks).
    uniform_pairs: int
    vae: StagePlan
    unet: StagePlan
    dino: StagePlan
    probe: StagePlan
    vae_crop: int | None = None
    vae_kl_weight: float = 1e-4
    caption_drop: float = 0.1
    caption_empty: float = 0.02
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    dino_temperature: float = 0.1
    recon_fraction: float = 0.25
    eval_images: int = 256
    diversity_images: int = 128
    eval_steps: int = 30
    eval_guidance: tuple[float, ...] = (7.5, 4.0)
    eval_batch: int = 256
    probe_eval_images: int = 2000
    probe_invalid_fraction: float = 0.3
    peak_images: int = 64  # images per one-attribute prompt in the peaks evaluation
    # Diversity and the peaks are measured at the guidance of ToyWorld's loop preset, where
    # the loop meets them.
    loop_guidance: float = 3.0
    bf16: bool | None = None  # bf16 autocast; None: on CUDA only
    channels_last: bool | None = None  # for the VAE and UNet; None: on CUDA only
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


def make_plan(device: str, scale: float = 1.0) -> Plan:
    """The default plan for `device` (``"cuda"`` or ``"cpu"``), step counts × `scale`."""
    if device == "cuda":
        plan = Plan(
            n_pairs=75_000,
            heldout_pairs=1_000,
            captions_per_image=8,
            uniform_pairs=40_000,
            vae=StagePlan(3000, 128, 1e-3, checkpoint_every=1000, log_every=250, time_share=0.14),
            unet=StagePlan(
                4000,
                256,
                6e-4,
                warmup=200,
                weight_decay=0.01,
                checkpoint_every=1000,
                log_every=250,
                time_share=0.50,
            ),
            dino=StagePlan(
                1500,
                512,
                1e-3,
                weight_decay=0.05,
                checkpoint_every=500,
                log_every=250,
                time_share=0.09,
            ),
            probe=StagePlan(
                1500,
                256,
                2e-3,
                weight_decay=1e-4,
                checkpoint_every=500,
                log_every=250,
                time_share=0.06,
            ),
        )
    else:
        plan = Plan(
            n_pairs=20_000,
            heldout_pairs=500,
            captions_per_image=8,
            uniform_pairs=10_000,
            vae=StagePlan(2500, 32, 1e-3, checkpoint_every=250, log_every=50, time_share=0.07),
            vae_crop=32,
            unet=StagePlan(
                5000,
                48,
                5e-4,
                warmup=200,
                weight_decay=0.01,
                checkpoint_every=100,
                log_every=25,
                time_share=0.68,
            ),
            dino=StagePlan(
                800,
                64,
                1e-3,
                weight_decay=0.05,
                checkpoint_every=100,
                log_every=25,
                time_share=0.05,
            ),
            probe=StagePlan(
                1500,
                64,
                2e-3,
                weight_decay=1e-4,
                checkpoint_every=250,
                log_every=50,
                time_share=0.08,
            ),
            recon_fraction=0.125,
            eval_steps=20,
            eval_guidance=(7.5,),
            eval_batch=32,
            # bf16 autocast on a CPU with AVX512-BF16: a UNet training step took 1.51 s
            # instead of 1.81 s in float32 (batch 48, 2 threads).
            bf16=True,
        )
    if scale != 1.0:
        for name in STAGES:
            stage: StagePlan = getattr(plan, name)
            steps = max(2, round(stage.steps * scale))
            setattr(
                plan,
                name,
                replace(
                    stage,
                    steps=steps,
                    warmup=min(stage.warmup, max(1, steps // 10)),
                    checkpoint_every=min(stage.checkpoint_every, steps),
                    log_every=max(1, min(stage.log_every, steps // 4)),
                ),
            )
    if scale < 1.0:
        small = max(scale, 0.01)
        plan.n_pairs = max(500, round(plan.n_pairs * small))
        plan.uniform_pairs = max(500, round(plan.uniform_pairs * small))
        plan.peak_images = max(8, round(plan.peak_images * small))
        plan.heldout_pairs = max(100, round(plan.heldout_pairs * small * 4))
        plan.eval_images = max(16, round(plan.eval_images * small))
        plan.diversity_images = max(16, round(plan.diversity_images * small))
        plan.probe_eval_images = max(200, round(plan.probe_eval_images * small))
        plan.eval_steps = 30 if scale >= 0.5 else 8
        plan.eval_guidance = plan.eval_guidance[:1]
    return plan


# ----------------------------------------------------------------------------- helpers


def log(stage: str, message: str) -> None:
    print(f"[{time.perf_counter() - _START:8.1f}s] {stage:>6} | {message}", flush=True)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


@contextmanager
def _autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
        yield


def _randint(high: int, n: int, gen: torch.Generator) -> torch.Tensor:
    # Drawn where the generator lives: a host-to-device copy each step would make the CPU wait
    # for the GPU's queue to drain.
    return torch.randint(0, high, (n,), generator=gen, device=gen.device)


def _to01(images_uint8: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 → ``(B, 3, H, W)`` float in ``[0, 1]``."""
    return images_uint8.permute(0, 3, 1, 2).float().div_(255.0)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class Checkpoint:
    """``checkpoints/<stage>.safetensors`` (modules, EMA, optimizer) + ``<stage>.json`` (step,
    seconds, done, results)."""

    def __init__(self, directory: Path, stage: str) -> None:
        self.tensors_path = directory / f"{stage}.safetensors"
        self.state_path = directory / f"{stage}.json"

    def state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file() or not self.tensors_path.is_file():
            return None
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.tensors_path))

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.tensors_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(tensors, self.tensors_path)
        _atomic_write_text(self.state_path, json.dumps(state, indent=2))


def _module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in module.state_dict().items()}


def _load_module(prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
    module.load_state_dict(own)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for index, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt/{index}/{key}"] = torch.as_tensor(value)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    full = opt.state_dict()
    full["state"] = state
    opt.load_state_dict(full)


@dataclass
class LoopResult:
    steps: int
    seconds: float
    loss: float
    cut_by_time: bool


def run_loop(
    name: str,
    stage: StagePlan,
    *,
    modules: dict[str, nn.Module],
    loss_fn: Callable[[int, np.random.Generator, torch.Generator], torch.Tensor],
    checkpoint: Checkpoint,
    seed: int,
    device: torch.device,
    time_limit: float | None = None,
    ema_modules: Sequence[str] = (),
    ema_decay: float = 0.999,
) -> tuple[LoopResult, dict[str, nn.Module]]:
    """Optimises `modules` with AdamW on `loss_fn` for ``stage.steps`` steps (or `time_limit`
    seconds), with warmup + cosine learning rate, gradient clipping, optional EMA copies and
    checkpoints every ``stage.checkpoint_every`` steps.

    The random streams are reseeded from ``(seed, stage, step)`` at each checkpoint boundary, so
    a run resumed from a checkpoint draws the same batches as an uninterrupted one.

    Returns:
        The result and the EMA modules (or the trained modules where no EMA is kept).
    """
    stage_id = STAGES.index(name) if name in STAGES else len(STAGES)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": stage.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=stage.lr,
        betas=(0.9, 0.99),
        **({"fused": True} if device.type == "cuda" else {}),
    )
    ema: dict[str, nn.Module] = {}
    for key in ema_modules:
        copy = _clone_module(modules[key])
        ema[key] = copy
    step, elapsed, last_loss = 0, 0.0, float("nan")
    state = checkpoint.state()
    if state is not None:
        tensors = checkpoint.tensors()
        for key, module in modules.items():
            _load_module(f"model/{key}", module, tensors)
        for key, module in ema.items():
            _load_module(f"ema/{key}", module, tensors)
        step, elapsed = int(state["step"]), float(state["seconds"])
        last_loss = float(state.get("loss", float("nan")))
        if state.get("done"):
            log(name, f"already trained ({step} steps, {elapsed:.0f}s): loaded")
            return (
                LoopResult(step, elapsed, last_loss, bool(state.get("cut_by_time"))),
                {k: ema.get(k, m) for k, m in modules.items()},
            )
        _load_optimizer(opt, tensors)
        log(name, f"resuming at step {step} ({elapsed:.0f}s done)")

    def save(done: bool, cut: bool = False) -> None:
        tensors = {}
        for key, module in modules.items():
            tensors.update(_module_tensors(f"model/{key}", module))
        for key, module in ema.items():
            tensors.update(_module_tensors(f"ema/{key}", module))
        if not done:
            tensors.update(_optimizer_tensors(opt))
        checkpoint.save(
            tensors,
            {
                "stage": name,
                "step": step,
                "seconds": elapsed,
                "loss": last_loss,
                "done": done,
                "cut_by_time": cut,
                "plan": asdict(stage),
            },
        )

    for module in modules.values():
        module.train()
    rng = np.random.default_rng([seed, stage_id, step])
    gen = torch.Generator(device=device).manual_seed(_seed_of(seed, stage_id, step))
    t0 = time.perf_counter() - elapsed
    cut = False
    window: list[torch.Tensor] = []
    while True:
        elapsed = time.perf_counter() - t0
        progress = step / stage.steps
        if time_limit:
            progress = max(progress, elapsed / time_limit)
        if progress >= 1.0:
            cut = step < stage.steps
            break
        if step % stage.checkpoint_every == 0 and step > 0:
            rng = np.random.default_rng([seed, stage_id, step])
            gen = torch.Generator(device=device).manual_seed(_seed_of(seed, stage_id, step))
        lr = stage.lr * min(1.0, (step + 1) / stage.warmup)
        lr *= 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn(step, rng, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            d = min(ema_decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for key, copy in ema.items():
                    src: list[torch.Tensor] = [p.detach() for p in modules[key].parameters()]
                    dst: list[torch.Tensor] = list(copy.parameters())
                    torch._foreach_lerp_(dst, src, 1.0 - d)
        window.append(loss.detach())
        step += 1
        if step % stage.log_every == 0 or step == stage.steps:
            last_loss = float(torch.stack(window).float().mean())
            window.clear()
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"{name}: loss is {last_loss} at step {step}")
            elapsed = time.perf_counter() - t0
            log(
                name,
                f"step {step:>6}/{stage.steps}  loss {last_loss:.5f}  lr {lr:.2e}  "
                f"{elapsed:7.1f}s  {elapsed / max(step, 1) * 1000:6.1f} ms/step",
            )
        if step % stage.checkpoint_every == 0 and step < stage.steps:
            elapsed = time.perf_counter() - t0
            save(done=False)
    if window:
        last_loss = float(torch.stack(window).float().mean())
    elapsed = time.perf_counter() - t0
    if cut:
        log(name, f"time limit reached after {step}/{stage.steps} steps")
    save(done=True, cut=cut)
    log(name, f"done: {step} steps in {elapsed:.1f}s")
    return LoopResult(step, elapsed, last_loss, cut), {k: ema.get(k, m) for k, m in modules.items()}


def _clone_module(module: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


# ----------------------------------------------------------------------------- augmentation


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    max_shift: float = 0.1,
    scale: tuple[float, float] = (0.87, 1.15),
    flip: bool = True,
) -> torch.Tensor:
    """Random affine (scale, shift, flip), brightness, blur and noise on ``[0, 1]`` images; no
    hue change (colour is identity)."""
    b, device = x.shape[0], x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(b, *shape, generator=gen, device=device) * (hi - lo) + lo

    s = 1.0 / u(*scale)
    sign = torch.where(u(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=device)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = s * sign
    theta[:, 1, 1] = s
    theta[:, 0, 2] = u(-max_shift, max_shift)
    theta[:, 1, 2] = u(-max_shift, max_shift)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * u(0.85, 1.15, 1, 1, 1) + u(-0.06, 0.06, 1, 1, 1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(u(0, 1, 1, 1, 1) < 0.3, blurred, x)
    noise = torch.randn(x.shape, generator=gen, device=device) * 0.03
    x = x + noise * (u(0, 1, 1, 1, 1) < 0.3)
    return x.clamp_(0.0, 1.0)


@torch.no_grad()
def vae_round_trip(
    vae: Any, x01: torch.Tensor, device: torch.device, bf16: bool = False
) -> torch.Tensor:
    """Encodes and decodes ``[0, 1]`` images: what a generated image's pixels look like."""
    with _autocast(device, bf16):
        z = vae.encode(x01 * 2 - 1).latent_dist.mode()
        out = vae.decode(z).sample
    return ((out.float().clamp(-1, 1) + 1) / 2).to(x01.dtype)


def _with_round_trip(
    vae: Any | None,
    x01: torch.Tensor,
    fraction: float,
    device: torch.device,
    bf16: bool,
) -> torch.Tensor:
    if vae is None or fraction <= 0:
        return x01
    n = int(round(x01.shape[0] * fraction))
    if n == 0:
        return x01
    x01 = x01.clone()
    x01[:n] = vae_round_trip(vae, x01[:n], device, bf16)
    return x01


# ----------------------------------------------------------------------------- stages


class Trainer:
    """Runs the stages in order over one rendered set, sharing the trained models."""

    def __init__(
        self,
        out: Path,
        *,
        seed: int,
        device: torch.device,
        plan: Plan,
        time_budget: float | None,
        workers: int | None,
    ) -> None:
        self.out = out
        self.ckpt_dir = out / "checkpoints"
        self.seed = seed
        self.device = device
        self.plan = plan
        self.time_budget = time_budget
        self.workers = workers
        self.seconds: dict[str, float] = {}
        on_cuda = device.type == "cuda"
        self.bf16 = on_cuda if plan.bf16 is None else plan.bf16
        self.channels_last = on_cuda if plan.channels_last is None else plan.channels_last
        self.results: dict[str, Any] = {}
        self._data: RenderedSet | None = None
        self._heldout: RenderedSet | None = None
        self._uniform: RenderedSet | None = None
        self._probe_set: RenderedSet | None = None
        self._images: torch.Tensor | None = None
        self.vae: Any = None
        self.scaling_factor: float | None = None
        self.unet_parts: dict[str, Any] = {}
        self.dino: Any = None
        self.probe: Any = None

    # -- data

    def data(self) -> RenderedSet:
        """The world-prior set (VAE, text encoders and UNet); renders every set on first use."""
        if self._data is None:
            t = time.perf_counter()
            plan, workers = self.plan, self.workers
            self._data = render_set(
                plan.n_pairs,
                seed=(self.seed, 1),
                captions_per_image=plan.captions_per_image,
                workers=workers,
            )
            self._heldout = render_set(
                plan.heldout_pairs, seed=(self.seed, 2), captions_per_image=1, workers=workers
            )
            self._uniform = render_set(
                plan.uniform_pairs,
                seed=(self.seed, 3),
                captions_per_image=1,
                workers=workers,
                prior="uniform",
            )
            self._probe_set = render_set(
                plan.uniform_pairs,
                seed=(self.seed, 4),
                captions_per_image=1,
                workers=workers,
                prior="uniform",
                invalid_fraction=plan.probe_invalid_fraction,
            )
            dt = time.perf_counter() - t
            self.seconds["render"] = dt
            sets = (self._data, self._heldout, self._uniform, self._probe_set)
            n = sum(len(x) for x in sets)
            log(
                "render",
                f"{n} images in {dt:.1f}s ({n / dt:.0f}/s, "
                f"{self.workers or os.cpu_count()} workers)",
            )
        return self._data

    def uniform(self) -> RenderedSet:
        """Pairs drawn uniformly over identities (DINOv2)."""
        self.data()
        assert self._uniform is not None
        return self._uniform

    def probe_set(self) -> RenderedSet:
        """Uniform draws with `Plan.probe_invalid_fraction` invalid images (the probe)."""
        self.data()
        assert self._probe_set is not None
        return self._probe_set

    def heldout(self) -> RenderedSet:
        self.data()
        assert self._heldout is not None
        return self._heldout

    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = torch.from_numpy(self.data().images).to(self.device)
        return self._images

    def time_limit(self, stage: StagePlan) -> float | None:
        return None if self.time_budget is None else self.time_budget * stage.time_share

    def _train_stage(self, name: str, **loop: Any) -> dict[str, nn.Module]:
        """`run_loop` for the stage `name` with its plan, seed, device and time share; records
        its seconds, steps and whether time cut it short. Returns the trained modules."""
        stage: StagePlan = getattr(self.plan, name)
        result, trained = run_loop(
            name,
            stage,
            seed=self.seed,
            device=self.device,
            time_limit=self.time_limit(stage),
            **loop,
        )
        self.seconds[name] = result.seconds
        self.results[f"{name}_steps"] = result.steps
        self.results[f"{name}_cut_by_time"] = result.cut_by_time
        return trained

    # -- 1. VAE

    def train_vae(self) -> None:
        plan, device = self.plan, self.device
        torch.manual_seed(_seed_of(self.seed, 10))
        vae = build_vae(plan.model).to(device)
        if self.channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        checkpoint = Checkpoint(self.ckpt_dir, "vae")
        images = None if _stage_done(self.ckpt_dir, "vae") else self.images()
        crop = plan.vae_crop

        def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
            assert images is not None
            idx = _randint(images.shape[0], plan.vae.batch, gen)
            x = _to01(images[idx]) * 2 - 1
            if crop is not None and crop < x.shape[-1]:
                oy, ox = (int(v) for v in rng.integers(0, x.shape[-1] - crop + 1, 2))
                x = x[:, :, oy : oy + crop, ox : ox + crop]
            with _autocast(device, self.bf16):
                posterior = vae.encode(x).latent_dist
                mean, logvar = posterior.mean.float(), posterior.logvar.float()
                z = mean + torch.exp(0.5 * logvar) * torch.randn(
                    mean.shape, generator=gen, device=device
                )
                recon = vae.decode(z).sample.float()
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
            err = recon - x
            return err.pow(2).mean() + 0.5 * err.abs().mean() + plan.vae_kl_weight * kl

        trained = self._train_stage(
            "vae",
            modules={"vae": vae},
            loss_fn=loss_fn,
            checkpoint=checkpoint,
        )
        self.vae = trained["vae"].eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        exported = (checkpoint.state() or {}).get("scaling_factor")
        if exported is not None:
            # A VAE taken as finished from an export keeps the scaling that the exported UNet
            # was trained with: one computed on this run's images would differ slightly.
            self.scaling_factor = float(exported)
            log("vae", f"scaling_factor {self.scaling_factor:.4f} (from the export)")
            return
        # Latents of unit variance, as SDXL's 0.13025 does for its VAE.
        sample = self.images()[: min(4096, self.images().shape[0])]
        latents = self.encode(sample, scaled=False)
        self.scaling_factor = float(1.0 / latents.float().std())
        log(
            "vae",
            f"latent std {latents.float().std():.4f} → scaling_factor {self.scaling_factor:.4f}",
        )

    def load_vae(self) -> None:
        if self.vae is None:
            state = Checkpoint(self.ckpt_dir, "vae").state()
            if state is None or not state.get("done"):
                raise RuntimeError("the vae stage is not finished: run --stage vae first")
            self.train_vae()

    @torch.no_grad()
    def encode(
        self, images_uint8: torch.Tensor, *, scaled: bool = True, batch: int = 1024
    ) -> torch.Tensor:
        """Posterior means of the VAE (× the scaling factor), float32, on the device."""
        out = []
        for start in range(0, images_uint8.shape[0], batch):
            x = _to01(images_uint8[start : start + batch].to(self.device)) * 2 - 1
            # The training targets: in bf16 only where that is the price of speed (CUDA).
            with _autocast(self.device, self.bf16 and self.device.type == "cuda"):
                out.append(self.vae.encode(x).latent_dist.mode().float())
        latents = torch.cat(out)
        if scaled:
            assert self.scaling_factor is not None
            latents = latents * self.scaling_factor
        return latents

    # -- 2. text encoders + UNet

    def train_unet(self) -> None:
        plan, device = self.plan, self.device
        self.load_vae()
        tokenizer, tokenizer_2 = build_tokenizers(self.ckpt_dir / "tokenizers")
        torch.manual_seed(_seed_of(self.seed, 20))
        text_encoder, text_encoder_2 = build_text_encoders(tokenizer, tokenizer_2, plan.model)
        unet = build_unet(plan.model)
        text_encoder, text_encoder_2, unet = (
            m.to(device) for m in (text_encoder, text_encoder_2, unet)
        )
        if self.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        checkpoint = Checkpoint(self.ckpt_dir, "unet")
        state = checkpoint.state()
        latents = captions = torch.zeros(0)
        if state is None or not state.get("done"):
            t = time.perf_counter()
            latents = self.encode(self.images())
            log(
                "unet",
                f"encoded {latents.shape[0]} latents {tuple(latents.shape[1:])} "
                f"in {time.perf_counter() - t:.1f}s",
            )
            captions = torch.from_numpy(self.data().captions).to(device)
        tables = [word_token_table(tok).to(device) for tok in (tokenizer, tokenizer_2)]
        specials = [
            (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
            for tok in (tokenizer, tokenizer_2)
        ]
        alphas = build_scheduler().alphas_cumprod.to(device=device, dtype=torch.float32)
        res = plan.model.image_size
        time_ids = torch.tensor([res, res, 0, 0, res, res], device=device, dtype=torch.float32)

        def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
            b = plan.unet.batch
            idx = _randint(latents.shape[0], b, gen)
            which = _randint(captions.shape[1], b, gen)
            words = captions[idx, which].long()
            u = torch.rand(b, generator=gen, device=device)
            words = torch.where((u < plan.caption_empty)[:, None], 0, words)
            keep = (u >= plan.caption_drop + plan.caption_empty) | (u < plan.caption_empty)
            ids = [
                words_to_ids(words, table, *sp) for table, sp in zip(tables, specials, strict=True)
            ]
            x0 = latents[idx]
            noise = torch.randn(x0.shape, generator=gen, device=device)
            t = torch.randint(0, alphas.shape[0], (b,), generator=gen, device=device)
            ab = alphas[t].view(b, 1, 1, 1)
            noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            with _autocast(device, self.bf16):
                prompt_embeds, pooled = encode_prompt_ids(
                    text_encoder, text_encoder_2, ids[0], ids[1]
                )
                k = keep.to(prompt_embeds.dtype)
                prompt_embeds = prompt_embeds * k[:, None, None]
                pooled = pooled * k[:, None]
                pred = unet(
                    noisy,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(b, 6)},
                ).sample
            per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
            snr = (ab / (1 - ab)).view(b)
            weight = snr.clamp(max=plan.min_snr_gamma) / snr
            return (weight * per_sample).mean()

        trained = self._train_stage(
            "unet",
            modules={"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "unet": unet},
            loss_fn=loss_fn,
            checkpoint=checkpoint,
            ema_modules=("text_encoder", "text_encoder_2", "unet"),
            ema_decay=plan.ema_decay,
        )
        self.unet_parts = {**trained, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}

    # -- 3. DINOv2

    def train_dino(self) -> None:
        plan, device = self.plan, self.device
        self.load_vae()
        torch.manual_seed(_seed_of(self.seed, 30))
        model = build_dinov2(image_size=plan.model.image_size).to(device)
        checkpoint = Checkpoint(self.ckpt_dir, "dino")
        images = (
            None
            if _stage_done(self.ckpt_dir, "dino")
            else torch.from_numpy(self.uniform().images).to(device)
        )

        def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
            assert images is not None
            b = plan.dino.batch
            pairs = _randint(images.shape[0] // 2, b, gen)
            views = []
            for j in (0, 1):
                x = _to01(images[2 * pairs + j])
                x = _with_round_trip(self.vae, x, plan.recon_fraction, device, self.bf16)
                views.append(augment(x, gen))
            with _autocast(device, self.bf16):
                z = model(pixel_values=dinov2_pixels(torch.cat(views))).pooler_output.float()
            return nt_xent(z, plan.dino_temperature)

        trained = self._train_stage(
            "dino",
            modules={"dino": model},
            loss_fn=loss_fn,
            checkpoint=checkpoint,
        )
        self.dino = trained["dino"].eval()

    # -- 4. probe

    def train_probe(self) -> None:
        plan, device = self.plan, self.device
        self.load_vae()
        torch.manual_seed(_seed_of(self.seed, 40))
        probe = IdentityProbe().to(device)
        checkpoint = Checkpoint(self.ckpt_dir, "probe")
        state = checkpoint.state()
        images = labels = valid = torch.zeros(0)
        if state is None or not state.get("done"):
            probe_set = self.probe_set()
            images = torch.from_numpy(probe_set.images).to(device)
            labels = torch.from_numpy(probe_set.labels).to(device)
            valid = torch.from_numpy(probe_set.valid).to(device)

        def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
            idx = _randint(images.shape[0], plan.probe.batch, gen)
            x = _with_round_trip(
                self.vae, _to01(images[idx]), plan.recon_fraction, device, self.bf16
            )
            x = augment(x, gen, max_shift=0.06, scale=(0.93, 1.07))
            with _autocast(device, self.bf16):
                logits = probe(x * 2 - 1)
            target, ok = labels[idx], valid[idx]
            # Attributes are learned from valid images only: a blend or a blur has none.
            w = ok.float() / ok.float().sum().clamp(min=1.0)
            loss = F.binary_cross_entropy_with_logits(logits[VALID].float(), ok.float())
            for k, a in enumerate(ATTRIBUTES):
                ce = F.cross_entropy(logits[a].float(), target[:, k], reduction="none")
                loss = loss + (w * ce).sum()
            return loss

        trained = self._train_stage(
            "probe",
            modules={"probe": probe},
            loss_fn=loss_fn,
            checkpoint=checkpoint,
        )
        self.probe = trained["probe"].eval()

    # -- export + evaluation

    def export(self) -> dict[str, Any]:
        from diffusers import StableDiffusionXLPipeline

        t = time.perf_counter()
        parts = self.unet_parts
        # channels_last (used on CUDA) would reach safetensors as non-contiguous tensors.
        vae = self.vae.float().cpu().to(memory_format=torch.contiguous_format)
        vae.register_to_config(scaling_factor=self.scaling_factor)
        pipe: Any = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=parts["text_encoder"].float().cpu(),
            text_encoder_2=parts["text_encoder_2"].float().cpu(),
            tokenizer=parts["tokenizer"],
            tokenizer_2=parts["tokenizer_2"],
            unet=parts["unet"].float().cpu().to(memory_format=torch.contiguous_format),
            scheduler=build_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        self.out.mkdir(parents=True, exist_ok=True)
        staging = self.out / ".export"
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(str(staging / "pipeline"), safe_serialization=True)
        # diffusers loads fp16 UNet/VAE files back as float32 unless told otherwise, so they
        # ship in half the space; the text encoders stay float32 because transformers keeps the
        # stored dtype.
        for name in ("unet", "vae"):
            for path in (staging / "pipeline" / name).glob("*.safetensors"):
                half = {
                    k: v.half() if v.is_floating_point() else v
                    for k, v in load_file(str(path)).items()
                }
                save_file(half, str(path), metadata={"format": "pt"})
        save_dinov2(self.dino.float().cpu(), staging / "dinov2")
        self.probe.float().cpu().save_pretrained(staging / "probe")
        for name in ("pipeline", "dinov2", "probe"):
            target = self.out / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        shutil.rmtree(staging, ignore_errors=True)
        sizes = {name: _dir_mb(self.out / name) for name in ("pipeline", "dinov2", "probe")}
        sizes["total"] = sum(sizes.values())
        self.seconds["export"] = time.perf_counter() - t
        log(
            "export", f"wrote {self.out}: " + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items())
        )
        return sizes

    def evaluate(self, sizes: dict[str, float]) -> dict[str, Any]:
        """Reloads the exported models from disk and measures them."""
        from diffusers import StableDiffusionXLPipeline
        from transformers import Dinov2Model

        from consistent_char.toy import evaluate as ev

        t = time.perf_counter()
        plan, device = self.plan, self.device
        metrics: dict[str, Any] = {}
        probe = IdentityProbe.from_pretrained(self.out / "probe", device=device)
        metrics["probe_accuracy"] = ev.probe_accuracy(
            probe, n=plan.probe_eval_images, seed=self.seed + 777
        )
        log("eval", "probe held-out accuracy " + _fmt(metrics["probe_accuracy"]))
        metrics["probe_validity"] = probe_validity(probe, seed=self.seed + 778)
        log("eval", "probe validity " + _fmt(metrics["probe_validity"]))
        heldout = _to01(torch.from_numpy(self.heldout().images).to(device))
        vae = self.vae.to(device)
        recon = torch.cat(
            [
                vae_round_trip(vae, heldout[s : s + 256], device, self.bf16)
                for s in range(0, len(heldout), 256)
            ]
        )
        metrics["vae"] = {
            "recon_mse": float((recon - heldout).pow(2).mean()),
            "recon_mse_units": "pixels in [0, 1], held-out renders, posterior mean",
            "scaling_factor": self.scaling_factor,
        }
        log("eval", f"vae held-out reconstruction MSE {metrics['vae']['recon_mse']:.5f}")
        recon_uint8 = (recon.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
        labels = self.heldout().labels
        predicted = probe.predict_indices(recon_uint8)
        metrics["probe_accuracy_vae_round_trip"] = {
            a: float((predicted[a] == labels[:, k]).mean()) for k, a in enumerate(ATTRIBUTES)
        }
        dino: Any = Dinov2Model.from_pretrained(str(self.out / "dinov2"))
        dino = dino.to(device).eval()
        metrics["dinov2"] = dino_metrics(dino, self.heldout(), device)
        log("eval", "dinov2 " + _fmt(metrics["dinov2"]))

        # Loaded as a user would (no dtype: float32), from the files just written.
        pipe = StableDiffusionXLPipeline.from_pretrained(str(self.out / "pipeline")).to(device)
        metrics["controllability"] = {}
        for guidance in plan.eval_guidance:
            result = ev.controllability(
                pipe,
                probe,
                n_images=plan.eval_images,
                seed=self.seed,
                guidance_scale=guidance,
                num_inference_steps=plan.eval_steps,
                batch_size=plan.eval_batch,
            )
            metrics["controllability"][f"guidance_{guidance:g}"] = result
            log(
                "eval",
                f"controllability (guidance {guidance:g}, {plan.eval_images} images) "
                + _fmt(result),
            )
        # Diversity and peaks are measured as the loop samples: at its guidance.
        loop_sampling: dict[str, Any] = {
            "seed": self.seed,
            "guidance_scale": plan.loop_guidance,
            "num_inference_steps": plan.eval_steps,
            "batch_size": plan.eval_batch,
        }
        metrics["diversity"] = ev.diversity(
            pipe, probe, "a creature", n=plan.diversity_images, **loop_sampling
        )
        log(
            "eval",
            f"diversity of 'a creature': {metrics['diversity']['distinct_identities']} "
            f"distinct identities in {plan.diversity_images} images",
        )
        metrics["peaks"] = ev.model_peaks(pipe, probe, plan.peak_images, **loop_sampling)
        log(
            "eval",
            f"peaks of one-attribute prompts: model/world share ratio "
            f"{metrics['peaks']['min_ratio']:.2f}-{metrics['peaks']['max_ratio']:.2f}",
        )
        metrics["targets"] = targets(metrics, plan.eval_guidance[0], sizes["total"])
        metrics["targets"]["eval_images"] = plan.eval_images
        self.seconds["eval"] = time.perf_counter() - t
        return metrics


def targets(metrics: dict[str, Any], guidance: float, size_mb: float) -> dict[str, Any]:
    """The model targets ToyWorld's weights must meet, read off `metrics`."""
    main = metrics["controllability"][f"guidance_{guidance:g}"]
    diversity, dino, peaks = metrics["diversity"], metrics["dinov2"], metrics["peaks"]
    probe_min = min(metrics["probe_accuracy"].values())
    control_min = min(main[a] for a in ATTRIBUTES)
    return {
        "probe_accuracy_min": probe_min,
        "probe_accuracy_ok": probe_min >= 0.98,
        "controllability_min": control_min,
        "controllability_ok": control_min >= 0.95,
        "diversity_ok": diversity["distinct_identities"] >= 20 and diversity["top_share"] <= 0.25,
        "peaks_ok": peaks["max_ratio"] <= 1.5 and peaks["min_ratio"] >= 1 / 1.5,
        "dino_object_centric_ok": dino["knn_same_identity"] > dino["knn_same_scene"],
        "eval_guidance": guidance,
        "size_mb": size_mb,
        "size_ok": size_mb <= 30,
    }


def probe_validity(probe: IdentityProbe, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """How the probe's validity head reads fresh renders (should be valid) and each kind of
    invalid image (should not), from identities drawn uniformly."""
    from consistent_char.toy.data import INVALID_KINDS, degrade

    rng = np.random.default_rng([seed, 43])
    records = [sample_record(rng, prior="uniform") for _ in range(n)]
    out = {"renders": float((probe.predict_validity([render(r) for r in records]) >= 0.5).mean())}
    for kind in INVALID_KINDS:
        images = [degrade(r, rng, kind, 64) for r in records[: n // 4]]
        out[kind] = float((probe.predict_validity(images) < 0.5).mean())
    return out


def word_token_table(tokenizer: Any) -> torch.Tensor:
    """Word index (0 = padding, k = ``VOCABULARY[k - 1]``) → the tokenizer's id for that word."""
    table = [int(tokenizer.pad_token_id)]
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"{word!r} is not a single token of the toy tokenizer: {ids}")
        table.append(int(ids[0]))
    return torch.tensor(table, dtype=torch.long)


def words_to_ids(
    words: torch.Tensor, table: torch.Tensor, bos: int, eos: int, pad: int, length: int = 77
) -> torch.Tensor:
    """``(B, MAX_CAPTION_WORDS)`` word indices → ``(B, length)`` token ids, exactly as the
    pipeline's ``tokenizer(prompt, padding="max_length", max_length=77)`` gives them."""
    b = words.shape[0]
    ids = torch.full((b, length), pad, dtype=torch.long, device=words.device)
    ids[:, 0] = bos
    ids[:, 1 : 1 + MAX_CAPTION_WORDS] = table[words]
    n = (words > 0).sum(dim=1)
    ids[torch.arange(b, device=words.device), 1 + n] = eos
    return ids


def encode_prompt_ids(
    text_encoder: Any, text_encoder_2: Any, ids: torch.Tensor, ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusionXLPipeline.encode_prompt`` computes: both encoders' penultimate
    hidden states, concatenated, and ``text_encoder_2``'s pooled projection."""
    h1 = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out2 = text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: row ``i`` of the first half and row ``i`` of the second are positives."""
    n = z.shape[0] // 2
    z = F.normalize(z, dim=-1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(sim, target)


@torch.no_grad()
def dino_metrics(
    dino: Any, heldout: RenderedSet, device: torch.device, *, n_neighbours: int = 5
) -> dict[str, float]:
    """How the embedding groups held-out renders: by creature (wanted) or by scene (not).

    ``pair_retrieval_top1``: how often a render's nearest among the second views is its own
    creature's. ``knn_same_identity`` and ``knn_same_scene``: over 1,000 independent renders
    drawn from the world's prior (where popular creatures recur), the fraction of each render's
    `n_neighbours` nearest neighbours that show the same identity, and the same scene; the real
    DINOv2 is object-centric, so the first should be the larger.
    """

    def embed(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(device)
        return torch.cat(
            [
                dino(pixel_values=dinov2_pixels(_to01(x[s : s + 512]))).pooler_output.float()
                for s in range(0, x.shape[0], 512)
            ]
        )

    emb = embed(heldout.images)
    d = torch.cdist(emb, emb)
    n = emb.shape[0]
    a, b = torch.arange(0, n, 2, device=device), torch.arange(1, n, 2, device=device)
    retrieval = (d[a][:, b].argmin(dim=1) == torch.arange(a.shape[0], device=device)).float().mean()
    off_diag = ~torch.eye(n, dtype=torch.bool, device=device)

    rng = np.random.default_rng([heldout.images.shape[0], 41])
    records = [sample_record(rng) for _ in range(1000)]
    singles = embed(np.stack([np.asarray(render(r)) for r in records]))
    d1 = torch.cdist(singles, singles)
    d1.fill_diagonal_(float("inf"))
    knn = d1.topk(n_neighbours, largest=False).indices.cpu().numpy()
    codes: dict[tuple[str, ...], int] = {}
    ident = np.array([codes.setdefault(r.identity, len(codes)) for r in records])
    scene = np.array([r.scene for r in records])
    return {
        "pair_retrieval_top1": float(retrieval),
        "knn_same_identity": float((ident[knn] == ident[:, None]).mean()),
        "knn_same_scene": float((scene[knn] == scene[:, None]).mean()),
        "spread_all": float(d[off_diag].mean()),
        "spread_same_identity": float(d[a, b].mean()),
    }


def _fmt(values: dict[str, Any]) -> str:
    return "  ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
    )


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m consistent_char.toy.train",
        description="Train ToyWorld's pipeline, DINOv2 and probe from a seed.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count")
    parser.add_argument(
        "--stage",
        choices=["all", *STAGES],
        default="all",
        help="run one stage (earlier ones must be done); export and evaluation "
        "run once all are done",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole run; each stage gets a fixed share",
    )
    parser.add_argument(
        "--time-shares",
        type=_parse_shares,
        default=None,
        metavar="STAGE=FRACTION,...",
        help="each named stage's share of --time-budget, e.g. vae=0.2,unet=0.5 "
        "(default: the plan's; vae 0.14, unet 0.5, dino 0.09, probe 0.06)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="exported weights folder to start from; the --stage named stage trains on from "
        "them, the others are taken as finished",
    )
    parser.add_argument("--workers", type=int, default=None, help="render processes")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is faster on a CPU shared with other jobs",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    if args.time_shares and args.time_budget is None:
        parser.error("--time-shares needs --time-budget")
    return args


def _parse_shares(text: str) -> dict[str, float]:
    """``"vae=0.2,unet=0.5"`` -> ``{"vae": 0.2, "unet": 0.5}``; each stage named once, in (0, 1]."""
    shares: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in STAGES or name in shares:
            raise argparse.ArgumentTypeError(
                f"expected STAGE=FRACTION with STAGE one of {', '.join(STAGES)}, each once; "
                f"got {item!r}"
            )
        try:
            share = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None
        if not 0 < share <= 1:
            raise argparse.ArgumentTypeError(f"{name}: the share must be in (0, 1], got {share}")
        shares[name] = share
    if sum(shares.values()) > 1:
        raise argparse.ArgumentTypeError(f"the shares add up to more than 1: {text}")
    return shares


def main(argv: Sequence[str] | None = None, *, plan: Plan | None = None) -> dict[str, Any] | None:
    """Runs the command line; `plan` replaces the device's default plan (tests use a tiny one).

    Returns:
        The metrics written to ``metrics.json``, or ``None`` while stages remain.
    """
    args = parse_args(argv)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    device = torch.device(device_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    plan = plan or make_plan(device.type, args.scale)
    for stage_name, share in (args.time_shares or {}).items():
        setattr(plan, stage_name, replace(getattr(plan, stage_name), time_share=share))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log(
        "setup",
        f"device {device}, seed {args.seed}, scale {args.scale}, out {out}, "
        f"{2 * plan.n_pairs} training images, steps "
        + ", ".join(f"{s} {getattr(plan, s).steps}×{getattr(plan, s).batch}" for s in STAGES),
    )
    trainer = Trainer(
        out,
        seed=args.seed,
        device=device,
        plan=plan,
        time_budget=args.time_budget,
        workers=args.workers,
    )
    wanted = STAGES if args.stage == "all" else (args.stage,)
    if args.init_from is not None and not (trainer.ckpt_dir / "vae.json").exists():
        seed_from_export(args.init_from, trainer.ckpt_dir, wanted)
    # Rendered before any CUDA work, so the render workers can be forked.
    trainer.data()
    for stage in STAGES:
        # A finished stage is loaded back (later stages and the export need it).
        if stage in wanted or _stage_done(trainer.ckpt_dir, stage):
            getattr(trainer, f"train_{stage}")()
    missing = [s for s in STAGES if not _stage_done(trainer.ckpt_dir, s)]
    if missing:
        log("done", f"stages still to train: {missing}; run --stage all to finish")
        return None
    sizes = trainer.export()
    metrics = trainer.evaluate(sizes)
    trainer.seconds["total"] = time.perf_counter() - _START
    metrics.update(
        {
            "seed": args.seed,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "scale": args.scale,
            "time_budget": args.time_budget,
            "seconds": trainer.seconds,
            "steps": {k: v for k, v in trainer.results.items()},
            "sizes_mb": sizes,
            "plan": _jsonable(asdict(plan)),
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        }
    )
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log("done", f"metrics in {out / 'metrics.json'}; seconds " + _fmt(trainer.seconds))
    log("done", "targets " + _fmt(metrics["targets"]))
    return metrics


def seed_from_export(weights: Path, ckpt_dir: Path, continue_stages: Sequence[str]) -> None:
    """Writes checkpoints that start every stage from an exported weights folder (the layout
    `export` writes: ``pipeline/``, ``dinov2/``, ``probe/``): stages in `continue_stages` train
    on from those weights (fresh optimizer and schedule), the others count as finished.

    This is how a short GPU run is continued on another machine, e.g. the CPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, Dinov2Model

    from consistent_char.toy.models import IdentityProbe

    pipe = weights / "pipeline"
    vae = AutoencoderKL.from_pretrained(pipe / "vae")
    modules: dict[str, dict[str, nn.Module]] = {
        "vae": {"vae": vae},
        "unet": {
            "text_encoder": CLIPTextModel.from_pretrained(pipe / "text_encoder"),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder_2"),
            "unet": UNet2DConditionModel.from_pretrained(pipe / "unet"),
        },
        "dino": {"dino": Dinov2Model.from_pretrained(weights / "dinov2")},
        "probe": {"probe": IdentityProbe.from_pretrained(weights / "probe")},
    }
    for stage, parts in modules.items():
        tensors: dict[str, torch.Tensor] = {}
        for key, module in parts.items():
            state = {k: v.float().contiguous() for k, v in module.state_dict().items()}
            tensors.update({f"model/{key}/{k}": v for k, v in state.items()})
            if stage == "unet":  # the UNet stage keeps EMA copies of its three modules
                tensors.update({f"ema/{key}/{k}": v.clone() for k, v in state.items()})
        done = stage not in continue_stages
        state = {"stage": stage, "step": 0, "seconds": 0.0, "loss": float("nan"), "done": done}
        if stage == "vae" and done:
            state["scaling_factor"] = float(vae.config.scaling_factor)
        Checkpoint(ckpt_dir, stage).save(tensors, state)
        log("setup", f"{stage}: {'loaded as finished' if done else 'continues'} from {weights}")


def _stage_done(directory: Path, stage: str) -> bool:
    return bool((Checkpoint(directory, stage).state() or {}).get("done"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    main()
