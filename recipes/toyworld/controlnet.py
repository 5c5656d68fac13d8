"""ToyWorld's pose ControlNet and pose probe: ``python -m recipes.toyworld.controlnet``.

Run from the repository root after the main recipe (it starts from the exported pipeline)::

    python -m recipes.toyworld.controlnet --weights src/consistent_char/toy/weights

Two stages, each checkpointed under ``--ckpt`` (default ``WEIGHTS/../controlnet-checkpoints``)
so that a cut run resumes where it stopped:

1. ``pose_probe``: an `IdentityProbe` with a pose head, trained on creatures drawn in the wide
   poses of `consistent_char.toy.pose.POSE_RANGES` (the shipped probe has only seen upright,
   centred creatures), half of them passed through the VAE as generated images are, to read
   both the identity and the pose of a drawn creature;
2. ``controlnet``: a ControlNet made from the toy UNet (`ControlNetModel.from_unet`: a copy of
   its encoder, zero-initialised outputs), trained with the UNet, VAE and text encoders frozen to
   draw the creature in the pose of a pose map (`consistent_char.toy.pose.pose_map`). Timesteps
   are drawn with a cubic bias towards high noise, where the layout is decided (as T2I-Adapter
   does for structure), or with ``--timesteps uniform`` alike at every noise level.

The shipped ControlNet was trained in three runs: two with the cubic bias (the second with
``--init-controlnet`` from the first), then one more from those weights with ``--timesteps
uniform``: the toy UNet, which has only seen upright, centred creatures, straightens a leaning
one even in the last, low-noise steps, and the ControlNet must hold the pose there too.

Then it writes ``WEIGHTS/controlnet`` (diffusers) and ``WEIGHTS/pose_probe`` and measures both
into ``WEIGHTS/../controlnet-metrics.json`` (the probe on held-out renders; the ControlNet on
images it draws, read by the probe).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from consistent_char.toy.captions import sample_caption
from consistent_char.toy.pose import POSE_RANGES, pose_map, pose_of, sample_posed_record
from consistent_char.toy.probe import POSE_KEY, IdentityProbe, ProbeConfig
from consistent_char.toy.world import ATTRIBUTES, render
from recipes.toyworld.augment import augment, jitter_saturation, to01, vae_round_trip
from recipes.toyworld.checkpoint import Checkpoint, atomic_write_text
from recipes.toyworld.log import log
from recipes.toyworld.loop import autocast, randint, run_loop, seed_of
from recipes.toyworld.plan import StagePlan
from recipes.toyworld.stages import encode_prompt_ids

CONTROLNET_DIR = "controlnet"
POSE_PROBE_DIR = "pose_probe"
# The conditioning embedding halves the control image twice: 64 px → the 16×16 latents.
CONDITIONING_CHANNELS = (16, 32, 64)


@dataclass
class AppsPlan:
    """Sizes and optimisation of both stages."""

    train_images: int = 8_000
    probe_images: int = 16_000
    heldout_images: int = 1_000
    captions_per_image: int = 4
    caption_drop: float = 0.1
    min_snr_gamma: float = 5.0
    # "high": a cubic bias towards high noise, where the layout is decided; "uniform": every
    # noise level alike (see the module's docstring).
    timesteps: str = "high"
    pose_weight: float = 50.0
    eval_images: int = 128
    eval_steps: int = 20
    eval_guidance: float = 3.0
    bf16: bool = True
    # A small probe: its task (read a 64 px creature's attributes and pose) needs no more, and
    # it trains in minutes on a CPU.
    probe_channels: tuple[int, ...] = (16, 32, 64)
    probe_hidden: int = 128
    # The share of the pose probe's images passed through the VAE first: every drawn image is
    # a VAE decode, whose small dark feet may fade, and a probe that has seen only renders then
    # misreads where the creature stands.
    probe_vae_share: float = 0.5
    # A range of saturation factors the pose probe's images are jittered by (None: none, as
    # the shipped probe was trained).
    probe_saturation: tuple[float, float] | None = None
    # Seconds for the ControlNet stage (None: its steps); the learning rate follows the
    # fraction of the budget spent, so a cut stage still ends its cosine decay.
    controlnet_seconds: float | None = None
    # The share of the ControlNet's training poses that lean more than 15° (the rest drawn from
    # POSE_RANGES as they come): the ControlNet draws strong leans short, and x with them.
    strong_lean_share: float = 0.0
    pose_probe: StagePlan = field(
        default_factory=lambda: StagePlan(
            2500, 64, 2e-3, weight_decay=1e-4, checkpoint_every=250, log_every=50
        )
    )
    controlnet: StagePlan = field(
        default_factory=lambda: StagePlan(
            6000, 16, 5e-4, warmup=100, weight_decay=0.01, checkpoint_every=100, log_every=25
        )
    )


@dataclass
class PosedSet:
    """Rendered creatures in wide poses, their pose maps, labels, poses and captions."""

    images: np.ndarray  # (N, 64, 64, 3) uint8
    maps: np.ndarray  # (N, 64, 64, 3) uint8
    labels: np.ndarray  # (N, len(ATTRIBUTES)) class indices
    poses: np.ndarray  # (N, 4) in POSE order
    captions: list[list[str]]


def posed_set(
    n: int, seed: int, prior: str, captions_per_image: int, strong_lean_share: float = 0.0
) -> PosedSet:
    """`n` creatures drawn from `prior` in poses from `POSE_RANGES` (deterministic in `seed`);
    the first `strong_lean_share` of them lean 15-25° to either side."""
    rng = np.random.default_rng(seed)
    strong = round(n * strong_lean_share)
    records = [
        sample_posed_record(rng, prior=prior, tilt=_strong_lean(rng)) for _ in range(strong)
    ] + [sample_posed_record(rng, prior=prior) for _ in range(n - strong)]
    images = np.stack([np.asarray(render(r)) for r in records])
    maps = np.stack([np.asarray(pose_map(r)) for r in records])
    labels = np.asarray(
        [[values.index(getattr(r, a)) for a, values in ATTRIBUTES.items()] for r in records]
    )
    captions = [[sample_caption(r, rng) for _ in range(captions_per_image)] for r in records]
    return PosedSet(images, maps, labels, pose_of(records), captions)


#: Where a strong lean starts (degrees); it goes to the edge of `POSE_RANGES`' tilt.
STRONG_LEAN = 15.0


def _strong_lean(rng: np.random.Generator) -> float:
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(STRONG_LEAN, POSE_RANGES["tilt"][1]))


# ----------------------------------------------------------------------------- pose probe


def train_pose_probe(
    plan: AppsPlan, data: PosedSet, ckpt: Path, seed: int, vae: Any = None
) -> IdentityProbe:
    """An identity probe with a pose head, trained on posed renders with photometric
    augmentation only (brightness, blur, noise): a shift or a flip would change the pose it must
    read. With `vae`, a share of `plan.probe_vae_share` of its images are VAE round trips
    (computed once, before training: on a CPU a round trip per step costs more than the
    probe's own step)."""
    device = torch.device("cpu")
    torch.manual_seed(seed_of(seed, 60))
    config = ProbeConfig(
        validity=False, pose=True, channels=plan.probe_channels, hidden=plan.probe_hidden
    )
    probe = IdentityProbe(config)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    targets = IdentityProbe.pose_targets(data.poses)
    checkpoint = Checkpoint(ckpt, "pose_probe")
    share = plan.probe_vae_share if vae is not None else 0.0
    decoded = images
    if share > 0 and not (checkpoint.state() or {}).get("done"):
        decoded = vae_round_trips(vae, images, plan.bf16)

    def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        idx = randint(images.shape[0], plan.pose_probe.batch, gen)
        through_vae = (torch.rand(idx.shape[0], generator=gen) < share)[:, None, None, None]
        pixels = torch.where(through_vae, decoded[idx], images[idx])
        x = augment(to01(pixels), gen, max_shift=0.0, scale=(1.0, 1.0), flip=False)
        if plan.probe_saturation is not None:
            x = jitter_saturation(x, gen, *plan.probe_saturation)
        with autocast(device, plan.bf16):
            out = probe(x * 2 - 1)
        loss = plan.pose_weight * F.mse_loss(out[POSE_KEY].float(), targets[idx])
        for k, a in enumerate(ATTRIBUTES):
            loss = loss + F.cross_entropy(out[a].float(), labels[idx, k])
        return loss

    _, trained = run_loop(
        "pose_probe",
        plan.pose_probe,
        modules={"probe": probe},
        loss_fn=loss_fn,
        checkpoint=checkpoint,
        seed=seed,
        device=device,
    )
    trained_probe = trained["probe"]
    assert isinstance(trained_probe, IdentityProbe)
    return trained_probe.eval()


def vae_round_trips(vae: Any, images: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 renders → their VAE round trips, uint8."""
    t0 = time.perf_counter()
    device = torch.device("cpu")
    out = []
    for start in range(0, images.shape[0], 256):
        x = vae_round_trip(vae, to01(images[start : start + 256]), device, bf16)
        out.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    log("pose_probe", f"{images.shape[0]} VAE round trips in {time.perf_counter() - t0:.0f}s")
    return torch.cat(out)


# ----------------------------------------------------------------------------- ControlNet


def build_controlnet(unet: Any) -> Any:
    """A ControlNet from the UNet: its encoder's weights, zero-initialised outputs, and a
    conditioning embedding that brings the 64 px control image to the latents' 16×16."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS
    )


def train_controlnet(
    plan: AppsPlan, data: PosedSet, pipe: Any, ckpt: Path, seed: int, init: Path | None = None
) -> Any:
    """Trains the ControlNet on min-SNR-weighted epsilon prediction through the frozen UNet,
    from the UNet's encoder or, with `init`, from an exported ControlNet (a later session
    training on: a new schedule, warm-up included, from those weights)."""
    from diffusers import ControlNetModel

    device = torch.device("cpu")
    torch.manual_seed(seed_of(seed, 70))
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()
    controlnet = (
        ControlNetModel.from_pretrained(init) if init is not None else build_controlnet(pipe.unet)
    )
    checkpoint = Checkpoint(ckpt, "controlnet")
    state = checkpoint.state()
    latents = maps = ids = ids_2 = torch.zeros(0)
    if state is None or not state.get("done"):
        latents, maps = _encode(pipe, data, plan.bf16)
        ids, ids_2 = (_token_ids(tok, data.captions) for tok in (pipe.tokenizer, pipe.tokenizer_2))
    alphas = pipe.scheduler.alphas_cumprod.to(torch.float32)
    res = data.images.shape[1]
    time_ids = torch.tensor([res, res, 0, 0, res, res], dtype=torch.float32)

    def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        b = plan.controlnet.batch
        idx = randint(latents.shape[0], b, gen)
        which = randint(ids.shape[1], b, gen)
        x0, cond = latents[idx], maps[idx]
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(b, generator=gen)
        u = u**3 if plan.timesteps == "high" else u
        t = ((1 - u) * alphas.shape[0]).long().clamp(max=alphas.shape[0] - 1)
        ab = alphas[t].view(b, 1, 1, 1)
        noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        keep = (torch.rand(b, generator=gen) >= plan.caption_drop).float()
        with autocast(device, plan.bf16):
            with torch.no_grad():
                embeds, pooled = encode_prompt_ids(
                    pipe.text_encoder, pipe.text_encoder_2, ids[idx, which], ids_2[idx, which]
                )
                embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(b, 6)}
            down, mid = controlnet(
                noisy,
                t,
                encoder_hidden_states=embeds,
                controlnet_cond=cond,
                added_cond_kwargs=added,
                return_dict=False,
            )
            pred = pipe.unet(
                noisy,
                t,
                encoder_hidden_states=embeds,
                added_cond_kwargs=added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        snr = (ab / (1 - ab)).view(b)
        return (snr.clamp(max=plan.min_snr_gamma) / snr * per_sample).mean()

    _, trained = run_loop(
        "controlnet",
        plan.controlnet,
        modules={"controlnet": controlnet},
        loss_fn=loss_fn,
        checkpoint=checkpoint,
        seed=seed,
        device=device,
        time_limit=plan.controlnet_seconds,
    )
    return trained["controlnet"].eval()


@torch.no_grad()
def _encode(pipe: Any, data: PosedSet, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The renders' VAE latents (scaled, as the UNet saw them) and the maps in [0, 1]."""
    t0 = time.perf_counter()
    out = []
    for start in range(0, len(data.images), 512):
        x = to01(torch.from_numpy(data.images[start : start + 512])) * 2 - 1
        out.append(pipe.vae.encode(x).latent_dist.mode().float())
    latents = torch.cat(out) * pipe.vae.config.scaling_factor
    log("controlnet", f"encoded {len(latents)} latents in {time.perf_counter() - t0:.1f}s")
    return latents, to01(torch.from_numpy(data.maps))


def _token_ids(tokenizer: Any, captions: list[list[str]]) -> torch.Tensor:
    """``(N, K, 77)`` token ids of every image's `K` captions."""
    flat = [c for per_image in captions for c in per_image]
    ids = tokenizer(
        flat,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.view(len(captions), len(captions[0]), -1)


# ----------------------------------------------------------------------------- measuring


def measure(
    plan: AppsPlan, pipe: Any, controlnet: Any, probe: IdentityProbe, heldout: PosedSet
) -> dict[str, Any]:
    """The probe on held-out renders, and how often drawn creatures follow their pose map."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from consistent_char.toy.pose import pose_followed

    read = probe.predict(heldout.images)
    names = list(ATTRIBUTES)
    identity = [a for a in names if a != "scene"]
    correct = np.asarray(
        [
            [r[a] == ATTRIBUTES[a][heldout.labels[i, names.index(a)]] for a in identity]
            for i, r in enumerate(read)
        ]
    )
    followed_renders = pose_followed(probe.predict_pose(heldout.images), heldout.poses)
    n = plan.eval_images
    control = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    prompts = [c[0] for c in heldout.captions[:n]]
    maps = [_image(m) for m in heldout.maps[:n]]
    images = []
    for start in range(0, n, 32):
        gens = [torch.Generator().manual_seed(seed) for seed in range(start, min(n, start + 32))]
        images += control(
            prompts[start : start + 32],
            image=maps[start : start + 32],
            num_inference_steps=plan.eval_steps,
            guidance_scale=plan.eval_guidance,
            generator=gens,
        ).images
    drawn = pose_followed(probe.predict_pose(images), heldout.poses[:n])
    return {
        "pose_probe": {
            "identity_all_correct": float(correct.all(axis=1).mean()),
            "per_attribute": {a: float(correct[:, k].mean()) for k, a in enumerate(identity)},
            "pose_followed_on_renders": float(followed_renders.mean()),
        },
        "controlnet": {"pose_followed": float(drawn.mean()), "images": n},
    }


def _image(array: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(array)


# ----------------------------------------------------------------------------- command line


STAGES = ("pose_probe", "controlnet", "measure")


def main(argv: Sequence[str] | None = None, *, plan: AppsPlan | None = None) -> dict[str, Any]:
    """Trains (or resumes) the stages asked for, exports them and, last, writes the metrics."""
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    parser = argparse.ArgumentParser(prog="python -m recipes.toyworld.controlnet")
    parser.add_argument("--weights", type=Path, required=True, help="the toy weights folder")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder")
    parser.add_argument("--stage", choices=["all", *STAGES], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--controlnet-seconds", type=float, default=None, help="time budget of the ControlNet"
    )
    parser.add_argument(
        "--init-controlnet",
        type=Path,
        default=None,
        help="an exported ControlNet folder to train on from (with a new --ckpt folder)",
    )
    parser.add_argument("--timesteps", choices=["high", "uniform"], default="high")
    parser.add_argument(
        "--strong-lean-share",
        type=float,
        default=0.0,
        help="share of the ControlNet's training poses leaning 15-25 degrees",
    )
    parser.add_argument(
        "--probe-saturation",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="jitter the pose probe's images' saturation by a factor in [LO, HI]",
    )
    args = parser.parse_args(argv)
    if (
        args.probe_saturation is not None
        and not 0 <= args.probe_saturation[0] <= args.probe_saturation[1]
    ):
        parser.error(f"--probe-saturation needs 0 <= LO <= HI, got {args.probe_saturation}")
    if not 0 <= args.strong_lean_share <= 1:
        parser.error(f"--strong-lean-share must be in [0, 1], got {args.strong_lean_share}")
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = plan or AppsPlan(
        controlnet_seconds=args.controlnet_seconds,
        timesteps=args.timesteps,
        strong_lean_share=args.strong_lean_share,
        probe_saturation=tuple(args.probe_saturation) if args.probe_saturation else None,
    )
    ckpt: Path = args.ckpt or args.weights.resolve().parent / "controlnet-checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    pipe = StableDiffusionXLPipeline.from_pretrained(args.weights / "pipeline")
    if "pose_probe" in stages:
        uniform = _rendered(plan.probe_images, seed_of(args.seed, 81), "uniform", 1)
        probe = train_pose_probe(plan, uniform, ckpt, args.seed, vae=pipe.vae)
        probe.save_pretrained(args.weights / POSE_PROBE_DIR)
    if "controlnet" in stages:
        train = _rendered(
            plan.train_images,
            seed_of(args.seed, 80),
            "world",
            plan.captions_per_image,
            plan.strong_lean_share,
        )
        controlnet = train_controlnet(plan, train, pipe, ckpt, args.seed, init=args.init_controlnet)
        controlnet.save_pretrained(args.weights / CONTROLNET_DIR)
    if "measure" not in stages:
        return {}
    heldout = _rendered(plan.heldout_images, seed_of(args.seed, 82), "world", 1)
    probe = IdentityProbe.from_pretrained(args.weights / POSE_PROBE_DIR)
    controlnet = ControlNetModel.from_pretrained(args.weights / CONTROLNET_DIR)
    metrics = {"plan": asdict(plan), **measure(plan, pipe, controlnet, probe, heldout)}
    atomic_write_text(ckpt.parent / "controlnet-metrics.json", json.dumps(metrics, indent=2))
    log("done", json.dumps({k: v for k, v in metrics.items() if k != "plan"}))
    return metrics


def _rendered(n: int, seed: int, prior: str, captions: int, strong_lean: float = 0.0) -> PosedSet:
    t0 = time.perf_counter()
    data = posed_set(n, seed, prior, captions, strong_lean)
    log("data", f"rendered {n} posed images ({prior} prior) in {time.perf_counter() - t0:.0f}s")
    return data


if __name__ == "__main__":
    main()
