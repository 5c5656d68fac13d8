"""The recipe's last stage: the exported models, reloaded from disk, measured into
``metrics.json``, and the targets they must meet."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from consistent_char.toy import evaluate as ev
from consistent_char.toy.data import INVALID_KINDS, RenderedSet, degrade
from consistent_char.toy.models import IdentityProbe, dinov2_pixels
from consistent_char.toy.world import ATTRIBUTES, render, sample_record
from recipes.toyworld.augment import to01, vae_round_trip
from recipes.toyworld.log import fmt, log
from recipes.toyworld.trainer import Trainer


def evaluate(trainer: Trainer, sizes: dict[str, float]) -> dict[str, Any]:
    """Reloads the exported models from disk and measures them."""
    from transformers import Dinov2Model

    t = time.perf_counter()
    device = trainer.device
    metrics: dict[str, Any] = {}
    probe = IdentityProbe.from_pretrained(trainer.out / "probe", device=device)
    metrics["probe_accuracy"] = ev.probe_accuracy(
        probe, n=trainer.plan.probe_eval_images, seed=trainer.seed + 777
    )
    log("eval", "probe held-out accuracy " + fmt(metrics["probe_accuracy"]))
    metrics["probe_validity"] = probe_validity(probe, seed=trainer.seed + 778)
    log("eval", "probe validity " + fmt(metrics["probe_validity"]))
    metrics.update(_evaluate_vae(trainer, probe))
    dino: Any = Dinov2Model.from_pretrained(str(trainer.out / "dinov2"))
    dino = dino.to(device).eval()
    metrics["dinov2"] = dino_metrics(dino, trainer.heldout(), device)
    log("eval", "dinov2 " + fmt(metrics["dinov2"]))
    metrics.update(_evaluate_pipeline(trainer, probe))
    guidance = trainer.plan.eval_guidance[0]
    metrics["targets"] = targets(metrics, guidance, sizes["total"])
    metrics["targets"]["eval_images"] = trainer.plan.eval_images
    trainer.seconds["eval"] = time.perf_counter() - t
    return metrics


def _evaluate_vae(trainer: Trainer, probe: IdentityProbe) -> dict[str, Any]:
    """The VAE's held-out reconstruction, and the probe's accuracy on its round trips."""
    device = trainer.device
    heldout = to01(torch.from_numpy(trainer.heldout().images).to(device))
    vae = trainer.vae.to(device)
    recon = torch.cat(
        [
            vae_round_trip(vae, heldout[s : s + 256], device, trainer.bf16)
            for s in range(0, len(heldout), 256)
        ]
    )
    metrics: dict[str, Any] = {
        "vae": {
            "recon_mse": float((recon - heldout).pow(2).mean()),
            "recon_mse_units": "pixels in [0, 1], held-out renders, posterior mean",
            "scaling_factor": trainer.scaling_factor,
        }
    }
    log("eval", f"vae held-out reconstruction MSE {metrics['vae']['recon_mse']:.5f}")
    recon_uint8 = (recon.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
    labels = trainer.heldout().labels
    predicted = probe.predict_indices(recon_uint8)
    metrics["probe_accuracy_vae_round_trip"] = {
        a: float((predicted[a] == labels[:, k]).mean()) for k, a in enumerate(ATTRIBUTES)
    }
    return metrics


def _evaluate_pipeline(trainer: Trainer, probe: IdentityProbe) -> dict[str, Any]:
    """The pipeline's controllability at each evaluation guidance, then its diversity and
    peaks at the loop's guidance, where the loop meets them."""
    from diffusers import StableDiffusionXLPipeline

    plan = trainer.plan
    # Loaded as a user would (no dtype: float32), from the files just written.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(trainer.out / "pipeline"))
    pipe = pipe.to(trainer.device)
    metrics: dict[str, Any] = {"controllability": {}}
    for guidance in plan.eval_guidance:
        result = ev.controllability(
            pipe,
            probe,
            n_images=plan.eval_images,
            seed=trainer.seed,
            guidance_scale=guidance,
            num_inference_steps=plan.eval_steps,
            batch_size=plan.eval_batch,
        )
        metrics["controllability"][f"guidance_{guidance:g}"] = result
        log(
            "eval",
            f"controllability (guidance {guidance:g}, {plan.eval_images} images) " + fmt(result),
        )
    loop_sampling: dict[str, Any] = {
        "seed": trainer.seed,
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
    rng = np.random.default_rng([seed, 43])
    records = [sample_record(rng, prior="uniform") for _ in range(n)]
    out = {"renders": float((probe.predict_validity([render(r) for r in records]) >= 0.5).mean())}
    for kind in INVALID_KINDS:
        images = [degrade(r, rng, kind, 64) for r in records[: n // 4]]
        out[kind] = float((probe.predict_validity(images) < 0.5).mean())
    return out


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
                dino(pixel_values=dinov2_pixels(to01(x[s : s + 512]))).pooler_output.float()
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
