"""Does the identity's LoRA on the unconditional branch of guidance cost consistency?

    python docs/cfg_branches.py runs/demo

Draws a finished ToyWorld run's identity in the 5 scenes × 8 seeds, as `consistent-char eval
run` does, twice: with its LoRA on both branches of classifier-free guidance (what any
diffusers pipeline does, and what the evaluation measures), and with the LoRA on the
conditional branch only (the unconditional prediction from the model without the LoRA). Prints
identity consistency, adherence, the per-attribute agreement and the sharpness of each set
(the mean absolute Laplacian, as `docs/drift_decomposition.py` measures it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from drift_decomposition import _sharpness

from consistent_char.config import ExtractorConfig
from consistent_char.eval.run import generator_from_config, load_probe
from consistent_char.eval.toy import render_identity_in_scenes, score_records
from consistent_char.identity import Identity
from consistent_char.rundir import RunDirectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished ToyWorld run directory")
    args = parser.parse_args()
    run = RunDirectory(args.run)
    config = ExtractorConfig.from_file(run.config_path)
    config.generator.fuse_identity = False  # the adapter must stay switchable
    generator = generator_from_config(config)
    unet = generator.pipeline.unet
    forward = unet.forward
    probe = load_probe(None)
    identity = Identity.load(run.identity_dir)

    def conditional_only(
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        added_cond_kwargs: dict[str, torch.Tensor],
        **kwargs: Any,
    ) -> Any:
        # diffusers batches guidance as [unconditional, conditional].
        b = sample.shape[0] // 2
        parts = []
        for part, lora in ((slice(0, b), False), (slice(b, None), True)):
            if not lora:
                unet.disable_adapters()
            try:
                parts.append(
                    forward(
                        sample[part],
                        timestep,
                        encoder_hidden_states[part],
                        *args,
                        added_cond_kwargs={k: v[part] for k, v in added_cond_kwargs.items()},
                        **kwargs,
                    )[0]
                )
            finally:
                unet.enable_adapters()
        return (torch.cat(parts),)

    for name, method in (("both branches", forward), ("conditional only", conditional_only)):
        unet.forward = method
        drawn = render_identity_in_scenes(generator, identity, run.read_state().prompt)
        images = [image for _, image in drawn]
        scores = score_records(probe.predict(images), [scene for scene, _ in drawn])
        agreement = ", ".join(f"{k} {v:.3f}" for k, v in scores["attribute_agreement"].items())
        print(
            f"{name}: identity consistency {scores['identity_consistency']:.3f}, adherence "
            f"{scores['prompt_adherence']:.3f} ({agreement}); sharpness {_sharpness(images):.4f}"
        )
    unet.forward = forward


if __name__ == "__main__":
    main()
