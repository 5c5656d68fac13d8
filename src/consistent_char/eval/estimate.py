"""How long the ToyWorld benchmark will take: the seconds of its units of work, measured on this
machine (`measure_unit_costs`), multiplied out over what the settings run (`estimate_seconds`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from consistent_char.config import ExtractorConfig
from consistent_char.eval.methods import BenchmarkStages
from consistent_char.eval.presets import ToyBenchmarkSettings
from consistent_char.eval.run import load_probe
from consistent_char.eval.toy import Probe

__all__ = ["UnitCosts", "estimate_seconds", "measure_unit_costs"]


@dataclass
class UnitCosts:
    """Measured seconds of the benchmark's units of work, on one machine.

    Attributes:
        gen_image_step: One image, one denoising step (with the config's guidance).
        gen_image_step_identity: The same with an identity applied (its LoRA adds work).
        refine_step: One refiner step at the config's batch size.
        refine_call: The fixed cost of one refine call (encoding the images, set-up).
        embed_image: Embedding one image.
        probe_image: The probe reading one image.
        startup: Loading the models and the first (warm-up) generation.
        torch_threads: ``torch.get_num_threads()`` when measured.
    """

    gen_image_step: float
    gen_image_step_identity: float
    refine_step: float
    refine_call: float
    embed_image: float
    probe_image: float
    startup: float = 0.0
    torch_threads: int = 1


def measure_unit_costs(
    settings: ToyBenchmarkSettings,
    *,
    probe: Probe | str | os.PathLike[str] | None = None,
    device: str | None = None,
    n_images: int = 8,
    refine_steps: tuple[int, int] = (2, 6),
) -> UnitCosts:
    """Times small pieces of the benchmark's work (a few seconds to a minute on a CPU).

    Generation is timed on `n_images` images at the config's denoising steps; the refiner at two
    step counts, whose difference gives the cost per step and the rest the cost per call.
    """
    config = settings.config()
    stages = BenchmarkStages(device=device)
    t0 = time.perf_counter()
    generator = stages.generator(config)
    prompts = [settings.prompts[0]] * n_images
    seeds = list(range(n_images))
    generator.generate(prompts[:1], seeds[:1])  # warm-up: first-call allocations
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = generator.generate(prompts, seeds)
    gen = (time.perf_counter() - t0) / (n_images * generator.num_inference_steps)
    t0 = time.perf_counter()
    embedder = stages.embedder(config)
    scorer = load_probe(probe)
    startup += time.perf_counter() - t0
    t0 = time.perf_counter()
    embedder.embed(images)
    embed = (time.perf_counter() - t0) / n_images
    t0 = time.perf_counter()
    scorer.predict(images)
    probe_s = (time.perf_counter() - t0) / n_images
    caption = config.identity_prompt_template.format(
        token=config.refiner.token, prompt=settings.prompts[0]
    )
    timings = []
    for steps in refine_steps:
        refiner = stages.refiner(config, steps=steps)
        t0 = time.perf_counter()
        identity = refiner.refine(None, images, [caption] * len(images), seed=0)
        timings.append(time.perf_counter() - t0)
    (s1, t1), (s2, t2) = zip(refine_steps, timings, strict=True)
    per_step = max((t2 - t1) / (s2 - s1), 0.0)
    t0 = time.perf_counter()
    generator.generate([caption] * n_images, seeds, identity)
    gen_identity = (time.perf_counter() - t0) / (n_images * generator.num_inference_steps)
    return UnitCosts(
        gen_image_step=gen,
        gen_image_step_identity=gen_identity,
        refine_step=per_step,
        refine_call=max(t1 - per_step * s1, 0.0),
        embed_image=embed,
        probe_image=probe_s,
        startup=startup,
        torch_threads=torch.get_num_threads(),
    )


def estimate_seconds(settings: ToyBenchmarkSettings, costs: UnitCosts) -> dict[str, Any]:
    """An upper bound on the benchmark's run time from measured unit costs.

    Every loop is counted at ``max_iterations`` refines (a loop that converges earlier costs
    less); ``loop_1`` costs only its scoring (it is read off the full loop).

    Returns:
        ``{"startup": seconds, "methods": {method: seconds over all prompts}, "ablations":
        seconds, "total": seconds}``.
    """

    def gen(config: ExtractorConfig, n: int, identity: bool = True) -> float:
        per_step = costs.gen_image_step_identity if identity else costs.gen_image_step
        return n * config.generator.num_inference_steps * per_step

    def refine(steps: int) -> float:
        return costs.refine_call + steps * costs.refine_step

    def evaluate(config: ExtractorConfig, identity: bool = True) -> float:
        n = len(settings.scenes) * settings.seeds_per_scene
        return gen(config, n, identity) + n * costs.probe_image

    def loop(config: ExtractorConfig) -> float:
        n = config.num_images
        iterations = config.max_iterations * (n * costs.embed_image + refine(config.refiner.steps))
        # Iteration 0 draws the plain prompt; every later one draws with the identity.
        drawing = gen(config, n, False) + (config.max_iterations - 1) * gen(config, n)
        return iterations + drawing + evaluate(config)

    base = settings.config()
    single_steps = settings.single_image_steps or base.refiner.steps
    single = gen(base, 1, False) + refine(single_steps) + evaluate(base)
    per_prompt = {
        "vanilla": evaluate(base, False),
        "ti_single": single,
        "lora_single": single,
        "ti_lora_single": single,
        # Read off the full loop when it runs; else a loop of one iteration.
        "loop_1": evaluate(base)
        if "loop" in settings.methods
        else loop(settings.config({"max_iterations": 1})),
        "loop": loop(base),
    }
    methods = {m: per_prompt[m] * len(settings.prompts) for m in settings.methods}
    ablations = 0.0
    for group in settings.ablations:
        for overrides in list(settings.ablation_variants(group).values())[1:]:
            ablations += loop(settings.config(overrides)) * len(settings.ablation_prompts)
    if settings.ablations:
        # Each group's baseline is the plain loop, already run for the main prompts.
        ran = settings.prompts if "loop" in settings.methods else []
        ablations += loop(base) * len([p for p in settings.ablation_prompts if p not in ran])
    total = costs.startup + sum(methods.values()) + ablations
    return {"startup": costs.startup, "methods": methods, "ablations": ablations, "total": total}
