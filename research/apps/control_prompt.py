"""Does the ControlNet's reading of the prompt cost the identity's look? Pose control of one
identity with the ControlNet given another text than the UNet (a forward pre-hook on the
ControlNet replaces the conditional half of its text conditioning):

- ``full``: the same prompt as the UNet (what diffusers does);
- ``noscene``: the prompt without its scene phrase ("<cc-char> a creature");
- ``plain``: "a creature" (no identity tokens, no scene);
- ``empty``: the unconditional text, as for the guidance's other half.

    python research/apps/control_prompt.py IDENTITY '["full", "noscene", "empty"]' \
        [--lora-scale 1.2] [--until 0.8] [--seed S] [--reference ...] [--sheet OUT.png]

20 poses × 4 seeds, read by the pose probe (as `pose_settings.py`).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from pose_settings import drawing_setup  # type: ignore[import-not-found]

from consistent_char.control import ControlledGenerator
from consistent_char.usage import prompt_with_identity


class TextSwappedControl(ControlledGenerator):
    """`ControlledGenerator` whose ControlNet reads `control_prompts[i]` for image i."""

    def __init__(self, *args: Any, mode: str, control_prompts: list[str], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.mode, self.control_prompts = mode, control_prompts
        self._hook: Any = None

    def _call_kwargs(self, start: int, stop: int) -> dict[str, Any]:
        kwargs = super()._call_kwargs(start, stop)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.mode == "full":
            return kwargs
        pipe = self.pipeline
        if self.mode != "empty":
            with torch.no_grad():
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt=self.control_prompts[start:stop],
                    device=pipe.unet.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                )

        def swap(module: Any, args: Any, kw: dict[str, Any]) -> Any:
            hidden, added = kw["encoder_hidden_states"], dict(kw["added_cond_kwargs"])
            half = hidden.shape[0] // 2
            if self.mode == "empty":
                new, new_pooled = hidden[:half], added["text_embeds"][:half]
            else:
                new, new_pooled = embeds.to(hidden.dtype), pooled.to(hidden.dtype)
            kw["encoder_hidden_states"] = torch.cat([hidden[:half], new])
            added["text_embeds"] = torch.cat([added["text_embeds"][:half], new_pooled])
            kw["added_cond_kwargs"] = added
            return args, kw

        self._hook = pipe.controlnet.register_forward_pre_hook(swap, with_kwargs=True)
        return kwargs


def main() -> None:
    args, bench, controlnet, prompts = drawing_setup(
        'a JSON list of "full", "noscene", "plain", "empty"'
    )
    ident = bench.identity
    for mode in json.loads(args.settings):
        others = {
            "noscene": [prompt_with_identity(ident, "a creature")] * len(prompts),
            "plain": ["a creature"] * len(prompts),
        }.get(mode, prompts)
        controlled = TextSwappedControl(
            bench.gen.pipeline,
            controlnet,
            mode=mode,
            control_prompts=others,
            identity_until=args.until,
            identity_in_controlnet=True,
            **{**bench.gen.settings.model_dump(), "lora_scale": args.lora_scale},
        )
        try:
            images = controlled.generate(prompts, bench.seeds, ident, control_images=bench.maps)
        finally:
            if controlled._hook is not None:
                controlled._hook.remove()
        label = f"{mode} lora {args.lora_scale} until {args.until}"
        print(bench.report(label, images, sheet=args.sheet), flush=True)


if __name__ == "__main__":
    main()
