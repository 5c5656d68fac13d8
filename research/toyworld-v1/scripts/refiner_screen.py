"""How much of one cluster's identity a single refinement captures, for given refiner settings.

    python docs/refiner_screen.py runs/demo --iteration 3 --set lora_lr=2e-3 [--set steps=200]

Takes the cluster that the run chose at `--iteration`, trains a fresh identity on it (one
`refine` call from nothing, with the run's refiner settings and the `--set` overrides), draws that
identity in the 5 scenes x 8 seeds, and scores the images with the probe as
`consistent-char eval run` does (`--generator KEY=VALUE` changes how it is drawn, e.g.
`--generator num_inference_steps=50`). It also prints `hit`: the fraction of those images whose five
identity attributes are the ones the probe reads on most of the cluster, and the shares of the
cluster and of the drawn images with sleepy eyes and with no hat (what faded eyes and hats are
read as, `docs/final_identities.py`). `--nearest N` trains on only the N members nearest the
cluster's centroid in the run's own embeddings, and `--sheet PATH` saves the members and then the
drawn images (a scene to a row) as one picture, each captioned with what the probe reads.

A pure cluster and a refiner that captures it should give a `hit` near 1. This isolates the
refiner from the rest of the loop, at about 35 s per setting on a 2-core CPU instead of minutes
per loop.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from consistent_char.config import ExtractorConfig, parse_assignment
from consistent_char.eval.run import generator_from_config, load_probe
from consistent_char.eval.toy import render_identity_in_scenes, score_records
from consistent_char.interfaces import IterationRecord
from consistent_char.rundir import RunDirectory
from consistent_char.stages import build_refiner
from consistent_char.story import contact_sheet
from consistent_char.toy.evaluate import identity_key
from consistent_char.toy.world import IDENTITY_ATTRIBUTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a ToyWorld run directory")
    parser.add_argument("--iteration", type=int, required=True, help="whose chosen cluster")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="refiner setting"
    )
    parser.add_argument(
        "--generator",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="generator setting, for the drawing after the refinement",
    )
    parser.add_argument("--seeds-per-scene", type=int, default=8)
    parser.add_argument("--seed", type=int, default=123, help="the refinement's seed")
    parser.add_argument(
        "--nearest",
        type=int,
        help="train on only this many members, those nearest the cluster's centroid",
    )
    parser.add_argument("--sheet", type=Path, help="save the members and the drawn images here")
    args = parser.parse_args()
    if args.nearest is not None and args.nearest < 1:
        parser.error(f"--nearest must be at least 1, got {args.nearest}")

    run = RunDirectory(args.run)
    config = ExtractorConfig.from_file(run.config_path)
    state = run.read_state()
    record = (
        IterationRecord.from_dict(state.history[args.iteration])
        if args.iteration < len(state.history)
        else None
    )
    if record is None or record.chosen_cluster is None:
        raise SystemExit(f"{args.run} chose no cluster at iteration {args.iteration}")
    overrides = dict(parse_assignment(text) for text in args.set)
    drawing = dict(parse_assignment(text) for text in args.generator)
    config = ExtractorConfig.from_overrides(
        {f"generator.{key}": value for key, value in drawing.items()}, base=config.to_dict()
    )

    # The chosen cluster's images, and the identity most of them show.
    images = run.load_images(args.iteration, len(record.seeds))
    clusters = run.load_clusters(args.iteration)
    labels = np.asarray(clusters["labels"])
    chosen = np.flatnonzero(labels == record.chosen_cluster)
    if args.nearest is not None:
        embeddings = run.load_embeddings(args.iteration)[chosen]
        centroid = np.asarray(clusters["centroids"])[record.chosen_cluster]
        order = np.argsort(np.linalg.norm(embeddings - centroid, axis=1), kind="stable")
        chosen = chosen[order[: args.nearest]]
    members = [images[j] for j in chosen]
    probe = load_probe(None)
    member_records = probe.predict(members)
    target, count = Counter(map(identity_key, member_records)).most_common(1)[0]

    # One refinement from nothing, then the identity in every scene.
    generator = generator_from_config(config)
    refiner = build_refiner(config.refiner, generator.pipeline, **overrides)
    caption = config.identity_prompt_template.format(token=refiner.token, prompt=state.prompt)
    t0 = time.perf_counter()
    identity = refiner.refine(None, members, [caption] * len(members), seed=args.seed)
    seconds = time.perf_counter() - t0
    drawn = render_identity_in_scenes(
        generator, identity, state.prompt, seeds_per_scene=args.seeds_per_scene
    )
    # Read once with the probe: the same records give the scores, the hits and the sheet.
    records = probe.predict([image for _, image in drawn])
    if args.sheet is not None:
        _save_sheet(args.sheet, members, member_records, [image for _, image in drawn], records)
    score = score_records(records, [scene for scene, _ in drawn], base_prompt=state.prompt)
    got = [identity_key(r) for r in records]
    print(
        json.dumps(
            {
                "iteration": args.iteration,
                "set": overrides,
                "generator": drawing,
                "cluster": len(members),
                "cluster_identity": dict(zip(IDENTITY_ATTRIBUTES, target, strict=True)),
                "cluster_share": round(count / len(members), 3),
                "refine_seconds": round(seconds, 1),
                "identity_consistency": round(score["identity_consistency"], 3),
                "prompt_adherence": round(score["prompt_adherence"], 3),
                "hit": round(sum(g == target for g in got) / len(got), 3),
                "sleepy_eyes": {
                    "cluster": _share(member_records, "eyes", "sleepy"),
                    "drawn": _share(records, "eyes", "sleepy"),
                },
                "no_hat": {
                    "cluster": _share(member_records, "hat", "none"),
                    "drawn": _share(records, "hat", "none"),
                },
                "attribute_agreement": {
                    k: round(v, 3) for k, v in score["attribute_agreement"].items()
                },
            }
        )
    )


def _save_sheet(
    path: Path,
    members: list[Image.Image],
    member_records: list[dict[str, str]],
    drawn: list[Image.Image],
    records: list[dict[str, str]],
) -> None:
    """The members, then the drawn images from a new row (8 to a row: a scene each), each
    captioned with what the probe reads."""
    gap = -len(members) % 8
    images = [*members, *[Image.new("RGB", members[0].size, "white")] * gap, *drawn]
    captions = [
        *(f"member: {_reading(r)}" for r in member_records),
        *[""] * gap,
        *(f"{r['scene']}: {_reading(r)}" for r in records),
    ]
    contact_sheet(images, captions, columns=8, cell_size=128).save(path)


def _reading(record: dict[str, str]) -> str:
    return " ".join(record[name] for name in ("color", "shape", "eyes", "hat"))


def _share(records: list[dict[str, str]], attribute: str, value: str) -> float:
    return round(sum(r[attribute] == value for r in records) / len(records), 3)


if __name__ == "__main__":
    main()
