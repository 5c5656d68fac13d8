"""The ``edit`` command: an identity drawn into the masked region of an image (Blended Latent
Diffusion, `consistent_char.edit`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from consistent_char.cli.commands import IdentityDrawing
from consistent_char.cli.core import (
    DeviceOption,
    GuidanceOption,
    LoraScaleOption,
    ModelOption,
    NumImagesOption,
    SeedOption,
    StepsOption,
    app,
    check_prompts,
    check_seeds,
    finite,
    setup_logging,
)
from consistent_char.config import EditConfig

_STRENGTH_HELP = EditConfig.model_fields["strength"].description


@app.command()
def edit(
    identity_dir: Annotated[Path, typer.Argument(help="An identity folder (run/identity).")],
    image: Annotated[Path, typer.Argument(help="The image to edit (sides multiples of 8).")],
    prompts: Annotated[
        list[str],
        typer.Argument(help="Prompts; '{token}' marks the identity, else the run's template."),
    ],
    mask_path: Annotated[
        Path,
        typer.Option(
            "--mask", help="Same size as IMAGE: white is redrawn, black kept (grey: at 0.5)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the edited images.")],
    model: ModelOption = None,
    seed: SeedOption = 0,
    num_images: NumImagesOption = 1,
    steps: StepsOption = None,
    guidance_scale: GuidanceOption = None,
    scale: LoraScaleOption = 1.0,
    strength: Annotated[
        float, typer.Option(callback=finite(), help=f"{_STRENGTH_HELP} In (0, 1].")
    ] = EditConfig().strength,
    device: DeviceOption = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Draw the identity into the region of IMAGE that --mask marks; the rest stays unchanged."""
    setup_logging(verbose)
    from consistent_char.edit import binary_mask, blended_edit, check_image, read_image
    from consistent_char.identity import Identity
    from consistent_char.stages import resolve_device

    # 1. Check inputs and outputs before the model loads.
    check_prompts(prompts)
    check_seeds(seed, num_images)
    EditConfig.from_keywords({"strength": strength}, "edit")
    resolve_device(device)
    scene = check_image(read_image(image, "IMAGE"), f"IMAGE {image}")
    mask = read_image(mask_path, "--mask")
    binary_mask(mask, scene.size, f"--mask {mask_path}")
    identity = Identity.load(identity_dir)
    drawing = IdentityDrawing(identity, prompts, seed, num_images, out)

    # 2. Edit and write.
    generator = drawing.generator(model, device, steps, guidance_scale, scale)
    jobs = drawing.jobs
    edited = blended_edit(
        generator,
        [scene] * len(jobs),
        [mask] * len(jobs),
        [p for p, _ in jobs],
        [s for _, s in jobs],
        identity,
        strength=strength,
    )
    drawing.write(edited)
