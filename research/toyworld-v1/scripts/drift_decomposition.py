"""Which part of an iteration's identity pulls the loop's images into one scene: rows or LoRA?

    python docs/drift_decomposition.py runs/demo --iteration 2

Takes the identity the run learned at `--iteration` and draws the next iteration's prompt
(``"<cc-char> a creature"``) on the next iteration's own seeds four ways: the identity as the loop
used it, its token rows alone (LoRA zeroed), its LoRA alone (rows reset to the initializer word)
and the plain prompt without identity. The probe reads each image's scene; the script prints
the scene counts, the mean brightness of each set, how many images show its most common identity
(of how many distinct ones) and its sharpness: the mean absolute Laplacian of the grey image,
apart for night images and the others, since a night sky has fewer edges than a city. With the
same seeds, the differences come from the identity's parts, not from sampling.

The chosen cluster of every iteration is also shown next to all of that iteration's images,
so a cluster that is richer in one scene than the images it came from stands out.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from consistent_char.config import ExtractorConfig
from consistent_char.eval.run import generator_from_config, load_probe
from consistent_char.identity import Identity
from consistent_char.refiners.ti_lora.state import _initial_rows
from consistent_char.rundir import RunDirectory
from consistent_char.toy.evaluate import identity_key


def _brightness(images: list[Image.Image]) -> float:
    return float(np.mean([np.asarray(im, dtype=np.float32).mean() for im in images]))


def _sharpness(images: list[Image.Image]) -> float:
    """Mean absolute 4-neighbour Laplacian of the grey image in [0, 1]: outlines and eyes."""
    values = []
    for im in images:
        x = np.asarray(im.convert("L"), dtype=np.float64) / 255
        lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
        values.append(np.abs(lap).mean())
    return float(np.mean(values)) if values else float("nan")


def _identities(records: list[dict[str, str]]) -> str:
    counts = Counter(map(identity_key, records))
    return f"top identity {counts.most_common(1)[0][1]} of {len(records)} ({len(counts)} distinct)"


def _scenes(records: list[dict[str, str]]) -> str:
    counts = Counter(r["scene"] for r in records)
    return ", ".join(f"{scene} {n}" for scene, n in counts.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished ToyWorld run directory")
    parser.add_argument("--iteration", type=int, required=True, help="whose identity")
    args = parser.parse_args()

    run = RunDirectory(args.run)
    config = ExtractorConfig.from_file(run.config_path)
    state = run.read_state()
    history = state.history
    if not 0 <= args.iteration < len(history) - 1:
        raise SystemExit(f"{args.run} has no iteration after {args.iteration}")
    probe = load_probe(None)

    # Every iteration: all its images, and the cluster it chose.
    for i, record in enumerate(history):
        images = run.load_images(i, len(record["seeds"]))
        records = probe.predict(images)
        line = f"iteration {i}: all {len(images)}: {_scenes(records)}"
        if record.get("chosen_cluster") is not None:
            labels = np.asarray(run.load_clusters(i)["labels"])
            members = np.flatnonzero(labels == record["chosen_cluster"])
            line += f" | chosen {len(members)}: {_scenes([records[j] for j in members])}"
        print(line)

    # The identity of --iteration, whole and in parts, on the next iteration's seeds.
    generator = generator_from_config(config)
    pipe = generator.pipeline
    identity = Identity.load(run.iteration_identity_dir(args.iteration))
    n = identity.num_vectors
    word = str(config.refiner.initializer_token)

    lora = identity.lora or {}
    variants: dict[str, Identity | None] = {
        "identity": identity,
        "rows only": dataclasses.replace(
            identity,
            lora={k: torch.zeros_like(v) if "lora_B" in k else v for k, v in lora.items()},
        ),
        "LoRA only": dataclasses.replace(
            identity,
            # The rows a new identity starts from (the refiner's own initialisation).
            clip_l=_initial_rows(pipe.tokenizer, pipe.text_encoder.get_input_embeddings(), word, n),
            clip_g=_initial_rows(
                pipe.tokenizer_2, pipe.text_encoder_2.get_input_embeddings(), word, n
            ),
        ),
        "no identity": None,
    }
    following = history[args.iteration + 1]
    seeds = list(following["seeds"])
    for name, variant in variants.items():
        prompt = following["prompt"] if variant is not None else state.prompt
        images = generator.generate([prompt] * len(seeds), seeds, variant)
        records = probe.predict(images)
        night = [im for im, r in zip(images, records, strict=True) if r["scene"] == "night"]
        day = [im for im, r in zip(images, records, strict=True) if r["scene"] != "night"]
        print(
            f"{name:>12}: {_scenes(records)}; brightness {_brightness(images):.0f}; "
            f"{_identities(records)}; sharpness at night {_sharpness(night):.4f}, "
            f"elsewhere {_sharpness(day):.4f}"
        )


if __name__ == "__main__":
    main()
