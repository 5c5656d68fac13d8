"""What the toy model draws from a conditioning halfway between two prompts.

    python docs/conditioning_mixtures.py [--images 32] [--guidance 3] [--weights 0 0.5 1]
        "PROMPT A|PROMPT B" ...

A learned token is free to land between the words the model was trained on. This script asks
what the model draws there: for each pair it encodes both prompts as the pipeline does
(`encode_prompt`: the two encoders' hidden states and the pooled embedding), mixes them as
``(1 - w) * A + w * B`` for each weight ``w``, and draws `--images` images from each mixture with
the ToyWorld preset's sampler, guidance and seeds (the same seeds for every mixture). It prints
how often the probe reads each value of the eyes, the hat and the colour.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from consistent_char.config import ExtractorConfig, toy_preset
from consistent_char.eval.run import generator_from_config, load_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help='two prompts separated by "|"')
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    pairs = []
    for text in args.pairs:
        parts = text.split("|")
        if len(parts) != 2:
            parser.error(f'each pair must be two prompts separated by "|", got {text!r}')
        pairs.append((parts[0].strip(), parts[1].strip()))

    config = ExtractorConfig.build(toy_preset())
    generator = generator_from_config(config, guidance_scale=args.guidance)
    pipe = generator.pipeline
    pipe.set_progress_bar_config(disable=True)
    probe = load_probe(None)
    n = args.images
    seeds = list(range(1000, 1000 + n))

    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return hidden, pooled

    # The unconditional branch is the empty prompt, as the pipeline's own guidance uses it.
    empty_hidden, empty_pooled = encode("")
    for a, b in pairs:
        (hidden_a, pooled_a), (hidden_b, pooled_b) = encode(a), encode(b)
        for w in args.weights:
            with generator.sampler():  # the preset's sampler, as generate() draws with it
                out = pipe(
                    prompt_embeds=((1 - w) * hidden_a + w * hidden_b).expand(n, -1, -1),
                    pooled_prompt_embeds=((1 - w) * pooled_a + w * pooled_b).expand(n, -1),
                    negative_prompt_embeds=empty_hidden.expand(n, -1, -1),
                    negative_pooled_prompt_embeds=empty_pooled.expand(n, -1),
                    num_inference_steps=generator.num_inference_steps,
                    guidance_scale=generator.guidance_scale,
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    height=generator.height,
                    width=generator.width,
                )
            records = probe.predict(out.images)
            counts = []
            for name in ("eyes", "hat", "color"):
                values = Counter(r[name] for r in records).most_common()
                counts.append(f"{name}: " + ", ".join(f"{v} {c}" for v, c in values))
            print(f"{a!r} -> {b!r}, w = {w:g}: " + "; ".join(counts))


if __name__ == "__main__":
    main()
