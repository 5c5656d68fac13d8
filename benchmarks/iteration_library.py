"""The library path of the iteration benchmark (`iteration.py`): `SDXLGenerator`,
`DINOv2Embedder`, `FaissKMeansClusterer` + `choose_cluster`, the TI+LoRA refiner and
`RunDirectory.save_images`, at the `ExtractorConfig` defaults."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from iteration_setup import (
    PROMPT,
    Clock,
    Device,
    Models,
    Plan,
    breakdown,
    finite_embeddings,
    generation_spans,
    max_or_none,
    pixel_std,
    seeds_for,
    set_dtype,
    stage,
    training_breakdown,
    training_spans,
    training_subset,
    unet_rate,
)

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
    cfg = library_config(plan)
    dtype = torch.bfloat16 if device.is_cuda else torch.float32
    set_dtype(models, dtype, dtype)
    device.empty_cache()
    out: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "config_overrides": plan.overrides,
        "refiner_settings": cfg.refiner.model_dump(mode="json"),
    }
    out["stages"] = {}
    device.reset_peak()
    times: dict[str, float] = {}
    images = library_generation(models, plan, device, clock, cfg, flops, peak, out, times)
    train_images = library_embedding_and_clustering(
        models, plan, device, clock, cfg, images, out, times
    )
    library_refinement(models, plan, device, clock, cfg, flops, train_images, out, times)
    return out


def library_generation(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    cfg: Any,
    flops: float,
    peak: float,
    out: dict[str, Any],
    times: dict[str, float],
) -> list[Any]:
    """1. Generation and 2. saving; returns the images."""
    from consistent_char.rundir import RunDirectory

    pipe, stages = models.pipe, out["stages"]
    n = plan.library_images
    seeds, prompts = seeds_for(plan, n), [PROMPT] * n
    # The warm-up call has the same images (so the same batches) and 2 steps.
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
    return images


def library_embedding_and_clustering(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    cfg: Any,
    images: list[Any],
    out: dict[str, Any],
    times: dict[str, float],
) -> list[Any]:
    """3. Embedding and 4. clustering and the choice of c*; returns the training images."""
    from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
    from consistent_char.clusterers.selection import choose_cluster
    from consistent_char.embedders.dinov2 import DINOv2Embedder

    stages, n = out["stages"], plan.library_images
    embedder = DINOv2Embedder.from_model(models.dino, batch_size=cfg.embedder.batch_size)
    embedder.embed(images[:2])
    with device.timed(times, "embedding"):
        embeddings = embedder.embed(images)
    stages["embedding"] = stage(times["embedding"], n, "image", plan.images_at_defaults)

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
    return train_images


def library_refinement(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    cfg: Any,
    flops: float,
    train_images: list[Any],
    out: dict[str, Any],
    times: dict[str, float],
) -> None:
    """5. Refinement: a short warm-up run, then (reduced) a short and a long run, whose
    difference is the per-step cost; the rest of the short run is the fixed cost."""
    pipe = models.pipe
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
    record_refinement(plan, device, clock, cfg, out, times)
    # For the optional training-batch part; keys starting with "_" are never written.
    out["_train_images"], out["_captions"], out["_identity"] = train_images, captions, identity


def record_refinement(
    plan: Plan,
    device: Device,
    clock: Clock,
    cfg: Any,
    out: dict[str, Any],
    times: dict[str, float],
) -> None:
    """The refinement stage from its timed runs: the per-step and fixed costs, the rates and
    the peak memory."""
    long_steps, short_steps = plan.library_train_steps, plan.library_train_steps_short
    if short_steps:
        out["refinement_short_run"] = {"steps": short_steps, "seconds": times["refine_short"]}
        per_step, fixed, fit = fit_steps(
            short_steps, times["refine_short"], long_steps, times["refine"]
        )
    else:
        per_step, fixed, fit = times["refine"] / long_steps, 0.0, "total / steps"
    out["refinement_fit"] = fit
    out["stages"]["refinement"] = stage(
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
