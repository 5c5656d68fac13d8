"""Trial: once an identity is learned, guide against the user's prompt instead of the empty
prompt (negative prompt = the prompt without its scene), so that classifier-free guidance
amplifies what the token and the scene add, not the prompt's own words ("red"). Patches
`SDXLGenerator.generate` for draws with an identity (the loop after iteration 0 and the
evaluation's identity images; plain prompting is unchanged), then runs `evaluate_seeds`.

    python research/toyworld-v2/prompt_negative.py --out runs/v2/negprompt \
        "a green creature" --seeds 0-1
"""

from __future__ import annotations

from trial import BASE, parse_args, run

from consistent_char.generators.sdxl import SDXLGenerator

_generate = SDXLGenerator.generate


def generate(self, prompts, seeds, identity=None, **kwargs):  # type: ignore[no-untyped-def]
    if identity is None:
        return _generate(self, prompts, seeds, identity, **kwargs)
    previous, self.negative_prompt = self.negative_prompt, BASE["prompt"]
    try:
        return _generate(self, prompts, seeds, identity, **kwargs)
    finally:
        self.negative_prompt = previous


if __name__ == "__main__":
    SDXLGenerator.generate = generate  # type: ignore[method-assign]
    run(parse_args())
