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

The parts live in files by what they measure: ``iteration_setup.py`` (the plan, the models, the
clock and device, FLOPs), ``iteration_naive.py`` (the naive path and its check),
``iteration_library.py`` (the library path) and ``iteration_variants.py`` (the optional UNet,
identity and refiner variants and compiled generation); this file runs them and sums them up.

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
import json
import math
import os
import platform
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from iteration_library import run_library
from iteration_naive import (
    naive_refine,
    run_naive,
    run_naive_check,
)
from iteration_setup import (
    SCHEMA_VERSION,
    SDXL_UNET,
    TARGET_ITERATION_SPEEDUP,
    TARGET_UNET_FRACTION_OF_PEAK,
    TINY_UNET,
    Clock,
    Device,
    Models,
    Plan,
    build_models,
    make_plan,
    matmul_peak_tflops,
    parse_overrides,
    set_dtype,
    unet_flops_per_sample,
)
from iteration_variants import (
    ATTENTION_BACKENDS,
    REFINE_VARIANTS,
    VARIANTS,
    graphs_possible,
    run_compiled,
    run_refine_batches,
    run_refine_compiled,
    run_refine_variant,
    run_unet_variants,
)

from consistent_char.refiners.ti_lora import CUDA_GRAPH_WARMUP_STEPS

# What memory.py, refine_ops.py and the tests use as iteration.NAME.
__all__ = [
    "CUDA_GRAPH_WARMUP_STEPS",
    "Clock",
    "Device",
    "Models",
    "Plan",
    "REFINE_VARIANTS",
    "SDXL_UNET",
    "TINY_UNET",
    "build_models",
    "graphs_possible",
    "main",
    "make_plan",
    "naive_refine",
    "parse_args",
    "parse_overrides",
    "quiet_libraries",
    "set_dtype",
]


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
    variants = refine_variant_speedups(result, summary)
    if variants:
        summary["refine_variants"] = variants
    fractions = {}
    if lib and "unet" in lib:
        fractions["library_eager"] = lib["unet"]["fraction_of_matmul_peak"]
    if isinstance(gen, dict):
        fractions["library_compiled"] = gen["unet"]["fraction_of_matmul_peak"]
    summary["unet_fraction_of_peak"] = fractions
    summary["targets"] = targets(summary, variants, fractions)
    result["summary"] = summary


def refine_variant_speedups(result: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Each refiner variant swaps its refinement into the library iteration (and, when the
    compiled generation was measured, that generation too: they change different stages)."""
    lib, naive = result["paths"].get("library"), result["paths"].get("naive")
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
                compiled_iteration = summary["compiled_iteration_s_at_defaults"]
                both = iteration - lib["iteration_s_at_defaults"] + compiled_iteration
                entry["with_compiled_generation_speedup"] = naive["iteration_s_at_defaults"] / both
        variants[name] = entry
    return variants


def targets(
    summary: dict[str, Any], variants: dict[str, Any], fractions: dict[str, Any]
) -> dict[str, Any]:
    """The best of the library's configurations measured in this run against each target, and
    which one it was (the default path is `iteration_speedup`; the others turn on settings that
    are off by default)."""
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
    return {
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
    parts = Parts(result, clock, args.out)
    # 1. Environment and the card's matmul ceiling, 2. the models
    models, flops, peak_tflops = ceilings_and_models(parts, plan, device)
    if models is None:
        return finish(result, args, clock)
    # 3. The naive reference, then 4. the library's path (on the same modules)
    if args.skip_naive:
        result["skipped"].append({"part": "naive", "reason": "--skip-naive"})
    else:
        naive = parts.run(
            "naive", lambda: run_naive(models, plan, device, clock, flops, peak_tflops)
        )
        if naive is not None:
            result["paths"]["naive"] = naive
    library = parts.run(
        "library", lambda: run_library(models, plan, device, clock, flops, peak_tflops)
    )
    if library is not None:
        result["paths"]["library"] = library
    summarize(result)
    write_json(args.out, result)
    # 5. Optional parts, each only if its estimate (from what the library path measured) fits
    #    the budget.
    optional_parts(parts, args, models, plan, device, flops, peak_tflops, library)
    return finish(result, args, clock)


class Parts:
    """Runs the benchmark's parts: a part that fails is recorded in ``errors`` and the run goes
    on, and the result is written to ``--out`` after every part, so a run cut short keeps what
    it measured."""

    def __init__(self, result: dict[str, Any], clock: Clock, out: str | None) -> None:
        self.result, self.clock, self.out = result, clock, out
        #: Each optional part's estimated seconds (`optional_estimates`).
        self.estimates: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - a failed part is recorded, the run goes on
            self.clock.log(f"{name} FAILED: {err!r}")
            self.result["errors"].append(
                {
                    "part": name,
                    "error": repr(err)[:500],
                    "traceback": traceback.format_exc()[-3000:],
                }
            )
            return None
        finally:
            self.result["elapsed_s"] = self.clock.elapsed()
            self.result["timeline"] = self.clock.timeline
            write_json(self.out, self.result)

    def optional(self, name: str, fn: Callable[[], Any]) -> None:
        """Runs the part into ``result[name]`` if its estimate fits the time left."""
        if self.clock.allows(self.estimates[name]):
            self.result[name] = self.run(name, fn)
        else:
            self.result["skipped"].append({"part": name, "reason": "time budget"})
            self.clock.log(f"{name} skipped (time budget)")


def ceilings_and_models(
    parts: Parts, plan: Plan, device: Device
) -> tuple[Models | None, float, float]:
    """The environment, the card's matmul ceiling, the models and the UNet's FLOPs per sample;
    returns the models (``None`` when they could not be built), the FLOPs and the peak."""
    result, clock = parts.result, parts.clock
    result["environment"] = environment(device)
    clock.log(f"{plan.mode} run on {result['environment']['device_name']}")
    peak = parts.run("matmul_peak", lambda: matmul_peak_tflops(device)) or {"median_tflops": 0.0}
    result["matmul_peak"] = peak
    clock.log(f"matmul peak {peak['median_tflops']:.1f} TFLOP/s")

    models = parts.run("build", lambda: build_models(plan, device, clock))
    if models is None:
        return None, 0.0, 0.0
    result["models"] = {
        "build_s": models.build_s,
        "unet_params_m": models.unet_params_m,
        "vocab_size": models.vocab_size,
        "resolution": plan.resolution,
    }
    clock.log(f"models built in {models.build_s:.1f}s (UNet {models.unet_params_m:.0f}M params)")
    flops = (
        parts.run("unet_flops", lambda: unet_flops_per_sample(models.pipe, plan.resolution)) or 0.0
    )
    result["unet_flops_per_sample"] = flops
    result["unet_tflop_per_sample"] = flops / 1e12
    clock.log(f"UNet forward: {flops / 1e12:.3f} TFLOP per sample at {plan.resolution}px")
    # The ceiling again, on a card that has now been busy: the higher median is the peak that
    # every fraction below is taken against.
    again = parts.run("matmul_peak_again", lambda: matmul_peak_tflops(device)) or {
        "median_tflops": 0.0
    }
    result["matmul_peak_again"] = again
    peak_tflops = max(peak["median_tflops"], again["median_tflops"])
    result["matmul_peak_tflops"] = peak_tflops
    clock.log(f"matmul peak again {again['median_tflops']:.1f} TFLOP/s; using {peak_tflops:.1f}")
    return models, flops, peak_tflops


def optional_parts(
    parts: Parts,
    args: argparse.Namespace,
    models: Models,
    plan: Plan,
    device: Device,
    flops: float,
    peak_tflops: float,
    library: dict[str, Any] | None,
) -> None:
    """The optional parts, each only if its estimate fits the budget: refiner variants, the
    naive path checked against the reference's way of calling the pipeline, the UNet under
    candidate settings, training at batch 4, compiled training, regional compile."""
    result, clock = parts.result, parts.clock
    batch = (library or {}).get("unet", {}).get("max_batch") or 2
    est = optional_estimates(library, batch, plan, device, result["paths"].get("naive"))
    per_image = (library or {}).get("stages", {}).get("generation", {}).get("s_per_unit", 1.0)
    result["optional_estimates_s"] = parts.estimates = est
    # The refiner variants first: the most likely gain, and before unet_variants, whose fused
    # and unfused identity LoRA leaves the UNet's weights a rounding error away from the main
    # fit's, which each variant's identity is checked against.
    if args.refine_variants and library is not None:
        for name, settings in REFINE_VARIANTS.items():
            if settings.get("cuda_graphs") and not graphs_possible(device):
                result["skipped"].append({"part": name, "reason": "needs CUDA"})
                continue
            parts.optional(
                name,
                lambda name=name: run_refine_variant(models, plan, device, clock, library, name),
            )
    # After the refiner variants: its round trip through fp16 moves the weights by rounding.
    naive = result["paths"].get("naive")
    if args.naive_check and naive is not None:
        parts.optional("naive_check", lambda: run_naive_check(models, plan, device, clock, naive))
    if args.variants:
        identity = (library or {}).get("_identity")
        parts.optional(
            "unet_variants",
            lambda: run_unet_variants(
                models, plan, device, clock, flops, peak_tflops, batch, identity
            ),
        )
    if args.refine_batches and library is not None:
        parts.optional(
            "refine_batches", lambda: run_refine_batches(models, plan, device, clock, library)
        )
    if args.compile and library is not None:
        # Before run_compiled, which leaves the UNet channels_last with its blocks compiled.
        parts.optional(
            "refine_compiled", lambda: run_refine_compiled(models, plan, device, clock, library)
        )
    compiled_part(parts, args, models, plan, device, flops, peak_tflops, batch, per_image, est)


def compiled_part(
    parts: Parts,
    args: argparse.Namespace,
    models: Models,
    plan: Plan,
    device: Device,
    flops: float,
    peak_tflops: float,
    batch: int,
    per_image: float,
    est: dict[str, float],
) -> None:
    """Compiled generation (``--compile``), last: it leaves the UNet compiled."""
    result, clock = parts.result, parts.clock
    if not args.compile:
        result["skipped"].append({"part": "compile", "reason": "--no-compile"})
        return
    result["compiled"] = "started"  # what a run killed while compiling leaves behind
    write_json(args.out, result)
    if clock.allows(est["compile"]):
        result["compiled"] = parts.run(
            "compile",
            lambda: run_compiled(models, plan, device, clock, flops, peak_tflops, batch, per_image),
        )
        if isinstance(result.get("compiled"), dict) and isinstance(
            result["compiled"].get("generation"), str
        ):
            result["skipped"].append({"part": "compiled_generation", "reason": "time budget"})
    else:
        result["compiled"] = None
        result["skipped"].append({"part": "compile", "reason": "time budget"})
        clock.log("compile skipped (time budget)")


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
