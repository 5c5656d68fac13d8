"""The methods the benchmark compares, each producing an identity (or none) for a prompt.

All of them go through the same stages (one loaded generator, the same refiner class, the same
seeds), so they differ only in what the paper says they differ in:

==================  =====================================================================
``vanilla``         the prompt alone, no identity
``ti_single``       textual inversion (tokens only) on a single generated image
``lora_single``     LoRA DreamBooth (LoRA only, the token stays at its initial word) on it
``ti_lora_single``  tokens + LoRA (the loop's refiner) on that single image
``loop_1``          one iteration of the loop: generate N, cluster once, refine once
``loop``            the full loop (Algorithm 1) until convergence or ``max_iterations``
==================  =====================================================================

The single image is the loop's own first image (seed ``image_seed(seed, 0, 0)``), trained with
the loop's first refine seed and, unless told otherwise, the same number of steps as one refine
of the loop: ``*_single`` and ``loop_1`` then differ only in the training set (one image against
the most cohesive cluster). ``loop_1`` is read off the full loop's first iteration, which is the
same computation (the same seeds and stages), so it costs nothing extra.

Example:
    >>> stages = BenchmarkStages()  # doctest: +SKIP
    >>> config = ExtractorConfig.build({"model": "toy"})  # doctest: +SKIP
    >>> outcome = single_image_identity(stages, config, "a creature", "ti")  # doctest: +SKIP
    >>> full, first = loop_identities(stages, config, "a creature")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from consistent_char.config import ExtractorConfig
from consistent_char.extractor import IterativeIdentityExtractor, image_seed, stage_seed
from consistent_char.identity import Identity
from consistent_char.interfaces import Embedder

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "SINGLE_IMAGE_MODES",
    "BenchmarkStages",
    "cache_key",
    "MethodOutcome",
    "loop_identities",
    "single_image_identity",
]

METHODS: tuple[str, ...] = (
    "vanilla",
    "ti_single",
    "lora_single",
    "ti_lora_single",
    "loop_1",
    "loop",
)
METHOD_LABELS: dict[str, str] = {
    "vanilla": "vanilla (no identity)",
    "ti_single": "TI, single image",
    "lora_single": "LoRA DreamBooth, single image",
    "ti_lora_single": "TI + LoRA, single image",
    "loop_1": "loop, 1 iteration",
    "loop": "loop (full)",
}
#: The refiner mode each single-image method trains with.
SINGLE_IMAGE_MODES: dict[str, Literal["ti", "lora", "ti_lora"]] = {
    "ti_single": "ti",
    "lora_single": "lora",
    "ti_lora_single": "ti_lora",
}


@dataclass
class MethodOutcome:
    """What a method made: its identity (``None`` for vanilla), the loop iterations it ran
    (generation rounds; 0 for vanilla, 1 for the single-image methods), whether the loop
    converged (``None`` when the method has no loop) and the seconds it took; for a loop, the
    run directory it wrote (if any), and for a single-image method, that image."""

    identity: Identity | None
    iterations: int
    converged: bool | None
    seconds: float
    run_dir: str | None = None
    training_images: list[Image.Image] = field(default_factory=list)


class BenchmarkStages:
    """Loads each model once and builds, around the loaded models, the stages a config asks for.

    Configs that differ only in loop settings (N, K, d_min_c, template, refiner mode and steps,
    embedder kind) share the generator's pipeline and the embedders, so every method and
    ablation runs on the very same weights.

    Args:
        device: Overrides every config's device (``"cpu"``, ``"cuda"``, ``"auto"``).
    """

    def __init__(self, *, device: str | None = None) -> None:
        self.device = device
        self._generators: dict[str, Any] = {}
        self._embedders: dict[str, Embedder] = {}

    def generator(self, config: ExtractorConfig) -> Any:
        """The `SDXLGenerator` of `config`, loaded once per model and generator settings."""
        from consistent_char.eval.run import generator_from_config

        key = cache_key(config.model, config.dtype, config.generator.model_dump(mode="json"))
        if key not in self._generators:
            self._generators[key] = generator_from_config(config, device=self.device)
        return self._generators[key]

    def embedder(self, config: ExtractorConfig) -> Embedder:
        """The embedder of `config`, loaded once per kind and model."""
        from consistent_char.stages import (
            DEFAULT_EMBEDDER_MODELS,
            build_embedder,
            resolve_device,
            resolve_model,
        )

        e = config.embedder
        key = cache_key(e.kind, e.model, e.batch_size)
        if key not in self._embedders:
            model = e.model or DEFAULT_EMBEDDER_MODELS.get(e.kind, "")
            if e.kind != "pixels":
                model = resolve_model(model, kind="embedder")
            self._embedders[key] = build_embedder(
                e.kind,
                model,
                device=resolve_device(self.device or config.device),
                batch_size=e.batch_size,
            )
        return self._embedders[key]

    def refiner(
        self,
        config: ExtractorConfig,
        *,
        mode: Literal["ti", "lora", "ti_lora"] | None = None,
        steps: int | None = None,
    ) -> Any:
        """A `TextualInversionLoRARefiner` with every one of `config`'s refiner settings, on
        the shared pipeline (`mode` and `steps` replace the config's)."""
        from consistent_char.stages import build_refiner

        overrides: dict[str, Any] = {}
        if mode is not None:
            overrides["mode"] = mode
        if steps is not None:
            overrides["steps"] = steps
        return build_refiner(config.refiner, self.generator(config).pipeline, **overrides)

    def extractor(self, config: ExtractorConfig, refiner: Any = None) -> IterativeIdentityExtractor:
        """The loop of `config` on the shared models (`refiner` replaces the config's)."""
        from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
        from consistent_char.convergence import PairwiseDistanceCriterion

        c = config.convergence
        return IterativeIdentityExtractor(
            self.generator(config),
            self.embedder(config),
            FaissKMeansClusterer(niter=config.clusterer.niter, nredo=config.clusterer.nredo),
            refiner if refiner is not None else self.refiner(config),
            PairwiseDistanceCriterion(d_conv=c.d_conv, d_conv_relative=c.d_conv_relative),
            config=config,
        )


def single_image_identity(
    stages: BenchmarkStages,
    config: ExtractorConfig,
    prompt: str,
    mode: Literal["ti", "lora", "ti_lora"],
    *,
    steps: int | None = None,
) -> MethodOutcome:
    """Trains an identity on one image generated from `prompt` (the loop's first image).

    Args:
        stages: Where the models come from.
        config: The loop's config: seed, refiner settings and identity prompt template.
        prompt: The vague prompt, e.g. ``"a creature"``.
        mode: ``"ti"`` (textual inversion), ``"lora"`` (LoRA DreamBooth) or ``"ti_lora"``.
        steps: Training steps (default: ``config.refiner.steps``, one refine of the loop).
    """
    prompt = " ".join(prompt.split())
    t0 = time.perf_counter()
    image = stages.generator(config).generate([prompt], [image_seed(config.seed, 0, 0)])[0]
    refiner = stages.refiner(config, mode=mode, steps=steps)
    caption = config.identity_prompt_template.format(token=config.refiner.token, prompt=prompt)
    identity = refiner.refine(
        None, [image.convert("RGB")], [caption], seed=stage_seed(config.seed, 0, "refine")
    )
    seconds = time.perf_counter() - t0
    # Drawn later with the same template as the loop's identities.
    identity.metadata["identity_prompt_template"] = config.identity_prompt_template
    identity.metadata["prompt"] = prompt
    return MethodOutcome(
        identity, iterations=1, converged=None, seconds=seconds, training_images=[image]
    )


def loop_identities(
    stages: BenchmarkStages,
    config: ExtractorConfig,
    prompt: str,
    *,
    run_dir: str | os.PathLike[str] | None = None,
) -> tuple[MethodOutcome, MethodOutcome]:
    """Runs the full loop once and returns ``(loop, loop_1)``: its final identity, and the
    identity after its first refine with the seconds of that first iteration.

    With `run_dir`, the loop writes its run there (so its iterations can be read afterwards);
    a run already there is resumed, and a finished one is read back without running again
    (its identity after the first refine is then read from ``iter_000/identity``).
    """
    recorder = _RecordingRefiner(stages.refiner(config))
    t0 = time.perf_counter()
    resume = run_dir is not None and (Path(run_dir) / "state.json").is_file()
    result = stages.extractor(config, refiner=recorder).extract(
        prompt, run_dir=run_dir, resume=resume
    )
    seconds = time.perf_counter() - t0
    full = MethodOutcome(
        result.identity,
        result.iterations,
        result.converged,
        seconds,
        run_dir=None if run_dir is None else str(run_dir),
    )
    if not recorder.identities and run_dir is not None:
        recorder.identities.append(Identity.load(Path(run_dir) / "iter_000" / "identity"))
    first = recorder.identities[0]
    first.metadata.setdefault("identity_prompt_template", config.identity_prompt_template)
    one = MethodOutcome(
        first,
        iterations=1,
        converged=False,
        seconds=float(sum(result.history[0].seconds.values())),
        run_dir=full.run_dir,
    )
    return full, one


class _RecordingRefiner:
    """Forwards to a refiner and keeps every identity it returns (the loop's Θ_0, Θ_1, ...)."""

    def __init__(self, refiner: Any) -> None:
        self.refiner = refiner
        self.identities: list[Identity] = []

    def refine(
        self,
        identity: Identity | None,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        *,
        seed: int,
        callback: Callable[[int, int, float], None] | None = None,
    ) -> Identity:
        kwargs = {} if callback is None else {"callback": callback}
        new: Identity = self.refiner.refine(identity, images, captions, seed=seed, **kwargs)
        self.identities.append(new)
        return new


def cache_key(*parts: Any) -> str:
    """One string for JSON-able `parts`, equal exactly when they are: what a model or a run is
    cached and shared under."""
    return json.dumps(parts, sort_keys=True, default=str)
