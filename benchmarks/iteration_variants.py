"""The optional parts of the iteration benchmark (`iteration.py`) that try settings which are off
by default: UNet variants, the identity's application, refiner batch sizes, a compiled refiner,
the refiner variants (CUDA graphs) and compiled generation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from iteration_library import fit_steps, library_config, make_generator, timed_refine
from iteration_setup import (
    PROMPT,
    Clock,
    Device,
    Models,
    Plan,
    breakdown,
    generation_spans,
    seeds_for,
    time_unet,
    unet_rate,
)

from consistent_char.refiners.ti_lora import CUDA_GRAPH_WARMUP_STEPS

# ------------------------------------------------------------------- optional: UNet variants


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
    out.update(
        compiled_generation(models, plan, device, clock, flops, peak, batch, eager_s_per_image)
    )
    return out


def compiled_generation(
    models: Models,
    plan: Plan,
    device: Device,
    clock: Clock,
    flops: float,
    peak: float,
    batch: int,
    eager_s_per_image: float,
) -> dict[str, Any]:
    """One generation batch through the library's generator on the compiled UNet, if the time
    left allows it: ``generation`` (a rate, or why it was skipped) and
    ``graphs_compiled_during_generation``."""
    pipe = models.pipe
    out: dict[str, Any] = {}
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
