"""Evaluation: does the loop give more consistent characters than its baselines?

- `consistent_char.eval.toy`: draw an identity in ToyWorld's scenes and score it with the identity
  probe (identity consistency, prompt adherence);
- `consistent_char.eval.run`: score a finished run's identity beside its vanilla prompt;
- `consistent_char.eval.benchmark`: the ToyWorld benchmark (methods × vague prompts, ablations);
  what it runs is `consistent_char.eval.presets`, how long it takes
  `consistent_char.eval.estimate`;
- `consistent_char.eval.seeds`: the loop over many seeds, summarised per prompt;
- `consistent_char.eval.results`: ``results.json``, the Markdown table, the scatter plot;
- `consistent_char.eval.real`: CLIP-T and identity similarity for real (SDXL-class) models;
- `consistent_char.eval.commands`: the work behind ``consistent-char eval``.

Example:
    >>> from consistent_char.eval import evaluate_run
    >>> evaluate_run("runs/demo")["identity"]["identity_consistency"]  # doctest: +SKIP
"""

from consistent_char.eval.benchmark import (
    estimate_seconds,
    full_settings,
    measure_unit_costs,
    minimal_settings,
    quick_settings,
    run_toy_benchmark,
)
from consistent_char.eval.run import evaluate_run, generator_from_config, load_probe
from consistent_char.eval.toy import (
    render_identity_in_scenes,
    scene_prompts,
    scene_seed,
    score_records,
    score_toy,
)

__all__ = [
    "estimate_seconds",
    "evaluate_run",
    "full_settings",
    "measure_unit_costs",
    "minimal_settings",
    "quick_settings",
    "run_toy_benchmark",
    "generator_from_config",
    "load_probe",
    "render_identity_in_scenes",
    "scene_prompts",
    "scene_seed",
    "score_records",
    "score_toy",
]
