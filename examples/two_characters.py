"""Two identities in one pipeline: a scene with two characters.

Each identity adds its own token to both text encoders and its own LoRA adapter (named after the
token), and both stay active together. Removing one leaves the other exactly as it was alone.

    python examples/two_characters.py runs/fox/identity runs/owl/identity --model toy
    python examples/two_characters.py --tiny                  # random identities, seconds on CPU
"""

from __future__ import annotations

import argparse

import torch

from consistent_char import Identity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("identities", nargs="*", help="Two identity folders.")
    parser.add_argument("--model", default="toy", help="Their base model.")
    parser.add_argument("--tiny", action="store_true", help="Tiny random pipeline and identities.")
    parser.add_argument("--out", default="two_characters.png")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    if args.tiny:
        from consistent_char.testing import tiny_identity, tiny_sdxl_pipeline

        torch.set_num_threads(1)  # tiny tensors gain nothing from threads
        pipe = tiny_sdxl_pipeline(seed=0)
        first, second = tiny_identity(pipe, "<fox>", 1), tiny_identity(pipe, "<owl>", 2)
        args.steps = 2
    else:
        if len(args.identities) != 2:
            parser.error("give two identity folders (or --tiny)")
        from consistent_char.generators.sdxl import load_sdxl_pipeline
        from consistent_char.stages import resolve_model

        pipe = load_sdxl_pipeline(resolve_model(args.model))
        first, second = (Identity.load(d) for d in args.identities)

    first.apply_to(pipe)
    second.apply_to(pipe, scale=0.9)
    print(f"active adapters: {pipe.get_active_adapters()}")
    try:
        image = pipe(
            f"{first.token} and {second.token} having a picnic in the park",
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
    finally:
        second.remove_from(pipe)
        first.remove_from(pipe)
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
