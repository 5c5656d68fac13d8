"""Swap the embedder: measure identity with CLIP or DINO (v1) instead of DINOv2.

The embedder decides which images count as "the same character" (the clusters, the spread), so it
is the stage most worth an ablation. Any object with ``embed(images) -> (N, D) float32`` plugs in;
the library ships DINOv2 (default), DINO v1, CLIP and raw pixels.

    python examples/swap_embedder.py --embedder clip --embedder-model openai/clip-vit-large-patch14
    python examples/swap_embedder.py --embedder dino --embedder-model facebook/dino-vitb16
    python examples/swap_embedder.py --embedder clip --tiny        # seconds on CPU

Without ``--embedder-model`` the embedder is a small, randomly initialised model built from a
config: it runs offline and shows the plumbing, but its features mean nothing.
"""

from __future__ import annotations

import argparse

import torch
from _common import add_model_arguments, default_stages, load

from consistent_char import IterativeIdentityExtractor
from consistent_char.embedders import CLIPImageEmbedder, DINOEmbedder


def build_embedder(kind: str, weights: str | None) -> CLIPImageEmbedder | DINOEmbedder:
    """A CLIP image tower or a DINO ViT: from `weights` (hub id or folder), else a random one."""
    if weights is not None:
        if kind == "clip":
            return CLIPImageEmbedder.from_pretrained(weights)
        return DINOEmbedder.from_pretrained(weights)

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "image_size": 32, "patch_size": 16}  # fmt: skip
    torch.manual_seed(0)
    if kind == "clip":
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**small, projection_dim=16))
        return CLIPImageEmbedder.from_model(clip)
    return DINOEmbedder.from_model(ViTModel(ViTConfig(**small), add_pooling_layer=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--embedder", choices=["clip", "dino"], default="clip")
    parser.add_argument("--embedder-model", default=None, help="Hub id or folder of its weights.")
    parser.add_argument("--prompt", default="a creature")
    args = parser.parse_args()

    pipe, config = load(args)
    stages = default_stages(pipe, config)
    extractor = IterativeIdentityExtractor(
        stages["generator"],
        build_embedder(args.embedder, args.embedder_model),  # the swapped stage
        stages["clusterer"],
        stages["refiner"],
        stages["criterion"],
        config=config,
    )
    result = extractor.extract(args.prompt, run_dir=args.out)
    for record in result.history:
        print(f"iteration {record.iteration}: {args.embedder} spread {record.spread:.4f}")
    print(f"identity token {result.identity.token}; {result.stop_reason}")


if __name__ == "__main__":
    main()
