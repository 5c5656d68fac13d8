"""Which of the identity's LoRA layers may stay on in the last steps of a pose-controlled
drawing? `ControlledGenerator(identity_until=F)` switches every LoRA layer off after the first
F of the steps; here the layers whose names contain one of KEEP stay on at `late_scale`.

    python research/apps/late_layers.py IDENTITY '[{"keep": ["attn2.to_k", "attn2.to_v"]}]' \
        [--seed 0] [--reference ...] [--lora-scale 1.2] [--until 0.8] [--sheet OUT.png]

Each JSON object is one setting: ``keep`` (name fragments) and ``late_scale`` (default: the
LoRA scale). 20 poses × 4 seeds, read by the pose probe, as `pose_settings.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from consistent_char.control import ControlledGenerator

sys.path.insert(0, str(Path(__file__).parent))
from pose_settings import drawing_setup  # noqa: E402


class LateLayers(ControlledGenerator):
    """`ControlledGenerator` whose step switch leaves the layers named in `keep` on."""

    keep: tuple[str, ...] = ()
    late_scale: float = 0.0

    def _identity_switch(self, adapter: str) -> Any:
        from peft.tuners.lora import LoraLayer

        inner = super()._identity_switch(adapter)
        kept = [
            m
            for tag, model in (
                ("unet", self.pipeline.unet),
                ("controlnet", self.pipeline.controlnet),
            )
            for name, m in model.named_modules()
            if isinstance(m, LoraLayer)
            and adapter in m.lora_A
            and any(k in f"{tag}.{name}" for k in self.keep)
        ]

        def switch(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            kwargs = inner(pipe, step, timestep, kwargs)  # every layer off at the switch step
            if step + 1 == max(1, round(self.identity_until * pipe.num_timesteps)):
                for layer in kept:
                    layer.set_scale(adapter, self.late_scale)
            return kwargs

        return switch


def main() -> None:
    args, bench, controlnet, prompts = drawing_setup(
        'a JSON list of {"keep": [...], "late_scale": S}', lora_scale=1.2, until=0.8
    )
    for setting in json.loads(args.settings):
        controlled = LateLayers(
            bench.gen.pipeline,
            controlnet,
            identity_until=args.until,
            identity_in_controlnet=True,
            **{**bench.gen.settings.model_dump(), "lora_scale": args.lora_scale},
        )
        controlled.keep = tuple(setting.get("keep", ()))
        controlled.late_scale = float(setting.get("late_scale", args.lora_scale))
        images = controlled.generate(
            prompts, bench.seeds, bench.identity, control_images=bench.maps
        )
        label = f"LoRA {args.lora_scale} until {args.until}, late {setting}"
        print(bench.report(label, images, sheet=args.sheet), flush=True)


if __name__ == "__main__":
    main()
