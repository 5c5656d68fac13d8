"""The identity's LoRA in the ControlNet at its own scale and for its own share of the steps
(`ControlledGenerator(identity_in_controlnet=True)` switches both networks' LoRA together,
at one scale); ``late_control`` is the library's ``late_control_scale``, the ControlNet's
scale in the steps after the identity's switch.

    python research/apps/controlnet_lora.py IDENTITY '[{"cn_scale": 1.5, "cn_until": 1.0}]' \
        [--lora-scale 1.2] [--until 0.8] [--seed S] [--reference ...] [--sheet OUT.png]

20 poses × 4 seeds, read by the pose probe (as `pose_settings.py`).
"""

from __future__ import annotations

import json
from typing import Any

from peft.tuners.lora import LoraLayer
from pose_settings import drawing_setup  # type: ignore[import-not-found]

from consistent_char.control import ControlledGenerator


class OwnControlNetLora(ControlledGenerator):
    """`ControlledGenerator` whose ControlNet LoRA acts at `cn_scale` until `cn_until` (the
    library's switch, and its `late_control_scale`, act as they do)."""

    def __init__(self, *args: Any, cn_scale: float, cn_until: float, **kw: Any) -> None:
        super().__init__(*args, identity_in_controlnet=True, **kw)
        self.cn_scale, self.cn_until = cn_scale, cn_until

    def _identity_switch(self, adapter: str) -> Any:
        inner = super()._identity_switch(adapter)  # both networks at lora_scale, then off
        net = [
            m
            for m in self.pipeline.controlnet.modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A
        ]
        for layer in net:
            layer.set_scale(adapter, self.cn_scale)

        def switch(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            kwargs = inner(pipe, step, timestep, kwargs)
            past = step + 1 >= max(1, round(self.cn_until * pipe.num_timesteps))
            for layer in net:  # undo the library's switch in the ControlNet, or switch it here
                layer.set_scale(adapter, 0.0 if past else self.cn_scale)
            return kwargs

        return switch


def main() -> None:
    args, bench, controlnet, prompts = drawing_setup(
        'a JSON list of {"cn_scale", "cn_until", "late_control"}'
    )
    for setting in json.loads(args.settings):
        controlled = OwnControlNetLora(
            bench.gen.pipeline,
            controlnet,
            cn_scale=setting.get("cn_scale", args.lora_scale),
            cn_until=setting.get("cn_until", args.until),
            late_control_scale=setting.get("late_control"),
            identity_until=args.until,
            **{**bench.gen.settings.model_dump(), "lora_scale": args.lora_scale},
        )
        images = controlled.generate(
            prompts, bench.seeds, bench.identity, control_images=bench.maps
        )
        label = f"lora {args.lora_scale} until {args.until}, ControlNet {setting}"
        print(bench.report(label, images, sheet=args.sheet), flush=True)


if __name__ == "__main__":
    main()
