"""Story illustration: one image per prompt with an identity, and a captioned contact sheet.

    out/
      000.png 001.png ...     one image per prompt, in order
      contact_sheet.png       all of them in a grid, each captioned with its full prompt
      story.json              prompts, full prompts (with the token), seeds and file names

Image j is drawn from seed ``seed + j``, so a story is reproducible and adding a line at the end
leaves the earlier images as they were. The folder may hold other files: a hidden manifest
(`consistent_char.rundir.OutputFolder`) lists the files a story wrote there, no other file is
ever overwritten, and images of an earlier, longer story in the same folder are removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from consistent_char.errors import InputFileError, InputNotFoundError, InvalidValueError
from consistent_char.identity import Identity
from consistent_char.interfaces import Generator
from consistent_char.rundir import OutputFolder, save_png_atomic, write_text_atomic
from consistent_char.usage import prompt_with_identity

__all__ = [
    "CONTACT_SHEET",
    "STORY_JSON",
    "contact_sheet",
    "illustrate",
    "output_names",
    "read_prompts",
]

logger = logging.getLogger(__name__)

CONTACT_SHEET = "contact_sheet.png"
STORY_JSON = "story.json"


def output_names(count: int) -> list[str]:
    """The files `illustrate` writes for `count` prompts, in its output folder.

    Example:
        >>> output_names(2)
        ['000.png', '001.png', 'contact_sheet.png', 'story.json']
    """
    return [f"{j:03d}.png" for j in range(count)] + [CONTACT_SHEET, STORY_JSON]


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The prompts of a story file: one per line; blank lines and ``#`` comments are skipped.

    Example:
        >>> read_prompts("story.txt")  # doctest: +SKIP
        ['{token} wakes up in a forest', '{token} meets a fox']
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputNotFoundError(f"prompts file not found: {path}") from None
    except IsADirectoryError:
        raise InputFileError(
            f"{path} is a folder; give a text file with one prompt per line"
        ) from None
    except UnicodeDecodeError:
        raise InputFileError(
            f"{path} is not UTF-8 text; give a text file with one prompt per line"
        ) from None
    except OSError as err:
        raise InputFileError(f"cannot read {path}: {err.strerror or err}") from None
    prompts = []
    for line in text.splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            prompts.append(text)
    return prompts


def illustrate(
    identity: Identity,
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    generator: Generator | None = None,
    seed: int = 0,
    columns: int | None = None,
    cell_size: int = 256,
) -> list[Path]:
    """Draws one image per prompt with `identity` and writes a captioned contact sheet.

    Args:
        identity: The character to draw.
        prompts: One prompt per image. ``{token}`` marks where the identity goes; a prompt
            without it is wrapped in the run's identity prompt template
            (see `consistent_char.usage.prompt_with_identity`).
        out_dir: Folder for the images, ``contact_sheet.png`` and ``story.json``.
        generator: Draws the images (`Generator` protocol). ``None`` loads an `SDXLGenerator` on
            the identity's base model with the run's settings.
        seed: Image j is drawn from seed ``seed + j``.
        columns: Columns of the contact sheet (``None``: about square).
        cell_size: Width of one image on the contact sheet, in pixels.

    Returns:
        The image paths, one per prompt, in order.

    Raises:
        ValueError: No prompts, or an empty one.
        consistent_char.errors.OutputExistsError: `out_dir` holds a file of the user's with the
            name of an output (checked before anything is drawn).

    Example:
        >>> from consistent_char.story import illustrate
        >>> identity = Identity.load("runs/demo/identity")  # doctest: +SKIP
        >>> paths = illustrate(identity, ["{token} in the snow"], "story/")  # doctest: +SKIP
    """
    # 1. Check inputs, and that no file of the user's would be overwritten
    prompts = [p.strip() if isinstance(p, str) else p for p in prompts]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise InvalidValueError(f"need at least one non-empty prompt, got {list(prompts)!r}")
    full = [prompt_with_identity(identity, p) for p in prompts]
    seeds = [seed + j for j in range(len(prompts))]
    files = output_names(len(prompts))
    names = files[: len(prompts)]
    folder = OutputFolder(out_dir)
    folder.check(files)
    if generator is None:
        from consistent_char.usage import identity_generator

        generator = identity_generator(identity)
    out = Path(out_dir)

    # 2. One image per prompt, image j from seed + j
    images = generator.generate(full, seeds, identity)
    if len(images) != len(prompts):
        raise RuntimeError(f"generator returned {len(images)} images for {len(prompts)} prompts")

    # 3. Write images, the contact sheet and what made them; drop an earlier story's extra images
    folder.claim(files)
    paths = [out / name for name in names]
    for path, image in zip(paths, images, strict=True):
        save_png_atomic(path, image.convert("RGB"))
    save_png_atomic(
        out / CONTACT_SHEET, contact_sheet(images, full, columns=columns, cell_size=cell_size)
    )
    story = _story(identity, seed, paths, prompts, full, seeds)
    write_text_atomic(out / STORY_JSON, json.dumps(story, indent=2) + "\n")
    stale = folder.remove_stale(files)
    if stale:
        logger.info("removed %d images of an earlier story in %s", len(stale), out)
    logger.info("wrote %d images and %s to %s", len(paths), CONTACT_SHEET, out)
    return paths


def _story(
    identity: Identity,
    seed: int,
    paths: Sequence[Path],
    prompts: Sequence[str],
    full: Sequence[str],
    seeds: Sequence[int],
) -> dict[str, Any]:
    """``story.json``: what drew each image (its prompt as given and as drawn, its seed)."""
    return {
        "token": identity.token,
        "seed": seed,
        "images": [
            {"file": p.name, "prompt": prompt, "full_prompt": f, "seed": s}
            for p, prompt, f, s in zip(paths, prompts, full, seeds, strict=True)
        ],
    }


def contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    columns: int | None = None,
    cell_size: int = 256,
    padding: int = 8,
) -> Image.Image:
    """A grid of `images`, each with its caption below it (PIL's default font, wrapped).

    Example:
        >>> from PIL import Image
        >>> sheet = contact_sheet([Image.new("RGB", (64, 64))] * 3, ["a", "b", "c"])
        >>> sheet.size
        (536, 578)
    """
    if len(images) != len(captions):
        raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)}")
    if not images:
        raise ValueError("no images for the contact sheet")
    n = len(images)
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = _line_height(measure, font)
    cells = [_fit(im.convert("RGB"), cell_size) for im in images]
    wrapped = [_wrap(measure, c, font, cell_size) for c in captions]
    image_h = max(c.height for c in cells)
    text_h = max(len(w) for w in wrapped) * line_height
    cell_h = image_h + 4 + text_h
    sheet = Image.new(
        "RGB",
        (cols * cell_size + (cols + 1) * padding, rows * cell_h + (rows + 1) * padding),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for k, (cell, lines) in enumerate(zip(cells, wrapped, strict=True)):
        r, c = divmod(k, cols)
        x = padding + c * (cell_size + padding)
        y = padding + r * (cell_h + padding)
        sheet.paste(cell, (x + (cell_size - cell.width) // 2, y))
        for i, line in enumerate(lines):
            draw.text((x, y + image_h + 4 + i * line_height), line, fill=(20, 20, 20), font=font)
    return sheet


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # PIL's built-in font: no font file to ship or find, the same on every machine.
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _line_height(draw: ImageDraw.ImageDraw, font: Any) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag", font=font)
    return int(bottom - top) + 4


def _fit(image: Image.Image, width: int) -> Image.Image:
    height = max(1, round(image.height * width / image.width))
    # Small images (tiny models, tests) are enlarged without blurring them.
    resample = Image.Resampling.NEAREST if image.width < width else Image.Resampling.LANCZOS
    return image.resize((width, height), resample)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines or [""]
