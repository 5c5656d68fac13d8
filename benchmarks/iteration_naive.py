"""The naive path of the iteration benchmark (`iteration.py`): the diffusers pipeline one image at
a time, DINOv2 in fp32, plain k-means, `PIL.Image.save` and a plain TI+LoRA training loop; and
the optional check of its generation against shared/bench's reference."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from iteration_setup import (
    PROMPT,
    PROMPT_WORDS,
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
    time_unet,
    training_breakdown,
    training_spans,
    training_subset,
    unet_rate,
)

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
    pipe = models.pipe
    out: dict[str, Any] = {"dtype_generation": str(pipe.unet.dtype).removeprefix("torch.")}
    out["stages"] = {}
    device.reset_peak()
    times: dict[str, float] = {}
    images = naive_generation(models, plan, device, clock, flops, peak, out, times)
    train_images = naive_embedding_and_clustering(models, plan, device, clock, images, out, times)
    naive_refinement(models, plan, device, clock, flops, train_images, out, times)
    return out


def naive_generation(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    flops: float,
    peak: float,
    out: dict[str, Any],
    times: dict[str, float],
) -> list[Any]:
    """1. Generation and 2. saving; returns the images."""
    pipe, stages = models.pipe, out["stages"]
    n = plan.naive_images
    seeds = seeds_for(plan, n)
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
    return images


def naive_embedding_and_clustering(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    images: list[Any],
    out: dict[str, Any],
    times: dict[str, float],
) -> list[Any]:
    """3. Embedding and 4. clustering; returns the training images."""
    import faiss

    from consistent_char.embedders._preprocess import ResizeCropNormalize

    stages, n = out["stages"], plan.naive_images
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
    return [images[i] for i in subset]


def naive_refinement(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    flops: float,
    train_images: list[Any],
    out: dict[str, Any],
    times: dict[str, float],
) -> None:
    """5. Refinement: TI (both encoders) + LoRA, batch 1, everything recomputed every step."""
    train_dtype = torch.bfloat16 if device.is_cuda else torch.float32
    with device.timed(times, "dtype_switch"):
        set_dtype(models, train_dtype, torch.float32)
    out["dtype_training"] = str(train_dtype).removeprefix("torch.")
    out["dtype_switch_s"] = times["dtype_switch"]
    device.empty_cache()
    device.reset_peak()
    refine = naive_refine(models, plan, device, train_images, flops)
    out["refinement_breakdown"] = refine["breakdown"]
    out["peak_gib_refinement"] = device.peak_gib()
    out["stages"]["refinement"] = stage(
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


#: The naive training caption. An existing word stands for the new token: a real script adds a
#: row, the cost is the same.
NAIVE_CAPTION = f"a photo of {PROMPT_WORDS[4]} creature"
NAIVE_ADAPTER = "naive_benchmark"


def naive_training_setup(
    models: Models, plan: Plan, device: Device, times: dict[str, float]
) -> tuple[Any, ...]:
    """What `naive_refine` sets up before its first step, as the examples do, timed as
    ``times["setup"]``: the noise scheduler, a fresh LoRA in fp32, both whole embedding tables
    trainable (with copies to restore every row but the token's), unfused AdamW and the SDXL
    time ids."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    with device.timed(times, "setup"):
        return _naive_training_setup(models, plan, device, DDPMScheduler, LoraConfig)


def _naive_training_setup(
    models: Models, plan: Plan, device: Device, scheduler_class: Any, lora_config_class: Any
) -> tuple[Any, ...]:
    pipe, dev, res = models.pipe, device.torch_device, plan.resolution
    unet, tokenizer = pipe.unet, pipe.tokenizer
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    noise_scheduler = scheduler_class(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000,
    )  # fmt: skip
    unet.add_adapter(
        lora_config_class(
            r=4, lora_alpha=4, init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        ),
        adapter_name=NAIVE_ADAPTER,
    )  # fmt: skip
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    tables = [enc.get_input_embeddings().weight for enc in encoders]
    originals = [t.detach().clone() for t in tables]
    token_id = tokenizer.convert_tokens_to_ids(PROMPT_WORDS[4] + "</w>")
    keep = torch.ones(tables[0].shape[0], dtype=torch.bool, device=dev)
    keep[token_id] = False
    for t in tables:
        t.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": lora, "lr": 1e-4}, {"params": tables, "lr": 5e-3}], fused=False
    )
    unet.train()
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=dev, dtype=unet.dtype)
    return noise_scheduler, tables, originals, keep, optimizer, time_ids


def naive_refine(
    models: Models, plan: Plan, device: Device, images: Sequence[Any], flops: float
) -> dict[str, Any]:
    """The plain training loop of diffusers' TI and LoRA examples, at batch 1."""
    pipe, dev, caption = models.pipe, device.torch_device, NAIVE_CAPTION
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    unet, vae, times = pipe.unet, pipe.vae, dict[str, float]()
    noise_scheduler, tables, originals, keep, optimizer, time_ids = naive_training_setup(
        models, plan, device, times
    )

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
        restore_modules(unet, tables, originals, device)
    return {
        "setup_s": times["setup"],
        "warmup_s": times["warmup"],
        "steps_s": times["steps"],
        "steps": plan.naive_train_steps,
        "breakdown": training_breakdown(spans, times["steps"], plan.naive_train_steps, flops),
    }


def restore_modules(unet: Any, tables: list[Any], originals: list[Any], device: Device) -> None:
    """Leaves the modules as they were before `naive_refine`, for the library's path."""
    unet.unload_lora()
    unet.requires_grad_(False)
    unet.eval()
    with torch.no_grad():
        for table, original in zip(tables, originals, strict=True):
            table.requires_grad_(False)
            table.copy_(original)
    device.empty_cache()


# ------------------------------------------------------------- optional: the naive path, checked


def run_naive_check(
    models: Models, plan: Plan, device: Device, clock: Clock, naive: dict[str, Any]
) -> dict[str, Any]:
    """Is the naive path's generation as fast as shared/bench's reference measured it?

    The reference script passed precomputed prompt embeddings and called the pipeline under
    `torch.inference_mode`; the naive path encodes the prompt in every call, under the
    pipeline's own `no_grad`. Here both, in fp16 and in one process, on a few images at the
    plan's steps, and the UNet alone at batch 2 (one image with guidance) under each grad mode.
    A faster reference style flatters the naive path's generation and so the iteration
    speedup; `summary.iteration_speedup_reference_style_naive` is the speedup with it."""
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
