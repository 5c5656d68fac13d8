"""What a training run does: each stage's steps, batch and learning rate, per device and scale."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from consistent_char.toy.models import ToyModelConfig

#: The stages, in the order they run: each later one needs the VAE.
STAGES = ("vae", "unet", "dino", "probe")


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
    plan = _cuda_plan() if device == "cuda" else _cpu_plan()
    if scale != 1.0:
        _scale_steps(plan, scale)
    if scale < 1.0:
        _shrink_sets(plan, scale)
    return plan


def _cuda_plan() -> Plan:
    """The GPU plan: large batches over more rendered pairs, fewer checkpoints."""
    return Plan(
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
            1500, 512, 1e-3, weight_decay=0.05, checkpoint_every=500, log_every=250, time_share=0.09
        ),
        probe=StagePlan(
            1500, 256, 2e-3, weight_decay=1e-4, checkpoint_every=500, log_every=250, time_share=0.06
        ),
    )


def _cpu_plan() -> Plan:
    """The CPU plan: small batches, VAE crops, and frequent checkpoints, as a run takes hours."""
    return Plan(
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
            800, 64, 1e-3, weight_decay=0.05, checkpoint_every=100, log_every=25, time_share=0.05
        ),
        probe=StagePlan(
            1500, 64, 2e-3, weight_decay=1e-4, checkpoint_every=250, log_every=50, time_share=0.08
        ),
        recon_fraction=0.125,
        eval_steps=20,
        eval_guidance=(7.5,),
        eval_batch=32,
        # bf16 autocast on a CPU with AVX512-BF16: a UNet training step took 1.51 s
        # instead of 1.81 s in float32 (batch 48, 2 threads).
        bf16=True,
    )


def _scale_steps(plan: Plan, scale: float) -> None:
    """Multiplies every stage's steps by `scale`, keeping warm-up, checkpoints and logs within."""
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


def _shrink_sets(plan: Plan, scale: float) -> None:
    """Shrinks the rendered sets and the evaluation with the steps, so a smoke run is quick."""
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
