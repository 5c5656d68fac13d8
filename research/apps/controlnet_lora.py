"""The identity's LoRA in the ControlNet at its own scale and for its own share of the steps
(`ControlledGenerator(identity_in_controlnet=True)` switches both networks' LoRA together,
at one scale); ``late_control`` multiplies the ControlNet's scale in the steps after the
identity's switch.

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
    """`ControlledGenerator` whose ControlNet LoRA acts at `cn_scale` until `cn_until`."""

    def __init__(
        self, *args: Any, cn_scale: float, cn_until: float, late_control: float = 1.0, **kw: Any
    ) -> None:
        super().__init__(*args, identity_in_controlnet=True, **kw)
        self.cn_scale, self.cn_until, self.late_control = cn_scale, cn_until, late_control
        self._late = False
        # After the identity's switch, the ControlNet's residuals are multiplied by late_control.
        self.pipeline.controlnet.register_forward_pre_hook(self._boost, with_kwargs=True)

    def _boost(self, module: Any, args: Any, kw: dict[str, Any]) -> Any:
        if self._late:
            kw["conditioning_scale"] = kw["conditioning_scale"] * self.late_control
        return args, kw

    def _identity_switch(self, adapter: str) -> Any:
        def layers(model: Any) -> list[Any]:
            return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]

        unet, net = layers(self.pipeline.unet), layers(self.pipeline.controlnet)
        for layer in unet:
            layer.set_scale(adapter, self.lora_scale)
        for layer in net:
            layer.set_scale(adapter, self.cn_scale)
        self._late = False

        def switch(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            n = pipe.num_timesteps
            if step + 1 == max(1, round(self.identity_until * n)):
                self._late = True
            for group, until in ((unet, self.identity_until), (net, self.cn_until)):
                if step + 1 == max(1, round(until * n)):
                    for layer in group:
                        layer.set_scale(adapter, 0.0)
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
            late_control=setting.get("late_control", 1.0),
            identity_until=args.until,
            **{**bench.gen.settings.model_dump(), "lora_scale": args.lora_scale},
        )
        images = controlled.generate(
            prompts, bench.seeds, bench.identity, control_images=bench.maps
        )
        controlnet._forward_pre_hooks.clear()
        label = f"lora {args.lora_scale} until {args.until}, ControlNet {setting}"
        print(bench.report(label, images, sheet=args.sheet), flush=True)


if __name__ == "__main__":
    main()
