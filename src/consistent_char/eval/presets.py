"""What the ToyWorld benchmark runs: `ToyBenchmarkSettings`, its three presets and the names of
the ablations.

`full_settings` is the benchmark, `quick_settings` the same path reduced to a few minutes on a
2-core CPU (`reductions` names what was reduced) and `minimal_settings` seconds on tiny models,
for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from consistent_char.config import ExtractorConfig, toy_preset
from consistent_char.eval.methods import METHODS
from consistent_char.toy.world import SCENES

__all__ = [
    "ABLATION_GROUPS",
    "FULL_PROMPTS",
    "PRESETS",
    "ToyBenchmarkSettings",
    "ablation_label",
    "full_settings",
    "minimal_settings",
    "quick_settings",
    "reductions",
]

#: The vague prompts of the full benchmark: different subsets of the identity attributes.
FULL_PROMPTS: tuple[str, ...] = (
    "a creature",
    "a red creature",
    "a round creature",
    "a creature wearing a hat",
    "a creature with big eyes",
    "a blue creature wearing a crown",
)
ABLATION_GROUPS: tuple[str, ...] = ("embedder", "K", "d_min_c", "core_size", "template", "refiner")


def ablation_label(group: str, config: ExtractorConfig) -> str:
    """How a variant of an ablation group is named, read from its resolved config (so a label
    stays true when other settings change): ``"pixels"``, ``"K=2 (d_size_c=16)"``, ..."""
    if group == "embedder":
        return config.embedder.kind
    if group == "K":
        return f"K={config.num_clusters} (d_size_c={config.d_size_c})"
    if group == "d_min_c":
        return f"d_min_c={config.d_min_c}"
    if group == "core_size":
        return f"core_size={config.core_size}"
    if group == "template":
        return config.identity_prompt_template
    if group == "refiner":
        return config.refiner.mode
    raise ValueError(f"unknown ablation group {group!r}; known: {', '.join(ABLATION_GROUPS)}")


@dataclass
class ToyBenchmarkSettings:
    """What the benchmark runs. Plain data: saved in ``results.json`` and compared on resume.

    Attributes:
        name: ``"full"``, ``"quick"``, ``"minimal"`` or ``"custom"``.
        prompts: The vague prompts every method runs on.
        methods: Which of `METHODS` to run.
        scenes: Scenes each identity is drawn in.
        seeds_per_scene: Evaluation images per scene and identity.
        seed: The loop's seed (config ``seed``) and the evaluation images' seed.
        overrides: Dotted config overrides on top of ToyWorld's preset (`toy_preset`).
        single_image_steps: Training steps of the single-image methods (``None``: the loop's
            ``refiner.steps``, one refine).
        ablations: ``{group: [overrides, ...]}``: each variant is the full loop with its
            overrides on top of `overrides`; each group's baseline is the plain loop. Variants
            are named from their resolved config (`ablation_label`).
        ablation_prompts: The prompts the ablations run on.
    """

    name: str
    prompts: list[str]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    scenes: list[str] = field(default_factory=lambda: list(SCENES))
    seeds_per_scene: int = 4
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    single_image_steps: int | None = None
    ablations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ablation_prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        if not self.prompts:
            raise ValueError("prompts is empty: the benchmark needs at least one prompt")
        if self.seeds_per_scene < 1:
            raise ValueError(f"seeds_per_scene must be at least 1, got {self.seeds_per_scene}")
        if len(set(self.scenes)) < 2:
            raise ValueError(f"need at least 2 distinct scenes, got {self.scenes}")
        unknown = [g for g in self.ablations if g not in ABLATION_GROUPS]
        if unknown:
            raise ValueError(f"unknown ablation groups {unknown}; known: {ABLATION_GROUPS}")
        # An impossible setting fails here, before anything loads.
        self.config()
        for variants in self.ablations.values():
            for overrides in variants:
                self.config(overrides)

    def ablation_variants(self, group: str) -> dict[str, dict[str, Any]]:
        """``{label: overrides}`` of a group, its baseline (the plain loop, ``{}``) first;
        a variant that resolves to the baseline's config is dropped."""
        out: dict[str, dict[str, Any]] = {ablation_label(group, self.config()): {}}
        for overrides in self.ablations.get(group, []):
            out.setdefault(ablation_label(group, self.config(overrides)), overrides)
        return out

    def config(self, extra: dict[str, Any] | None = None) -> ExtractorConfig:
        """The loop's config: ToyWorld's preset, then `overrides`, then `extra`."""
        return ExtractorConfig.from_overrides(
            {**self.overrides, "seed": self.seed, **(extra or {})}, base=toy_preset()
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> ToyBenchmarkSettings:
        """A copy with more config overrides (e.g. another model), validated."""
        return replace(self, overrides={**self.overrides, **overrides})


def full_settings() -> ToyBenchmarkSettings:
    """The benchmark: 6 prompts × 6 methods, 5 scenes × 4 seeds, 9 ablation variants.

    The loop is ToyWorld's preset as `extract` runs it (`toy_preset`), unreduced, so the table
    measures the loop a user gets.
    """
    return ToyBenchmarkSettings(
        name="full",
        prompts=list(FULL_PROMPTS),
        seeds_per_scene=4,
        ablations={
            "embedder": [{"embedder.kind": "pixels"}],
            "K": [{"d_size_c": 16}, {"d_size_c": 4}],
            "d_min_c": [{"d_min_c": 1}, {"d_min_c": 8}],
            "core_size": [{"core_size": None}],
            "template": [{"identity_prompt_template": "{prompt} {token}"}],
            "refiner": [{"refiner.mode": "ti"}, {"refiner.mode": "lora"}],
        },
        ablation_prompts=["a creature"],
    )


def quick_settings() -> ToyBenchmarkSettings:
    """The full path in a few minutes on a 2-core CPU: 2 prompts, 2 seeds per scene, N = 12
    (K = 2), 10 denoising and 10 refine steps, at most 2 iterations, and the ablations with one
    variant per group (two for the refiner: TI only, LoRA only)."""
    return ToyBenchmarkSettings(
        name="quick",
        prompts=["a creature", "a red creature"],
        seeds_per_scene=2,
        overrides={
            "num_images": 12,
            "d_size_c": 6,
            "d_min_c": 3,
            "core_size": 3,
            "max_iterations": 2,
            "generator.num_inference_steps": 10,
            "refiner.steps": 10,
        },
        ablations={
            "embedder": [{"embedder.kind": "pixels"}],
            "K": [{"d_size_c": 4}],
            "d_min_c": [{"d_min_c": 1}],
            "template": [{"identity_prompt_template": "{prompt} {token}"}],
            "refiner": [{"refiner.mode": "ti"}, {"refiner.mode": "lora"}],
        },
        ablation_prompts=["a creature"],
    )


def minimal_settings() -> ToyBenchmarkSettings:
    """Seconds on tiny models (tests): 2 prompts, 2 scenes × 1 seed, N = 4, 2 denoising steps,
    1 refine step, one variant per ablation group. The numbers mean nothing."""
    return ToyBenchmarkSettings(
        name="minimal",
        prompts=["a creature", "a red creature"],
        scenes=["forest", "snow"],
        seeds_per_scene=1,
        overrides={
            "num_images": 4,
            "d_size_c": 2,
            "d_min_c": 1,
            "core_size": 2,
            "max_iterations": 2,
            "generator.num_inference_steps": 2,
            "refiner.steps": 1,
            "refiner.batch_size": 2,
        },
        ablations={
            "embedder": [{"embedder.kind": "pixels"}],
            "K": [{"d_size_c": 4}],
            "d_min_c": [{"d_min_c": 2}],
            "template": [{"identity_prompt_template": "{prompt} {token}"}],
            "refiner": [{"refiner.mode": "ti"}, {"refiner.mode": "lora"}],
        },
        ablation_prompts=["a creature"],
    )


PRESETS: dict[str, Callable[[], ToyBenchmarkSettings]] = {
    "full": full_settings,
    "quick": quick_settings,
    "minimal": minimal_settings,
}


def reductions(
    settings: ToyBenchmarkSettings, reference: ToyBenchmarkSettings | None = None
) -> list[str]:
    """What `settings` runs less of than `reference` (default: the full benchmark), in words."""
    ref = reference or full_settings()
    out: list[str] = []
    if settings.prompts != ref.prompts:
        out.append(
            f"prompts: {len(settings.prompts)} ({settings.prompts}) instead of {len(ref.prompts)}"
        )
    if settings.methods != ref.methods:
        out.append(f"methods: {settings.methods} instead of {ref.methods}")
    if settings.scenes != ref.scenes:
        out.append(f"scenes: {settings.scenes} instead of {ref.scenes}")
    if settings.seeds_per_scene != ref.seeds_per_scene:
        out.append(f"seeds per scene: {settings.seeds_per_scene} instead of {ref.seeds_per_scene}")
    mine, theirs = settings.config(), ref.config()
    for name in mine.differences(theirs):
        if name == "seed":
            continue
        out.append(f"{name}: {mine.get(name)!r} instead of {theirs.get(name)!r}")
    if settings.single_image_steps != ref.single_image_steps:
        out.append(
            f"single_image_steps: {settings.single_image_steps} instead of {ref.single_image_steps}"
        )
    n_mine = sum(len(settings.ablation_variants(g)) - 1 for g in settings.ablations)
    n_ref = sum(len(ref.ablation_variants(g)) - 1 for g in ref.ablations)
    if n_mine != n_ref or settings.ablation_prompts != ref.ablation_prompts:
        out.append(
            f"ablations: {n_mine} variants on {settings.ablation_prompts} instead of {n_ref} "
            f"on {ref.ablation_prompts}"
        )
    return out
