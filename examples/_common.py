"""What the examples share: the base pipeline and loop settings, full size or tiny.

``--tiny`` builds a randomly initialised SDXL-architecture pipeline from configs (32x32 images, as
in the library's own fast tests) and a loop of 2 iterations over 8 images: the plumbing runs in
seconds on a CPU, the images are noise. Without it, the examples load ``--model`` (default
``toy``: ToyWorld, shipped with the package) with that model's settings.
"""

from __future__ import annotations

import argparse
from typing import Any

from consistent_char import ExtractorConfig
from consistent_char.clusterers import FaissKMeansClusterer
from consistent_char.convergence import PairwiseDistanceCriterion
from consistent_char.generators import SDXLGenerator
from consistent_char.refiners import TextualInversionLoRARefiner

#: Loop settings of --tiny: N = 8 images, K = 2 clusters, 2 iterations, 2 training steps.
TINY_SETTINGS: dict[str, Any] = {
    "num_images": 8,
    "d_size_c": 4,
    "d_min_c": 2,
    "max_iterations": 2,
    "generator": {"num_inference_steps": 2, "guidance_scale": 5.0},
    "refiner": {"token": "<cc-char>", "initializer_token": "creature", "steps": 2},
}


#: Loop settings of --quick: the model's own settings, with the loop cut to TINY_SETTINGS' size.
QUICK_SETTINGS: dict[str, Any] = {
    "num_images": 8,
    "d_size_c": 4,
    "d_min_c": 2,
    "max_iterations": 2,
    "generator": {"num_inference_steps": 4},
    "refiner": {"steps": 2},
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="toy", help="SDXL hub id, local folder, or 'toy'.")
    parser.add_argument("--tiny", action="store_true", help="Tiny random models: seconds on CPU.")
    parser.add_argument(
        "--quick", action="store_true", help="--model with a loop of 2 iterations over 8 images."
    )
    parser.add_argument("--out", default=None, help="Run directory (default: none written).")


def load(args: argparse.Namespace) -> tuple[Any, ExtractorConfig]:
    """The base pipeline and the loop's config."""
    if args.tiny:
        import torch

        from consistent_char.testing import tiny_sdxl_pipeline

        # Tiny tensors gain nothing from threads, and lose a lot when the cores are busy.
        torch.set_num_threads(1)
        return tiny_sdxl_pipeline(seed=0), ExtractorConfig.build(TINY_SETTINGS)
    from consistent_char.generators.sdxl import load_sdxl_pipeline
    from consistent_char.stages import resolve_device, resolve_model

    settings: dict[str, Any] = {"model": args.model}
    if getattr(args, "quick", False):
        base = ExtractorConfig.build(settings).to_dict()
        for key, value in QUICK_SETTINGS.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) else value
        settings = base
    config = ExtractorConfig.build(settings)
    return load_sdxl_pipeline(resolve_model(config.model), device=resolve_device("auto")), config


def default_stages(pipe: Any, config: ExtractorConfig) -> dict[str, Any]:
    """The default generator, clusterer, refiner and criterion, on `pipe`, set from `config`."""
    g, r, c = config.generator, config.refiner, config.convergence
    return {
        "generator": SDXLGenerator.from_pipeline(
            pipe, num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale
        ),
        "clusterer": FaissKMeansClusterer(niter=config.clusterer.niter),
        "refiner": TextualInversionLoRARefiner.from_pipeline(
            pipe,
            token=r.token,
            initializer_token=r.initializer_token,
            steps=r.steps,
            batch_size=r.batch_size,
            lora_lr=r.lora_lr,
            embedding_lr=r.embedding_lr,
        ),
        "criterion": PairwiseDistanceCriterion(d_conv=c.d_conv, d_conv_relative=c.d_conv_relative),
    }
