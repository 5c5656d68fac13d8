"""Does one refinement on creatures that differ in their eyes and hats erase them?

    python docs/mixed_details.py [--size 16] [--blur R | --generated {full,shared}]
        [--draw-guidance G] [--scheduler NAME] [--only SET] [--set K=V]

Builds four training sets of ToyWorld renders (ground truth, in random scenes, positions and
sizes), each trained into a fresh identity by one `refine` call with the ToyWorld preset's
refiner settings (and the `--set` overrides):

- *one identity*: a blue round creature with big eyes and a red crown, `--size` times;
- *eyes and hat shared*: big eyes and a red crown on random shapes and colours;
- *shape and colour shared*: blue and round, with random eyes and hats;
- *nothing shared*: random creatures.

No record has sleepy eyes or no hat: where the eyes and hats are random they are drawn from
the other styles, so an identity trained on renders that draws sleepy eyes or no hat has not
learned them. With ``--blur`` the renders are softened by a Gaussian blur of that radius (in
pixels) before training: the model's own images are a little softer than renders. With
``--generated full`` each training image is drawn by the model instead, from a caption that names
all five identity attributes of its record (the scene left to the model): the same creatures in
the model's own drawing. ``--generated shared`` names only what the set shares ("a blue round
creature", or "a creature" for the set that shares nothing), so the model chooses the rest, as it
does for the loop's prompt. ``--draw-guidance`` draws those training images at another
guidance scale than the preset's (the identity is still drawn at the preset's). The script reads
these training sets with the probe too (``training set`` in the output). ``--scheduler`` samples
every image with another diffusers scheduler than the preset's (``model``: the model's own,
deterministic Euler). ``--only`` keeps one set (by its name below), since each takes about a
minute.

Each identity then draws ``"<cc-char> a creature"`` on the same 64 seeds, and the probe reads
the images. The script prints, for each set and for the plain prompt: how many of the 64 show
the shared values (blue, round, big eyes, a crown) and how many show sleepy eyes or no hat,
which is what the probe reads where eyes or a hat have faded (`docs/final_identities.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import ImageFilter

from consistent_char.config import ExtractorConfig, parse_assignment, toy_preset
from consistent_char.eval.run import generator_from_config, load_probe
from consistent_char.stages import build_refiner
from consistent_char.toy import CreatureRecord, render, sample_record
from consistent_char.toy import caption as describe
from consistent_char.toy.world import IDENTITY_ATTRIBUTES

SHARED = {"shape": "round", "color": "blue", "hat": "crown", "hat_color": "red", "eyes": "big"}
SETS: dict[str, tuple[str, ...]] = {
    "one identity": ("shape", "color", "hat", "hat_color", "eyes"),
    "eyes and hat shared": ("hat", "hat_color", "eyes"),
    "shape and colour shared": ("shape", "color"),
    "nothing shared": (),
}
COUNTED: dict[str, Callable[[dict[str, str]], bool]] = {
    "blue": lambda r: r["color"] == "blue",
    "round": lambda r: r["shape"] == "round",
    "big eyes": lambda r: r["eyes"] == "big",
    "crown": lambda r: r["hat"] == "crown",
    "sleepy eyes": lambda r: r["eyes"] == "sleepy",
    "no hat": lambda r: r["hat"] == "none",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16, help="renders per training set")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--blur", type=float, default=0.0, help="Gaussian blur radius, pixels")
    source.add_argument(
        "--generated",
        choices=("full", "shared"),
        help="train on the model's drawings, from full or shared-only captions",
    )
    parser.add_argument(
        "--draw-guidance", type=float, help="guidance of the generated training images"
    )
    parser.add_argument(
        "--scheduler", help="diffusers scheduler class to sample with; 'model': the model's own"
    )
    parser.add_argument("--only", choices=tuple(SETS), help="train this set only")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="refiner setting"
    )
    args = parser.parse_args()
    if args.draw_guidance is not None and not args.generated:
        parser.error("--draw-guidance needs --generated")
    config = ExtractorConfig.from_overrides(toy_preset())
    if args.scheduler is not None:
        config.generator.scheduler = None if args.scheduler == "model" else args.scheduler
    overrides: dict[str, Any] = dict(parse_assignment(text) for text in args.set)
    generator = generator_from_config(config)
    drawer = (
        generator
        if args.draw_guidance is None
        else generator_from_config(
            config, guidance_scale=args.draw_guidance, pipeline=generator.pipeline
        )
    )
    refiner = build_refiner(config.refiner, generator.pipeline, **overrides)
    probe = load_probe(None)
    caption = config.identity_prompt_template.format(token=refiner.token, prompt="a creature")
    seeds = list(range(1000, 1064))

    def report(name: str, records: list[dict[str, str]]) -> None:
        counts = ", ".join(f"{k} {sum(map(f, records))}" for k, f in COUNTED.items())
        print(f"{name:>24}: of {len(records)}: {counts}", flush=True)

    report("plain prompt", probe.predict(generator.generate(["a creature"] * 64, seeds)))
    for name, shared in SETS.items():
        if args.only not in (None, name):
            continue
        rng = np.random.default_rng(7)
        pinned = {k: SHARED[k] for k in shared}
        records: list[CreatureRecord] = []
        while len(records) < args.size:
            record = sample_record(rng, **pinned)
            if record.eyes != "sleepy" and record.hat != "none":
                records.append(record)
        if args.generated:
            named = IDENTITY_ATTRIBUTES if args.generated == "full" else shared
            prompts = [describe(record, named) for record in records]
            images = drawer.generate(prompts, list(range(2000, 2000 + len(prompts))))
            report(f"{name}, training set", probe.predict(images))
        else:
            images = [render(record) for record in records]
            if args.blur > 0:
                images = [image.filter(ImageFilter.GaussianBlur(args.blur)) for image in images]
        identity = refiner.refine(None, images, [caption] * len(images), seed=0)
        report(name, probe.predict(generator.generate([caption] * 64, seeds, identity)))


if __name__ == "__main__":
    main()
