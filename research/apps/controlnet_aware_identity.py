"""Experiment: an identity whose LoRA is trained *through* the pose ControlNet.

The loop's identity is learned from centred, upright creatures, so its LoRA carries that pose
along with the look, and fights the ControlNet when asked for another pose. Here the refiner's
denoising loss is computed with the ControlNet's residuals for each training image's own pose
(read by the pose probe, drawn as a pose map): where the creature stands is then explained by
the ControlNet, and the LoRA is left to learn the look.

Replays a finished run's refinements (the same clusters, captions and seeds) with and without
the ControlNet in the loss (the library's ``refiner.controlnet`` and
``refiner.control_annotator``), and measures both identities' pose control.

    python research/apps/controlnet_aware_identity.py RUN --out DIR [--through 1]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import consistent_char.toy as toy
from consistent_char.config import TOY_MODEL, ExtractorConfig
from consistent_char.control import ControlledGenerator, load_controlnet
from consistent_char.eval.pose_control import score_pose_control
from consistent_char.extractor import IterativeIdentityExtractor
from consistent_char.seeds import stage_seed
from consistent_char.toy.evaluate import majority_identity
from consistent_char.toy.pose import REFINE_THROUGH_CONTROLNET
from consistent_char.toy.probe import IdentityProbe


def replay(run: Path, extractor: Any, through: int) -> Any:
    """The run's refinements 0..`through` again: same clusters, captions and seeds."""
    config = extractor.config
    variations = extractor._variations(json.loads((run / "state.json").read_text())["prompt"])
    identity = None
    for i in range(through + 1):
        clusters = json.loads((run / f"iter_{i:03d}" / "clusters.json").read_text())
        chosen = [j for j, c in enumerate(clusters["labels"]) if c == clusters["chosen"]]
        images = [
            Image.open(run / f"iter_{i:03d}" / "images" / f"{j:04d}.png").convert("RGB")
            for j in chosen
        ]
        token = identity.token if identity is not None else config.refiner.token
        captions = [extractor._identity_prompt(variations[j], token) for j in chosen]
        identity = extractor.refiner.refine(
            identity, images, captions, seed=stage_seed(config.seed, i, "refine")
        )
        print(f"refined iteration {i} on {len(images)} images", flush=True)
    return identity


def measure(
    extractor: Any, identity: Any, probe: Any, name: str, scale: float = 1.0
) -> dict[str, Any]:
    generator = extractor.generator
    controlnet = load_controlnet("toy", device=generator.pipeline.device)
    controlled = ControlledGenerator(
        generator.pipeline, controlnet, control_scale=scale, **generator.settings.model_dump()
    )
    from consistent_char.eval.toy import render_identity_in_scenes

    plain = render_identity_in_scenes(generator, identity, "a creature", seeds_per_scene=8, seed=1)
    reference = majority_identity(probe.predict([im for _, im in plain]))
    section, _ = score_pose_control(
        generator, controlled, identity, probe, reference, "a creature", poses=20, per_pose=4
    )
    row = section["controlnet"]["identity"]
    alone = section["no_controlnet"]["identity"]
    print(
        f"{name}: reference {reference}; with ControlNet followed {row['control_followed']:.3f} "
        f"kept {row['identity_kept']:.3f} fields {row['fields_followed']}; without: kept "
        f"{alone['identity_kept']:.3f}",
        flush=True,
    )
    return section


def _extractor(refiner: dict[str, Any]) -> Any:
    config = ExtractorConfig.build({"model": TOY_MODEL, "device": "cpu", "refiner": refiner})
    return IterativeIdentityExtractor.from_config(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--through", type=int, default=1, help="last refinement to replay")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="the ControlNet's scale, in training and drawing"
    )
    parser.add_argument("--only", choices=["both", "controlnet", "plain"], default="both")
    parser.add_argument(
        "--target-modules", nargs="+", default=None, help="the LoRA's modules (default: the run's)"
    )
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    args.out.mkdir(parents=True, exist_ok=True)
    refiner = {} if args.target_modules is None else {"target_modules": args.target_modules}
    probe = IdentityProbe.from_pretrained(toy.pose_probe_dir())
    results = {}
    if args.only in ("both", "plain"):
        extractor = _extractor(refiner)
        identity = replay(args.run, extractor, args.through)
        identity.save(args.out / "plain_replay")
        results["plain"] = measure(
            extractor, identity, probe, "replayed as the loop trains", args.scale
        )
    if args.only in ("both", "controlnet"):
        extractor = _extractor(
            {**refiner, **REFINE_THROUGH_CONTROLNET, "control_scale": args.scale}
        )
        identity = replay(args.run, extractor, args.through)
        identity.save(args.out / f"through_controlnet_{args.scale:g}")
        results["through_controlnet"] = measure(
            extractor, identity, probe, "trained through the ControlNet", args.scale
        )
    (args.out / f"results_{args.only}_{args.scale:g}.json").write_text(
        json.dumps(results, indent=2)
    )


if __name__ == "__main__":
    main()
