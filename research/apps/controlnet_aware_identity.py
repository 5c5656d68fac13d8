"""Experiment: an identity whose LoRA is trained *through* the pose ControlNet.

The loop's identity is learned from centred, upright creatures, so its LoRA carries that pose
along with the look, and fights the ControlNet when asked for another pose. Here the refiner's
denoising loss is computed with the ControlNet's residuals for each training image's own pose
(read by the pose probe, drawn as a pose map): where the creature stands is then explained by
the ControlNet, and the LoRA is left to learn the look.

Replays a finished run's refinements (the same clusters, captions and seeds) with and without
the ControlNet in the loss, and measures both identities' pose control.

    python research/apps/controlnet_aware_identity.py RUN --out DIR [--through 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import consistent_char.toy as toy
from consistent_char.config import TOY_MODEL, ExtractorConfig
from consistent_char.control import ControlledGenerator, load_controlnet
from consistent_char.eval.pose_control import score_pose_control
from consistent_char.extractor import IterativeIdentityExtractor
from consistent_char.refiners.ti_lora import denoising
from consistent_char.seeds import stage_seed
from consistent_char.toy.evaluate import majority_identity
from consistent_char.toy.pose import pose_map
from consistent_char.toy.probe import IdentityProbe


@dataclass
class ControlBatch(denoising.Batch):
    """A batch with each image's control image (``(N, 3, H, W)`` in [0, 1])."""

    control: torch.Tensor | None = None

    def __getitem__(self, index: torch.Tensor) -> ControlBatch:
        assert self.control is not None
        return ControlBatch(
            self.latents[index],
            self.ids_1[index],
            self.ids_2[index],
            self.time_ids[index],
            self.control[index],
        )


def controlled_loss(controlnet: Any, scale: float) -> Any:
    """`denoising.sdxl_loss` with the ControlNet's residuals added to the UNet (frozen, no
    gradient through it), for batches that carry control images."""

    def loss(
        unet: Any,
        state: Any,
        scheduler: Any,
        batch: denoising.Batch,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        autocast: Any,
        dtype: torch.dtype,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        noisy = scheduler.add_noise(batch.latents, noise, timesteps)
        with autocast:
            prompt_embeds, pooled = state.encode(batch.ids_1, batch.ids_2)
            added = {"text_embeds": pooled.to(dtype), "time_ids": batch.time_ids.to(dtype)}
            with torch.no_grad():
                down, mid = controlnet(
                    noisy.to(dtype),
                    timesteps,
                    encoder_hidden_states=prompt_embeds.detach().to(dtype),
                    controlnet_cond=batch.control.to(dtype),  # type: ignore[attr-defined]
                    conditioning_scale=scale,
                    added_cond_kwargs={k: v.detach() for k, v in added.items()},
                    return_dict=False,
                )
            pred = unet(
                noisy.to(dtype),
                timesteps,
                encoder_hidden_states=prompt_embeds.to(dtype),
                added_cond_kwargs=added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
        return F.mse_loss(pred.float(), noise.float())

    return loss


@contextlib.contextmanager
def through_controlnet(refiner: Any, controlnet: Any, probe: Any, scale: float) -> Iterator[None]:
    """While open, `refiner.refine` trains with the ControlNet in the loss, each image under
    the pose map of the pose `probe` reads on it."""
    original_batch, original_loss = refiner._batch, denoising.sdxl_loss

    def batch(state: Any, images: list[Image.Image], *args: Any) -> ControlBatch:
        plain = original_batch(state, images, *args)
        maps = [pose_map(dict(zip(("x", "bottom", "scale", "tilt"), p, strict=True)))
                for p in probe.predict_pose(images)]
        control = torch.stack(
            [torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0).permute(2, 0, 1)
             for m in maps]
        )
        return ControlBatch(plain.latents, plain.ids_1, plain.ids_2, plain.time_ids, control)

    refiner._batch = batch
    denoising.sdxl_loss = controlled_loss(controlnet, scale)
    try:
        yield
    finally:
        del refiner._batch
        denoising.sdxl_loss = original_loss


def replay(run: Path, extractor: Any, through: int) -> Any:
    """The run's refinements 0..`through` again: same clusters, captions and seeds."""
    config = extractor.config
    variations = extractor._variations(json.loads((run / "state.json").read_text())["prompt"])
    identity = None
    for i in range(through + 1):
        clusters = json.loads((run / f"iter_{i:03d}" / "clusters.json").read_text())
        chosen = [j for j, c in enumerate(clusters["labels"]) if c == clusters["chosen"]]
        images = [Image.open(run / f"iter_{i:03d}" / "images" / f"{j:04d}.png").convert("RGB")
                  for j in chosen]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--through", type=int, default=1, help="last refinement to replay")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="the ControlNet's scale, in training and drawing"
    )
    parser.add_argument("--only", choices=["both", "controlnet", "plain"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    extractor = IterativeIdentityExtractor.from_config(
        ExtractorConfig.build({"model": TOY_MODEL, "device": "cpu"})
    )
    probe = IdentityProbe.from_pretrained(toy.pose_probe_dir())
    controlnet = load_controlnet("toy", device=extractor.generator.pipeline.device)
    results = {}
    if args.only in ("both", "plain"):
        identity = replay(args.run, extractor, args.through)
        identity.save(args.out / "plain_replay")
        results["plain"] = measure(
            extractor, identity, probe, "replayed as the loop trains", args.scale
        )
    if args.only in ("both", "controlnet"):
        with through_controlnet(extractor.refiner, controlnet, probe, args.scale):
            identity = replay(args.run, extractor, args.through)
        identity.save(args.out / f"through_controlnet_{args.scale:g}")
        results["through_controlnet"] = measure(
            extractor, identity, probe, "trained through the ControlNet", args.scale
        )
    (args.out / f"results_{args.only}_{args.scale:g}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
