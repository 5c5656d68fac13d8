"""Scoring a finished run on ToyWorld: its identity against the prompt without identity.

`evaluate_run` reads the run's config and final identity, rebuilds the run's generator, draws the
identity and the vanilla prompt in every scene with the same seeds, and scores both with the
identity probe (`consistent_char.eval.toy.score_records`). It also reads every iteration's images
with the probe (`consistent_char.eval.drift`): the validity of each iteration and the drift from
the character chosen at iteration 0 to the final identity. The result is written to the run's
``evaluation.json`` as well, and the run's report shows it.

Example:
    >>> from consistent_char.eval import evaluate_run
    >>> result = evaluate_run("runs/demo", seeds_per_scene=8)  # doctest: +SKIP
    >>> identity, vanilla = result["identity"], result["vanilla"]  # doctest: +SKIP
    >>> identity["identity_consistency"] - vanilla["identity_consistency"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consistent_char.config import TOY_MODEL, ExtractorConfig
from consistent_char.eval.drift import drift, image_validity, iteration_measures, min_validity
from consistent_char.eval.toy import Probe, render_identity_in_scenes, score_records
from consistent_char.identity import Identity
from consistent_char.rundir import RunDirectory, write_json_atomic
from consistent_char.toy.world import SCENES

__all__ = ["EVALUATION_FILE", "evaluate_run", "generator_from_config", "load_probe"]

logger = logging.getLogger(__name__)

#: Where `evaluate_run` writes its result inside the run directory (the report reads it).
EVALUATION_FILE = "evaluation.json"


def generator_from_config(
    config: ExtractorConfig,
    *,
    device: str | None = None,
    guidance_scale: float | None = None,
    pipeline: Any = None,
) -> Any:
    """The `SDXLGenerator` a run with `config` drew its images with (model and settings).

    Args:
        config: A run's config (``config.yaml``).
        device: Overrides the config's device (``"cpu"``, ``"cuda"``, ``"auto"``).
        guidance_scale: Overrides the config's classifier-free guidance scale.
        pipeline: An already loaded pipeline of ``config.model`` to wrap (shared, not copied)
            instead of loading the model again, e.g. to draw at several guidance scales;
            `device` is then the pipeline's own.
    """
    from consistent_char.generators.sdxl import SDXLGenerator
    from consistent_char.stages import resolve_device, resolve_dtype, resolve_model

    settings = config.generator.model_dump()
    if guidance_scale is not None:
        settings["guidance_scale"] = guidance_scale
    if device is not None or pipeline is not None:
        # The run's devices start with the run's device: on another one, draw there alone.
        settings["devices"] = None
    if pipeline is not None:
        return SDXLGenerator.from_pipeline(pipeline, **settings)
    dev = resolve_device(device or config.device)
    return SDXLGenerator.from_pretrained(
        resolve_model(config.model),
        device=dev,
        dtype=resolve_dtype(config.dtype, dev),
        **settings,
    )


def load_probe(probe: Probe | str | os.PathLike[str] | None = None) -> Probe:
    """A probe object as is, a probe folder loaded, or (``None``) ToyWorld's shipped probe."""
    if probe is not None and not isinstance(probe, str | os.PathLike):
        return probe
    from consistent_char import toy
    from consistent_char.toy.models import IdentityProbe

    return IdentityProbe.from_pretrained(toy.probe_dir() if probe is None else probe)


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    seeds_per_scene: int = 8,
    seed: int = 0,
    scenes: Sequence[str] = SCENES,
    probe: Probe | str | os.PathLike[str] | None = None,
    device: str | None = None,
    generator: Any = None,
    guidance_scale: float | None = None,
    vanilla: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Scores a finished run's identity and its vanilla prompt side by side on ToyWorld.

    Both are drawn with the same seeds in every scene; the identity with
    ``prompt_with_identity(identity, f"{prompt} {scene phrase}")``.

    Args:
        run_dir: A run directory written by `IterativeIdentityExtractor.extract` (finished).
        seeds_per_scene: Images per scene for each of the two.
        seed: Picks the evaluation images (`consistent_char.eval.toy.scene_seed`).
        scenes: ToyWorld scenes to draw in (default all five).
        probe: The identity probe: an object with ``predict``, a probe folder, or ``None`` for
            ToyWorld's shipped probe.
        device: Overrides the run's device.
        generator: A ready generator to use instead of rebuilding the run's (it must be the
            run's model for the numbers to mean anything).
        guidance_scale: Draw both at this guidance scale instead of the run's own. The loop
            may use a low scale to keep its images diverse, while a user draws the finished
            identity at the model's usual one (on ToyWorld the preset's loop uses 3; 7.5 is
            the paper's).
        vanilla: The vanilla score of an earlier call with the same prompt, generator, scenes,
            seeds and probe, to reuse instead of drawing it again (it depends on none of the
            run's own results).

    Returns:
        The run's ``run_dir``, ``prompt``, ``token``, ``model``, ``iterations``, ``converged``;
        what was drawn (``scenes``, ``seeds_per_scene``, ``seed``, ``guidance_scale``); the
        `score_records` results of ``identity`` and ``vanilla``, each with ``validity`` (the
        share of images the probe takes for ToyWorld's); ``per_iteration``
        (`consistent_char.eval.drift.iteration_measures`), ``min_validity``, ``drift``
        (`consistent_char.eval.drift.drift`) and ``seconds``. Also written to
        ``RUN_DIR/evaluation.json``.

    Raises:
        FileNotFoundError: `run_dir` is not a run directory, or the run has no final identity.
        RunLockedError: Another process is writing the run.
        ValueError: Both `generator` and `guidance_scale` are given, or `guidance_scale` is
            not a number > 0.
    """
    _check_guidance_scale(guidance_scale, generator)
    run = _finished_run(run_dir)
    # Held while reading the run and writing evaluation.json and the report into it: a run
    # another process is still writing is refused, not read half-way.
    with run.lock():
        drawing = _Drawing(list(scenes), seeds_per_scene, seed)
        return _evaluate(run, drawing, probe, device, generator, guidance_scale, vanilla)


@dataclass(frozen=True)
class _Drawing:
    """The evaluation images: every scene, `seeds_per_scene` seeds each, picked by `seed`."""

    scenes: list[str]
    seeds_per_scene: int
    seed: int


def _check_guidance_scale(guidance_scale: float | None, generator: Any) -> None:
    if guidance_scale is None:
        return
    if generator is not None:
        raise ValueError(
            "pass guidance_scale or a ready generator, not both: the generator's own "
            "guidance scale would be used"
        )
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, int | float)
        or not guidance_scale > 0
    ):
        raise ValueError(f"guidance_scale must be a number > 0, got {guidance_scale!r}")


def _finished_run(run_dir: str | os.PathLike[str]) -> RunDirectory:
    """The run in `run_dir`, checked before any model loads: a run with a final identity."""
    run = RunDirectory(run_dir)
    if not run.exists() or not run.config_path.is_file():
        raise FileNotFoundError(
            f"{run.root} is not a run directory: it needs state.json and config.yaml"
        )
    if not (run.identity_dir / "identity.json").is_file():
        raise FileNotFoundError(
            f"{run.root} has no final identity ({run.identity_dir}); finish the run first "
            "(consistent-char extract ... --resume)"
        )
    return run


def _evaluate(
    run: RunDirectory,
    drawing: _Drawing,
    probe: Probe | str | os.PathLike[str] | None,
    device: str | None,
    generator: Any,
    guidance_scale: float | None,
    vanilla: dict[str, Any] | None,
) -> dict[str, Any]:
    """`evaluate_run` on a checked run, holding its lock."""
    state = run.read_state()
    config = ExtractorConfig.from_file(run.config_path)
    identity = Identity.load(run.identity_dir)

    # 1. Load the models
    if probe is None and config.model != TOY_MODEL:
        logger.warning(
            "%s was run on %s, but the default probe reads ToyWorld images only; pass a probe "
            "trained for this model, or use consistent_char.eval.real",
            run.root,
            config.model,
        )
    scorer = load_probe(probe)
    if generator is None:
        generator = generator_from_config(config, device=device, guidance_scale=guidance_scale)

    # 2. Draw and score the identity, then the prompt without it, with the same seeds
    result: dict[str, Any] = {
        "run_dir": str(run.root),
        "prompt": state.prompt,
        "token": identity.token,
        "model": config.model,
        "iterations": len(state.history),
        "converged": bool(state.converged),
        "scenes": drawing.scenes,
        "seeds_per_scene": drawing.seeds_per_scene,
        "seed": drawing.seed,
        "guidance_scale": getattr(generator, "guidance_scale", None),
    }
    seconds: dict[str, float] = {}
    final_records: list[dict[str, str]] = []
    for name, which in (("identity", identity), ("vanilla", None)):
        if which is None and vanilla is not None:
            result[name] = vanilla
            continue
        t0 = time.perf_counter()
        result[name], records = _score(generator, which, state.prompt, drawing, scorer)
        if which is not None:
            final_records = records
        seconds[name] = time.perf_counter() - t0
        logger.info("%s: %s", name, result[name])

    # 3. What the loop kept: every iteration's images, and the final identity's
    t0 = time.perf_counter()
    _add_what_the_loop_kept(result, run, scorer, final_records)
    seconds["iterations"] = time.perf_counter() - t0
    result["seconds"] = seconds
    _save(run, result)
    return result


def _score(
    generator: Any, identity: Identity | None, prompt: str, drawing: _Drawing, probe: Probe
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Draws `prompt` (with `identity`, or plain) in every scene and scores what the probe
    reads; returns the score, with ``validity``, and the probe's records."""
    drawn = render_identity_in_scenes(
        generator, identity, prompt, drawing.scenes, drawing.seeds_per_scene, drawing.seed
    )
    images = [image for _, image in drawn]
    records = probe.predict(images)
    score = score_records(records, [s for s, _ in drawn], base_prompt=prompt)
    score["validity"] = image_validity(probe, images)
    return score, records


def _add_what_the_loop_kept(
    result: dict[str, Any], run: RunDirectory, probe: Probe, final_records: list[dict[str, str]]
) -> None:
    per_iteration = iteration_measures(run.root, probe)
    result["per_iteration"] = per_iteration
    result["min_validity"] = min_validity(per_iteration)
    result["drift"] = drift(per_iteration, final_records)


def _save(run: RunDirectory, result: dict[str, Any]) -> None:
    """Writes ``evaluation.json`` and rebuilds the run's report, which shows it."""
    write_json_atomic(run.root / EVALUATION_FILE, result)
    try:
        from consistent_char.report import build_report

        build_report(run.root)
    except Exception:  # the report is a by-product; the evaluation stands without it
        logger.warning("could not rebuild the report of %s", run.root, exc_info=True)
