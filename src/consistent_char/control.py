"""Pose control: an identity drawn through diffusers' SDXL ControlNet pipeline.

The identity is learned on the base model; a ControlNet made for that base model steers where
and how the character is drawn (the paper's pose control). The ControlNet pipeline is built
from the base pipeline's own components, so applying the identity to it is applying it to the
base model::

    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=controlnet)
    Identity.load(identity_dir).apply_to(pipe)
    image = pipe("<cc-char> on a beach", image=pose_image).images[0]

`ControlledGenerator` does the same as an `SDXLGenerator` (one seed per image, the identity
applied for one call only), with one control image per image or one for all.

An identity's LoRA is learned from the loop's own images, where the character stands as the
base model draws it. Under a ControlNet that asks for another pose, the LoRA pulls the
character back towards that learned pose, and does so in the last, low-noise steps, after the
layout and the look are decided (measured in ToyWorld, see docs/applications.md).
`identity_until` switches the LoRA off for those steps; the identity's tokens act throughout.
A ControlNet is a copy of the UNet's down and middle blocks: `identity_in_controlnet` applies
the identity's LoRA to that copy too, so that the control branch reads the character as the
UNet does. Without the LoRA, a base model that has only drawn the character in a few poses
still pulls it back a little in those last steps; `late_control_scale` lets the ControlNet
steer harder there.

How strongly the LoRA may act without pulling the character out of the asked poses differs
from one identity to the next. `choose_lora_scale` picks it per identity: the strongest of a
few scales whose drawings an annotator (OpenPose for photographs, ToyWorld's pose reader for
its creatures) reads as close to their control images as drawings of the prompt alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from consistent_char.errors import (
    InputFileError,
    InputNotFoundError,
    InvalidValueError,
    UserError,
)
from consistent_char.generators.sdxl import SDXLGenerator

__all__ = [
    "ControlledGenerator",
    "ControlNetMismatchError",
    "LoraScaleChoice",
    "check_controlnet_fits",
    "choose_lora_scale",
    "control_error",
    "control_pipeline",
    "load_control_image",
    "load_controlnet",
]

# The UNet settings a ControlNet copies from its base model: where they differ, its residuals
# do not fit the UNet's blocks, or it reads other text or time conditioning.
_MATCHING = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


class ControlNetMismatchError(UserError, ValueError):
    """The ControlNet was not made for the base model's UNet."""


def load_controlnet(
    id_or_local_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    """Loads a diffusers ``ControlNetModel`` (hub id, local folder, or ``"toy"`` for ToyWorld's
    pose ControlNet), on `device`, in `dtype` (default: float32)."""
    from diffusers import ControlNetModel

    from consistent_char.stages import resolve_model

    path = resolve_model(str(id_or_local_dir), kind="controlnet")
    model = ControlNetModel.from_pretrained(path, torch_dtype=dtype or torch.float32)
    return model.to(device).eval()


def check_controlnet_fits(pipeline: Any, controlnet: Any) -> None:
    """Raises `ControlNetMismatchError` naming the first UNet setting in which `controlnet`
    differs from `pipeline`'s UNet (a ControlNet for another base model)."""
    unet, own = pipeline.unet.config, controlnet.config
    for name in _MATCHING:
        a, b = _normalised(unet.get(name)), _normalised(own.get(name))
        if a != b:
            raise ControlNetMismatchError(
                f"the ControlNet does not match the base model: its {name} is {b}, the "
                f"UNet's is {a}"
            )


def _normalised(value: Any) -> Any:
    # Configs keep tuples and lists, and one number for "the same in every block".
    return list(value) if isinstance(value, (list, tuple)) else value


def control_pipeline(pipeline: Any, controlnet: Any) -> Any:
    """An SDXL ControlNet pipeline sharing `pipeline`'s components (nothing is copied)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    check_controlnet_fits(pipeline, controlnet)
    if (controlnet.device, controlnet.dtype) != (pipeline.unet.device, pipeline.unet.dtype):
        controlnet.to(device=pipeline.unet.device, dtype=pipeline.unet.dtype)
    parts = {k: v for k, v in pipeline.components.items() if k != "controlnet"}
    return StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet)


def load_control_image(path: str | os.PathLike[str]) -> Image.Image:
    """Reads a control image (any format PIL reads) as RGB.

    Raises:
        InputNotFoundError: No such file.
        InputFileError: The file is not an image.
    """
    file = Path(path)
    if not file.is_file():
        raise InputNotFoundError(f"control image not found: {file}")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise InputFileError(f"control image {file} is not an image ({err})") from None


class ControlledGenerator(SDXLGenerator):
    """An `SDXLGenerator` whose images follow control images through a ControlNet.

    Args:
        pipeline: The base SDXL pipeline (its components are shared with the ControlNet one).
        controlnet: A ``ControlNetModel`` made for the pipeline's UNet.
        control_scale: How strongly the ControlNet steers (``controlnet_conditioning_scale``).
        identity_until: The fraction of the denoising steps in which an identity's LoRA acts
            (at `lora_scale`); in the steps after it the LoRA's scale is 0. 1 keeps it on
            throughout. Below 1 the LoRA is never fused (its scale changes within a call).
        identity_in_controlnet: Also apply the identity's LoRA (at the same scale, switched
            with it) to the ControlNet's modules that copy the UNet's, for each call only.
        late_control_scale: The ControlNet's scale in the steps after `identity_until`, once
            the identity's LoRA is off (default: `control_scale`); needs `identity_until`
            below 1. Calls without an identity's LoRA steer at `control_scale` throughout.
        **settings: `SDXLGenerator`'s settings.

    Example:
        >>> gen = ControlledGenerator(pipe, controlnet, num_inference_steps=20)  # doctest: +SKIP
        >>> prompts = ["<cc-char> a creature"]
        >>> gen.generate(prompts, [0], identity, control_images=[pose])  # doctest: +SKIP
    """

    def __init__(
        self,
        pipeline: Any,
        controlnet: Any,
        *,
        control_scale: float = 1.0,
        identity_until: float = 1.0,
        identity_in_controlnet: bool = False,
        late_control_scale: float | None = None,
        **settings: Any,
    ) -> None:
        if not control_scale >= 0:
            raise InvalidValueError(f"control_scale must be >= 0, got {control_scale}")
        if late_control_scale is not None and not late_control_scale >= 0:
            raise InvalidValueError(f"late_control_scale must be >= 0, got {late_control_scale}")
        if not 0 < identity_until <= 1:
            raise InvalidValueError(f"identity_until must be in (0, 1], got {identity_until}")
        if late_control_scale is not None and identity_until == 1:
            raise InvalidValueError(
                "late_control_scale acts in the steps after identity_until: set identity_until "
                "below 1"
            )
        super().__init__(control_pipeline(pipeline, controlnet), **settings)
        if self.devices is not None:
            raise InvalidValueError(
                "pose control draws on one device: leave generator.devices unset"
            )
        self.control_scale = float(control_scale)
        self.identity_until = float(identity_until)
        self.identity_in_controlnet = bool(identity_in_controlnet)
        self.late_control_scale = (
            self.control_scale if late_control_scale is None else float(late_control_scale)
        )
        self._controls: list[Image.Image] = []
        self._switched_adapter: str | None = None  # the LoRA switched off late in each call
        self._late = False  # whether this call's steps are past identity_until

    def generate(  # type: ignore[override]
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        identity: Any = None,
        *,
        control_images: Sequence[Image.Image] | Image.Image,
        callback: Any = None,
    ) -> list[Image.Image]:
        """`SDXLGenerator.generate` with a control image per prompt (or one for all)."""
        if isinstance(control_images, Image.Image):
            controls = [control_images] * len(prompts)
        else:
            controls = list(control_images)
        if len(controls) != len(prompts):
            raise InvalidValueError(
                f"need one control image per prompt (or one for all): got {len(controls)} for "
                f"{len(prompts)} prompts"
            )
        self._controls = [im.convert("RGB") for im in controls]
        if identity is not None and identity.lora is not None and self.identity_until < 1:
            self._switched_adapter = identity.adapter_name
        late = None
        if self._switched_adapter and self.late_control_scale != self.control_scale:
            late = self.pipeline.controlnet.register_forward_pre_hook(
                self._late_scale, with_kwargs=True
            )
        try:
            return super().generate(prompts, seeds, identity, callback=callback)
        finally:
            self._controls, self._switched_adapter, self._late = [], None, False
            if late is not None:
                late.remove()

    def _late_scale(self, module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """A forward pre-hook on the ControlNet: past `identity_until`, it steers at
        `late_control_scale` instead of the `control_scale` the pipeline passes."""
        if self._late:
            kwargs["conditioning_scale"] = self.late_control_scale
        return args, kwargs

    @contextlib.contextmanager
    def applied(self, identity: Any) -> Iterator[None]:
        """`SDXLGenerator.applied`, and with `identity_in_controlnet` the identity's LoRA in the
        ControlNet for the block."""
        with super().applied(identity), self._in_controlnet(identity):
            yield

    @contextlib.contextmanager
    def _in_controlnet(self, identity: Any) -> Iterator[None]:
        """Copies the identity's LoRA, as applied to the UNet, into the ControlNet's modules of
        the same names, and puts the ControlNet's own modules back after the block."""
        if not self.identity_in_controlnet or identity is None or identity.lora is None:
            yield
            return
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        unet, net, name = self.pipeline.unet, self.pipeline.controlnet, identity.adapter_name
        lora = {n: p for n, p in unet.named_parameters() if ".lora_" in n and f".{name}." in n}
        own = dict(net.named_modules())
        targets = sorted({n.split(".lora_")[0] for n in lora} & own.keys())
        if any(isinstance(own[t], LoraLayer) for t in targets):
            raise InvalidValueError("the ControlNet already has LoRA layers: remove them first")
        config = LoraConfig(
            r=identity.lora_rank, lora_alpha=identity.lora_alpha, target_modules=targets
        )
        # peft freezes the model it injects into and notes its config on it: both are undone.
        trainable = {n: p.requires_grad for n, p in net.named_parameters()}
        had_config = "peft_config" in vars(net)
        inject_adapter_in_model(config, net, adapter_name=name)
        try:
            with torch.no_grad():
                for n, param in net.named_parameters():
                    if n in lora:
                        param.copy_(lora[n])
            for module in net.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale(name, self.lora_scale)
            yield
        finally:
            for target in targets:  # peft's layers replaced these modules: put them back
                parent, _, child = target.rpartition(".")
                setattr(net.get_submodule(parent), child, net.get_submodule(target).base_layer)
            for n, param in net.named_parameters():
                param.requires_grad_(trainable[n])
            if had_config:
                net.peft_config.pop(name, None)
            else:
                vars(net).pop("peft_config", None)

    @contextlib.contextmanager
    def _fused(self, identity: Any) -> Iterator[None]:
        if self._switched_adapter:  # the scale changes within a call: keep peft's LoRA layers
            yield
        else:
            with super()._fused(identity):
                yield

    def _call_kwargs(self, start: int, stop: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "image": self._controls[start:stop],
            "controlnet_conditioning_scale": self.control_scale,
        }
        if self._switched_adapter:
            kwargs["callback_on_step_end"] = self._identity_switch(self._switched_adapter)
        return kwargs

    def _identity_switch(self, adapter: str) -> Any:
        """A diffusers step callback: the identity's LoRA at `lora_scale` until
        `identity_until` of the call's steps are done, at 0 after them (and the ControlNet at
        `late_control_scale`)."""
        from peft.tuners.lora import LoraLayer

        models = (self.pipeline.unet, self.pipeline.controlnet)
        layers = [
            m
            for model in models
            for m in model.modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A
        ]
        for layer in layers:  # the previous call left it off
            layer.set_scale(adapter, self.lora_scale)
        self._late = False

        def switch(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if step + 1 == max(1, round(self.identity_until * pipe.num_timesteps)):
                for layer in layers:
                    layer.set_scale(adapter, 0.0)
                self._late = True
            return kwargs

        return switch


@dataclass(frozen=True)
class LoraScaleChoice:
    """The LoRA scale `choose_lora_scale` chose, and the errors it chose by."""

    scale: float
    #: The annotator's error (`control_error`) of the drawings at each scale tried, strongest
    #: first; the scales after the chosen one are not drawn.
    errors: dict[float, float]
    #: The same error for the prompts without the identity: how closely the ControlNet alone
    #: (at ``control_scale`` in every step) makes the base model follow these control images.
    plain_error: float
    #: The most a chosen scale's error may be: ``plain_error * (1 + tolerance)``.
    bound: float


def control_error(
    images: Sequence[Image.Image],
    control_images: Sequence[Image.Image],
    annotator: Callable[[list[Image.Image]], Sequence[Image.Image]],
) -> float:
    """How far drawings are from their control images, as `annotator` reads them: the mean
    absolute difference, in [0, 1], between the annotator's control images of the drawings and
    the asked ones, both in grey and blurred by a 32nd of their width, so that a near miss
    costs less than a far one.

    Example:
        >>> from PIL import Image
        >>> same = [Image.new("RGB", (64, 64), (255, 255, 255))]
        >>> control_error(same, same, lambda images: images)
        0.0
    """
    read = list(annotator(list(images)))
    if len(read) != len(control_images):
        raise InvalidValueError(
            f"the annotator returned {len(read)} images for {len(control_images)} drawings"
        )

    def soft(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        grey = image.convert("L").resize(size, Image.Resampling.BILINEAR)
        blurred = grey.filter(ImageFilter.GaussianBlur(size[0] / 32))
        return np.asarray(blurred, dtype=np.float64) / 255.0

    return float(
        np.mean(
            [
                np.abs(soft(r, asked.size) - soft(asked, asked.size)).mean()
                for r, asked in zip(read, control_images, strict=True)
            ]
        )
    )


def choose_lora_scale(
    generator: ControlledGenerator,
    identity: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    control_images: Sequence[Image.Image],
    annotator: Callable[[list[Image.Image]], Sequence[Image.Image]],
    *,
    scales: Sequence[float] = (1.5, 1.2, 1.0),
    tolerance: float = 0.05,
) -> LoraScaleChoice:
    """Picks the identity's LoRA scale for drawing through `generator`'s ControlNet.

    A LoRA learned from the loop's images pulls the character towards the poses it was learned
    in, and how hard depends on the identity. So this draws `prompts` (without the identity's
    token: they are put in as `consistent_char.usage.prompt_with_identity` does) under
    `control_images` once without the identity, then with it at each scale, strongest first,
    and takes the first scale whose `control_error` is within `tolerance` of the drawings
    without it; where none is, the strongest within `tolerance` of the least error among the
    scales. Calibrate on control images the later drawings (or an evaluation) do not use, and
    keep `generator`'s other settings as they will be drawn with: its ``lora_scale`` is put
    back afterwards. The drawings without the identity steer at ``control_scale`` throughout
    (``late_control_scale`` acts only once an identity's LoRA is switched off), so a
    ``control_scale`` well below the late one loosens the bound.

    Raises:
        InvalidValueError: No scales, a negative or non-finite scale or tolerance, an identity
            without a LoRA, or not one seed and one control image per prompt.

    Example:
        >>> choice = choose_lora_scale(
        ...     gen, identity, ["a creature in a forest"], [0], [pose], annotate
        ... )  # doctest: +SKIP
        >>> gen.lora_scale = choice.scale  # doctest: +SKIP
    """
    from consistent_char.usage import prompt_with_identity

    tried = [float(s) for s in scales]
    if not tried or not all(np.isfinite(s) and s >= 0 for s in tried):
        raise InvalidValueError(f"scales must be one or more finite numbers >= 0, got {scales}")
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise InvalidValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if getattr(identity, "lora", None) is None:
        raise InvalidValueError("the identity has no LoRA: there is no scale to choose")
    if not len(prompts) == len(seeds) == len(control_images) > 0:
        raise InvalidValueError(
            f"need one seed and one control image per prompt: got {len(prompts)} prompts, "
            f"{len(seeds)} seeds, {len(control_images)} control images"
        )
    controls = list(control_images)
    plain = generator.generate(list(prompts), list(seeds), None, control_images=controls)
    plain_error = control_error(plain, controls, annotator)
    bound = plain_error * (1 + tolerance)
    with_identity = [prompt_with_identity(identity, p) for p in prompts]
    errors: dict[float, float] = {}
    own = generator.lora_scale
    try:
        for scale in sorted(tried, reverse=True):
            generator.lora_scale = scale
            drawn = generator.generate(
                with_identity, list(seeds), identity, control_images=controls
            )
            errors[scale] = control_error(drawn, controls, annotator)
            if errors[scale] <= bound:
                return LoraScaleChoice(scale, errors, plain_error, bound)
    finally:
        generator.lora_scale = own
    # None follows as well as the prompt alone. Where the scales follow about equally, a weaker
    # one buys no following and costs look: the strongest near the least error is kept.
    least = min(errors.values())
    chosen = next(s for s, e in errors.items() if e <= least * (1 + tolerance))
    return LoraScaleChoice(chosen, errors, plain_error, bound)
