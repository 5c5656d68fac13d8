"""Refinement through a ControlNet: each training image's denoising loss is computed with the
ControlNet's residuals for that image's own control image (e.g. its pose, read by an
annotator).

Why: the identity's LoRA learns whatever its training images share. The loop's images of one
character can share a pose too (in ToyWorld they all stand centred and upright), and then the
LoRA learns that pose with the look and pulls every drawing back to it, against a ControlNet
asking for another. With the ControlNet in the loss, each training image's pose is already
explained by the ControlNet's residuals, and the LoRA is left to learn the look. The
ControlNet is frozen and no gradient flows through it.

Set by ``refiner.controlnet`` (the ControlNet) and ``refiner.control_annotator``
(``"module:function"``: a function from a list of PIL images to their control images, e.g.
``consistent_char.toy.pose:annotate`` for ToyWorld's pose ControlNet).

Example:
    >>> load_annotator("consistent_char.toy.pose:annotate").__name__
    'annotate'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from consistent_char.errors import InvalidValueError

__all__ = ["Annotator", "TrainingControl", "load_annotator"]

#: Turns training images into their control images (one each, any size: they are resized).
Annotator = Callable[[list[Image.Image]], Sequence[Image.Image]]


def load_annotator(path: str) -> Annotator:
    """The function ``"module:function"`` names.

    Raises:
        InvalidValueError: Not of that form, the module does not import, or it has no such
            function.
    """
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise InvalidValueError(
            f"refiner.control_annotator must read 'module:function', got {path!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InvalidValueError(
            f"refiner.control_annotator {path!r}: cannot import {module_name!r} ({err})"
        ) from err
    function = getattr(module, name, None)
    if not callable(function):
        raise InvalidValueError(
            f"refiner.control_annotator {path!r}: {module_name} has no function {name!r}"
        )
    return function  # type: ignore[no-any-return]


class TrainingControl:
    """A frozen ControlNet, the annotator of its control images and its scale in the loss."""

    def __init__(
        self, controlnet: Any, annotator: Annotator, scale: float = 1.0, vae_scale_factor: int = 8
    ) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self.controlnet = controlnet.requires_grad_(False).eval()
        self.annotator, self.scale = annotator, scale
        # What diffusers' SDXL ControlNet pipelines feed the ControlNet: RGB in [0, 1], resized
        # the same way, so training sees the control images that drawing will.
        self.processor = VaeImageProcessor(
            vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    @classmethod
    def load(cls, pipeline: Any, controlnet: str, annotator: str, scale: float) -> TrainingControl:
        """Loads `controlnet` (a folder, a hub id or ``"toy"``) beside `pipeline`'s UNet
        (its device and dtype) and checks that it was made for that UNet."""
        from consistent_char.control import check_controlnet_fits, load_controlnet

        function = load_annotator(annotator)
        unet = pipeline.unet
        model = load_controlnet(controlnet, device=unet.device, dtype=unet.dtype)
        check_controlnet_fits(pipeline, model)
        return cls(model, function, scale, pipeline.vae_scale_factor)

    def control_images(
        self, images: Sequence[Image.Image], height: int, width: int
    ) -> torch.Tensor:
        """The annotator's control images of `images` as ``(N, 3, height, width)`` in [0, 1], on
        the ControlNet's device."""
        maps = list(self.annotator(list(images)))
        if len(maps) != len(images):
            raise ValueError(
                f"the control annotator returned {len(maps)} control images for {len(images)} "
                "training images"
            )
        pixels = self.processor.preprocess(maps, height=height, width=width)
        return pixels.to(self.controlnet.device, torch.float32)

    def residuals(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        control: torch.Tensor,
    ) -> dict[str, Any]:
        """The UNet keywords that add the ControlNet's residuals (computed without gradient)."""
        with torch.no_grad():
            down, mid = self.controlnet(
                noisy,
                timesteps,
                encoder_hidden_states=prompt_embeds.detach(),
                controlnet_cond=control.to(noisy.dtype),
                conditioning_scale=self.scale,
                added_cond_kwargs={k: v.detach() for k, v in added_cond_kwargs.items()},
                return_dict=False,
            )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
