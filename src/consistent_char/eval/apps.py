"""``consistent-char eval toy-apps``: the paper's applications of a found identity, in ToyWorld.

1. The identity: an existing one (``--identity``), or the one `extract` finds for
   ``"a creature"`` on the toy model (`extraction_overrides`: refined through the pose
   ControlNet unless drawn the paper's way, and the ``--set`` overrides), in ``OUT/run``
   (resumed if cut).
2. Its **reference** attributes: each probe's majority reading of the identity drawn plainly
   in every scene.
3. **Local editing** (`consistent_char.eval.local_edit`): the identity edited into the
   creature's region of ToyWorld scene images, with blended latents.
4. **Pose control** (`consistent_char.eval.pose_control`): the identity drawn through ToyWorld's
   pose ControlNet, against plain prompting and against drawing without the ControlNet. With
   ``lora_scale="auto"`` the identity's LoRA scale is first chosen by
   `consistent_char.control.choose_lora_scale` on calibration poses the evaluation does not
   draw, read by ToyWorld's pose annotator.
5. ``results.json``, ``results.md`` and two picture sheets (``edit_sheet.png``,
   ``pose_sheet.png``).

Targets (the applications' bar): identity kept ≥ 0.9 in both applications, pixels outside the
edit mask unchanged ≥ 0.99, control followed ≥ 0.9.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from consistent_char.identity import Identity

__all__ = [
    "PAPER_RECIPE",
    "TARGETS",
    "AppsSettings",
    "apps_settings",
    "apps_table",
    "extraction_overrides",
    "run_toy_apps",
]

#: The bar each figure must reach (the plain-prompting baselines have none: they show the
#: distance the identity makes).
TARGETS: dict[str, float] = {
    "local_edit.identity_kept": 0.9,
    "local_edit.outside_unchanged": 0.99,
    "pose_control.identity_kept": 0.9,
    "pose_control.control_followed": 0.9,
}
DEFAULT_PROMPT = "a creature"


@dataclass(frozen=True)
class AppsSettings:
    """How much each application draws, and how pose control draws the identity.

    The drawing defaults are the schedule that keeps both the pose and the look in ToyWorld
    (docs/applications.md): the identity's LoRA for the first 85% of the steps and in the
    ControlNet, then the ControlNet alone at twice its scale, at a LoRA scale chosen per
    identity; the identity is learned through the pose ControlNet. `PAPER_RECIPE` is the
    paper's way.
    """

    name: str
    edits_per_scene: int
    poses: int
    images_per_pose: int
    reference_per_scene: int
    seed: int = 0
    control_scale: float = 1.0
    #: `consistent_char.control.ControlledGenerator`'s ``identity_until`` and the identity's
    #: LoRA scale, for pose control.
    identity_until: float = 0.85
    #: A scale, or ``"auto"``: chosen per identity on `calibration_poses` poses.
    lora_scale: float | str = "auto"
    identity_in_controlnet: bool = True
    #: The ControlNet's scale after ``identity_until`` (None: ``control_scale``).
    late_control_scale: float | None = 2.0
    #: Extract the identity (when none is given) with its refiner through ToyWorld's pose
    #: ControlNet (`extraction_overrides`).
    refine_through_controlnet: bool = True
    #: How many calibration poses (each drawn `images_per_pose` times) choose an ``"auto"``
    #: LoRA scale.
    calibration_poses: int = 6

    def __post_init__(self) -> None:
        if isinstance(self.lora_scale, str) and self.lora_scale != "auto":
            raise ValueError(f"lora_scale must be a number or 'auto', got {self.lora_scale!r}")


#: The paper's way to pose an identity: learned by the plain refiner, drawn with its LoRA at its
#: own scale in every step, in the UNet only (`AppsSettings` fields; ``eval toy-apps --paper``).
PAPER_RECIPE: dict[str, Any] = {
    "identity_until": 1.0,
    "identity_in_controlnet": False,
    "late_control_scale": None,
    "lora_scale": 1.0,
    "refine_through_controlnet": False,
}


def apps_settings(
    quick: bool, seed: int = 0, *, paper: bool = False, **drawing: Any
) -> AppsSettings:
    """The full measurement, or the quick one (the same path, fewer images).

    Args:
        quick: Fewer images.
        seed: Picks the scenes, poses and seeds.
        paper: Start from `PAPER_RECIPE` instead of `AppsSettings`' defaults.
        drawing: ``control_scale``, ``identity_until``, ``lora_scale``,
            ``identity_in_controlnet``, ``late_control_scale``; each one not None replaces the
            default. A late scale that is not given is dropped when the identity acts in
            every step (``identity_until`` 1), where it would mean nothing.
    """
    given = {k: v for k, v in drawing.items() if v is not None}
    chosen = {**(PAPER_RECIPE if paper else {}), **given}
    until = chosen.get("identity_until", AppsSettings.identity_until)
    if until >= 1.0 and "late_control_scale" not in given:
        chosen["late_control_scale"] = None
    if quick:
        return AppsSettings("quick", 2, 5, 2, 2, seed, **chosen, calibration_poses=2)
    return AppsSettings("full", 8, 20, 4, 8, seed, **chosen, calibration_poses=6)


def extraction_overrides(settings: AppsSettings, overrides: dict[str, Any]) -> dict[str, Any]:
    """The loop settings the identity is extracted with: `overrides`, after
    `consistent_char.toy.pose.REFINE_THROUGH_CONTROLNET` where
    ``settings.refine_through_controlnet`` (an identity learned only from upright, centred
    creatures pulls posed ones back to that pose), unless `overrides` set the refiner's own
    ControlNet or annotator."""
    from consistent_char.toy.pose import REFINE_THROUGH_CONTROLNET

    through = {f"refiner.{k}": v for k, v in REFINE_THROUGH_CONTROLNET.items()}
    if not settings.refine_through_controlnet or any(k in overrides for k in through):
        return dict(overrides)
    return {**through, **overrides}


def run_toy_apps(
    settings: AppsSettings,
    out: Path,
    *,
    identity_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the five steps above into `out` and returns the results; `overrides` (dotted
    loop settings) configure the extraction when no `identity_dir` is given."""
    import consistent_char.toy as toy
    from consistent_char.eval.local_edit import score_local_edit
    from consistent_char.eval.toy import render_identity_in_scenes
    from consistent_char.toy.evaluate import majority_identity
    from consistent_char.toy.probe import IdentityProbe

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # 1. The identity, and a generator on the toy model with the run's settings
    overrides = dict(overrides or {})
    if identity_dir is None:
        overrides = extraction_overrides(settings, overrides)
    identity, generator, prompt = _identity(out, identity_dir, overrides, device, say)
    probe = IdentityProbe.from_pretrained(toy.probe_dir())
    pose_probe = IdentityProbe.from_pretrained(toy.pose_probe_dir())
    # 2. Its reference attributes, as each probe reads its plain images
    plain = render_identity_in_scenes(
        generator, identity, prompt, seeds_per_scene=settings.reference_per_scene, seed=1
    )
    images = [im for _, im in plain]
    references = {
        "identity_probe": majority_identity(probe.predict(images)),
        "pose_probe": majority_identity(pose_probe.predict(images)),
    }
    say(f"identity {identity.token}: {references['identity_probe']}")
    # 3. Local editing
    local_edit = score_local_edit(
        generator,
        identity,
        probe,
        prompt,
        per_scene=settings.edits_per_scene,
        seed=settings.seed,
        reference=references["identity_probe"],
    )
    say(
        f"local edit: identity kept {local_edit['identity_kept']:.3f} (plain prompt "
        f"{local_edit['baseline']['identity_kept']:.3f}), outside unchanged "
        f"{local_edit['outside_unchanged']:.4f}"
    )
    # 4. Pose control
    pose, drawn = _pose_control(generator, identity, pose_probe, references, prompt, settings)
    with_both = pose["controlnet"]["identity"]
    say(
        f"pose control: control followed {with_both['control_followed']:.3f}, identity kept "
        f"{with_both['identity_kept']:.3f}"
    )
    # 5. Results and pictures
    _edit_sheet(generator, identity, prompt, settings.seed).save(out / "edit_sheet.png")
    _pose_sheet(drawn, settings).save(out / "pose_sheet.png")
    results = {
        "settings": {**asdict(settings), "overrides": overrides},
        "identity": {
            "token": identity.token,
            "prompt": prompt,
            "reference": references,
            # An identity from a loop that stopped before its images agreed keeps a weaker
            # look; the figures are read with this in view.
            "converged": identity.metadata.get("converged"),
        },
        "local_edit": local_edit,
        "pose_control": pose,
        "targets": _targets(local_edit, pose),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return results


def _pose_control(
    generator: Any,
    identity: Identity,
    probe: Any,
    references: dict[str, dict[str, str]],
    prompt: str,
    settings: AppsSettings,
) -> tuple[dict[str, Any], dict[str, list[Image.Image]]]:
    """The pose-control section, through ToyWorld's pose ControlNet on the same pipeline."""
    from consistent_char.control import ControlledGenerator, load_controlnet
    from consistent_char.eval.pose_control import score_pose_control

    controlnet = load_controlnet("toy", device=generator.pipeline.device)
    auto = settings.lora_scale == "auto"
    controlled = ControlledGenerator(
        generator.pipeline,
        controlnet,
        control_scale=settings.control_scale,
        identity_until=settings.identity_until,
        identity_in_controlnet=settings.identity_in_controlnet,
        late_control_scale=settings.late_control_scale,
        **{**generator.settings.model_dump(), "lora_scale": 1.0 if auto else settings.lora_scale},
    )
    choice = _choose_lora_scale(controlled, identity, prompt, settings) if auto else None
    section, drawn = score_pose_control(
        generator,
        controlled,
        identity,
        probe,
        references["pose_probe"],
        prompt,
        poses=settings.poses,
        per_pose=settings.images_per_pose,
        seed=settings.seed,
    )
    section["lora_scale"] = controlled.lora_scale
    if choice is not None:
        section["lora_scale_choice"] = choice
    return section, drawn


def _choose_lora_scale(
    controlled: Any, identity: Identity, prompt: str, settings: AppsSettings
) -> dict[str, Any]:
    """Sets `controlled`'s LoRA scale by `choose_lora_scale` on calibration poses, and returns
    the choice for ``results.json``."""
    from consistent_char.control import choose_lora_scale
    from consistent_char.eval.pose_control import pose_jobs
    from consistent_char.toy.pose import annotate, pose_map

    jobs = pose_jobs(
        settings.calibration_poses, settings.images_per_pose, settings.seed, calibration=True
    )
    choice = choose_lora_scale(
        controlled,
        identity,
        [j.prompt(prompt, None) for j in jobs],
        [j.seed for j in jobs],
        [pose_map(j.pose) for j in jobs],
        annotate,
    )
    controlled.lora_scale = choice.scale
    return {
        "scale": choice.scale,
        "errors": {f"{s:g}": e for s, e in choice.errors.items()},
        "plain_error": choice.plain_error,
        "bound": choice.bound,
        "calibration_images": len(jobs),
    }


def _identity(
    out: Path,
    identity_dir: Path | None,
    overrides: dict[str, Any],
    device: str,
    say: Callable[[str], None],
) -> tuple[Identity, Any, str]:
    """The identity to measure, its base prompt and a generator on the toy model."""
    from consistent_char.config import TOY_MODEL, ExtractorConfig
    from consistent_char.extractor import IterativeIdentityExtractor
    from consistent_char.usage import identity_generator

    if identity_dir is not None:
        identity = Identity.load(identity_dir)
        prompt = str(identity.metadata.get("prompt") or DEFAULT_PROMPT)
        generator = identity_generator(identity, model=TOY_MODEL, device=device)
        return identity, generator, prompt
    config = ExtractorConfig.from_overrides(overrides, {"model": TOY_MODEL, "device": device})
    run = out / "run"
    resume = (run / "state.json").is_file()
    say(f"extracting {DEFAULT_PROMPT!r} on the toy model into {run}" + (" (resumed)" * resume))
    extractor = IterativeIdentityExtractor.from_config(config)
    result = extractor.extract(DEFAULT_PROMPT, run_dir=run, resume=resume)
    say(f"identity after {result.iterations} iterations ({result.stop_reason})")
    return result.identity, extractor.generator, DEFAULT_PROMPT


def _targets(local_edit: dict[str, Any], pose: dict[str, Any]) -> dict[str, Any]:
    """Each figure with its bar and whether it is met."""
    figures = {
        "local_edit.identity_kept": local_edit["identity_kept"],
        "local_edit.outside_unchanged": local_edit["outside_unchanged"],
        "pose_control.identity_kept": pose["controlnet"]["identity"]["identity_kept"],
        "pose_control.control_followed": pose["controlnet"]["identity"]["control_followed"],
    }
    return {
        name: {"value": value, "target": TARGETS[name], "met": bool(value >= TARGETS[name])}
        for name, value in figures.items()
    }


def _edit_sheet(generator: Any, identity: Identity, prompt: str, seed: int) -> Image.Image:
    """Three scenes (rows): the input, the edit region and the identity edited into it."""
    import numpy as np

    from consistent_char.eval.local_edit import edit_cases, edit_cases_with

    cases = edit_cases(("forest", "beach", "snow"), per_scene=1, seed=seed)
    edited = edit_cases_with(generator, cases, identity, prompt)
    rows = [
        np.concatenate([np.asarray(c.image), np.asarray(c.mask.convert("RGB")), np.asarray(e)], 1)
        for c, e in zip(cases, edited, strict=True)
    ]
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    return sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST)


def _pose_sheet(drawn: dict[str, list[Image.Image]], settings: AppsSettings) -> Image.Image:
    """Five poses (columns): the pose map, the identity with the ControlNet, plain prompting
    with it, and the identity without it (rows)."""
    from consistent_char.eval.pose_control import pose_jobs
    from consistent_char.toy.pose import pose_map

    jobs = pose_jobs(settings.poses, settings.images_per_pose, settings.seed)
    columns = [k * settings.images_per_pose for k in range(min(5, settings.poses))]
    rows = [
        [pose_map(jobs[c].pose) for c in columns],
        [drawn["controlnet/identity"][c] for c in columns],
        [drawn["controlnet/plain_prompt"][c] for c in columns],
        [drawn["no_controlnet/identity"][c] for c in columns],
    ]
    size = rows[1][0].size[0]
    sheet = Image.new("RGB", (size * len(columns), size * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((size, size)), (c * size, r * size))
    return sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST)


def apps_table(results: dict[str, Any]) -> str:
    """``results.md``: both applications' figures, and the targets."""
    edit, pose = results["local_edit"], results["pose_control"]
    lines = [
        "# ToyWorld applications",
        "",
        f"Identity `{results['identity']['token']}` from {results['identity']['prompt']!r}"
        f"{_converged(results['identity'].get('converged'))}; "
        f"preset {results['settings']['name']}, control scale "
        f"{results['settings']['control_scale']:g}, identity's LoRA at "
        f"{_lora_scale(results)} for the first "
        f"{results['settings'].get('identity_until', 1.0):.0%} of the steps"
        f"{' and in the ControlNet' * bool(results['settings'].get('identity_in_controlnet'))}"
        f"{_late_control(results['settings'])}, {results['seconds']:.0f} s.",
        "",
        "## Local editing (blended latents)",
        "",
        "| scene | identity kept | outside unchanged | plain prompt: identity kept |",
        "|---|---|---|---|",
    ]
    for scene, row in edit["per_scene"].items():
        base = edit.get("baseline", {}).get("per_scene", {}).get(scene, {})
        lines.append(
            f"| {scene} | {row['identity_kept']:.3f} | {row['outside_unchanged']:.4f} | "
            f"{base.get('identity_kept', float('nan')):.3f} |"
        )
    lines += [
        "",
        "## Pose control",
        "",
        "| drawn with | control followed | identity kept | x, feet, scale, tilt followed alone |",
        "|---|---|---|---|",
    ]
    for way in ("controlnet", "no_controlnet"):
        for who in ("identity", "plain_prompt"):
            row = pose[way][who]
            with_or_not = "with" if way == "controlnet" else "without"
            label = f"{who.replace('_', ' ')}, {with_or_not} ControlNet"
            alone = ", ".join(f"{v:.2f}" for v in row["fields_followed"].values())
            lines.append(
                f"| {label} | {row['control_followed']:.3f} | {row['identity_kept']:.3f} | "
                f"{alone} |"
            )
    lines += ["", "## Targets", "", "| figure | value | target | met |", "|---|---|---|---|"]
    for name, t in results["targets"].items():
        lines.append(
            f"| {name} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _converged(converged: bool | None) -> str:
    """How the identity's loop ended, for ``results.md``."""
    if converged is None:
        return ""
    return " (its loop converged)" if converged else " (its loop stopped before converging)"


def _late_control(settings: dict[str, Any]) -> str:
    late = settings.get("late_control_scale")
    return "" if late is None else f", then the ControlNet at {late:g}"


def _lora_scale(results: dict[str, Any]) -> str:
    choice = results["pose_control"].get("lora_scale_choice")
    if choice is None:
        return f"{results['settings'].get('lora_scale', 1.0):g}"
    return (
        f"{choice['scale']:g} (chosen on {choice['calibration_images']} calibration images: "
        f"pose-map error {_errors(choice)} against {choice['plain_error']:.4f} for the prompt "
        "alone)"
    )


def _errors(choice: dict[str, Any]) -> str:
    return ", ".join(f"{e:.4f} at {s}" for s, e in choice["errors"].items())
