"""What the toy model draws when told nothing, beside where the loops end.

    python docs/prior_modes.py [--images 32] [--guidance 1 3] [--prompts P ...] [--model DIR]
        [RUN ...]

Draws `--images` images from each of `--prompts` (by default the empty prompt and "a creature")
at each `--guidance`, with the ToyWorld preset's generator and the same seeds, and prints how
often the probe reads each value of each attribute and the scene. With RUN folders (loop runs),
it also prints what the probe reads on each run's last iteration, so that the values the loops
end on can be set beside the ones the model draws most often unprompted. `--model` draws with
other weights (a diffusers folder) and the same preset.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from consistent_char.config import ExtractorConfig, toy_preset
from consistent_char.eval.run import generator_from_config, load_probe
from consistent_char.rundir import RunDirectory

ATTRIBUTES = ("shape", "color", "hat", "eyes", "scene")


def _print_counts(label: str, records: list[dict[str, str]]) -> None:
    print(f"{label} ({len(records)} images):")
    for name in ATTRIBUTES:
        counts = Counter(r[name] for r in records).most_common()
        print(f"    {name:>6}: " + ", ".join(f"{value} {n}" for value, n in counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="*", help="loop runs to read the ends of")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--prompts", nargs="+", default=["", "a creature"])
    parser.add_argument("--model", help="a diffusers folder instead of the shipped weights")
    args = parser.parse_args()
    probe = load_probe(None)
    seeds = list(range(1000, 1000 + args.images))
    # The preset's settings either way; only the weights differ with --model.
    config = ExtractorConfig.build({**toy_preset(), "model": args.model or "toy"})
    pipeline = generator_from_config(config).pipeline
    for guidance in args.guidance:
        generator = generator_from_config(config, guidance_scale=guidance, pipeline=pipeline)
        for prompt in args.prompts:
            images = generator.generate([prompt] * args.images, seeds)
            _print_counts(
                f"{prompt or 'the empty prompt'!r}, guidance {guidance}", probe.predict(images)
            )
    for path in args.runs:
        run = RunDirectory(path)
        history = run.read_state().history
        last = len(history) - 1
        images = run.load_images(last, len(history[last]["seeds"]))
        _print_counts(f"{path.name}, iteration {last}", probe.predict(images))


if __name__ == "__main__":
    main()
