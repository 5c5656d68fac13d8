"""Plug the extractor into a pipeline you already have, then use the identity in it.

Every default stage can wrap a loaded object instead of loading its own: `SDXLGenerator` and the
refiner share your `StableDiffusionXLPipeline` (nothing is copied or reloaded), and the embedder
wraps a loaded `Dinov2Model`. After the run, the identity goes into the same pipeline with
`Identity.apply_to` and comes out again with `Identity.remove_from`.

    python examples/existing_pipeline.py                      # ToyWorld
    python examples/existing_pipeline.py --tiny               # seconds on CPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import add_model_arguments, default_stages, load

from consistent_char import IterativeIdentityExtractor
from consistent_char.embedders import DINOv2Embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="a creature")
    parser.add_argument("--images", default=None, help="Folder for two images of the identity.")
    args = parser.parse_args()

    # 1. Your pipeline, loaded however you like (here: ToyWorld, a hub id, or a tiny one).
    pipe, config = load(args)

    # 2. An embedder around a model you hold. --tiny: a random DINOv2 built from a config.
    if args.tiny:
        from transformers import Dinov2Config, Dinov2Model

        torch.manual_seed(0)
        dinov2 = Dinov2Model(
            Dinov2Config(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=28,
                patch_size=14,
            )  # fmt: skip
        )
        embedder = DINOv2Embedder.from_model(dinov2)
    else:
        from consistent_char.stages import resolve_model

        source = config.embedder.model or "facebook/dinov2-large"
        embedder = DINOv2Embedder.from_pretrained(resolve_model(source, kind="embedder"))

    # 3. The loop on your pipeline.
    stages = default_stages(pipe, config)
    extractor = IterativeIdentityExtractor(
        stages["generator"],
        embedder,
        stages["clusterer"],
        stages["refiner"],
        stages["criterion"],
        config=config,
    )
    result = extractor.extract(args.prompt, run_dir=args.out)
    identity = result.identity
    print(f"{result.iterations} iterations; identity token {identity.token}")

    # 4. Use the identity in the same pipeline, then leave the pipeline as it was.
    identity.apply_to(pipe)
    try:
        images = pipe(
            [f"{identity.token} in the snow", f"{identity.token} at the beach"],
            num_inference_steps=config.generator.num_inference_steps,
            generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
        ).images
    finally:
        identity.remove_from(pipe)
    if args.images:
        folder = Path(args.images)
        folder.mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(images):
            image.save(folder / f"{j}.png")
    print(f"drew {len(images)} images of {identity.token}; the pipeline is clean again")


if __name__ == "__main__":
    main()
