"""Story illustration: one image per prompt with the identity, a captioned contact sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes import ColourGenerator
from PIL import Image
from typer.testing import CliRunner

from consistent_char.cli import app
from consistent_char.identity import Identity
from consistent_char.story import CONTACT_SHEET, STORY_JSON, contact_sheet, illustrate, read_prompts
from consistent_char.testing import tiny_identity, tiny_sdxl_pipeline


def _colour_identity() -> Identity:
    row = torch.tensor([[200.0, 40.0, 40.0, 5.0]])
    return Identity(
        token="<red>",
        clip_l=row,
        clip_g=torch.cat([row, row], 1),
        metadata={"identity_prompt_template": "a photo of {token}, {prompt}"},
    )


def test_read_prompts_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("# chapter one\n\n{token} wakes up\n   \n  # aside\n{token} meets a fox  \n")
    assert read_prompts(path) == ["{token} wakes up", "{token} meets a fox"]


def test_illustrate_draws_each_prompt_with_the_identity(tmp_path):
    identity = _colour_identity()
    generator = ColourGenerator()
    prompts = ["{token} wakes up in a forest", "at the beach"]
    paths = illustrate(identity, prompts, tmp_path, generator=generator, seed=5)

    assert [p.name for p in paths] == ["000.png", "001.png"]
    (called_prompts, called_identity), *_ = generator.calls
    assert called_identity is identity
    assert called_prompts == ["<red> wakes up in a forest", "a photo of <red>, at the beach"]
    story = json.loads((tmp_path / STORY_JSON).read_text())
    assert [i["seed"] for i in story["images"]] == [5, 6]
    assert [i["prompt"] for i in story["images"]] == prompts

    sheet = Image.open(tmp_path / CONTACT_SHEET)
    # The identity's colour is on the sheet, and so is dark caption text below the images.
    pixels = np.asarray(sheet.convert("RGB")).astype(int)
    assert (np.abs(pixels - [200, 40, 40]).sum(-1) < 120).mean() > 0.1
    assert (pixels.sum(-1) < 150).any()


def test_contact_sheet_layout_and_caption_wrapping():
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    long = "a very long caption " * 8
    sheet = contact_sheet(images, ["one", "two", long], columns=3, cell_size=64)
    one_line = contact_sheet(images, ["one", "two", "three"], columns=3, cell_size=64)
    assert sheet.width == one_line.width == 3 * 64 + 4 * 8
    assert sheet.height > one_line.height  # the long caption wrapped onto more lines
    with pytest.raises(ValueError, match="one caption per image"):
        contact_sheet(images, ["one"])


def test_illustrate_needs_prompts(tmp_path):
    with pytest.raises(ValueError, match="at least one non-empty prompt"):
        illustrate(_colour_identity(), [], tmp_path, generator=ColourGenerator())


@pytest.fixture()
def identity_dir(tmp_path):
    model_dir = tmp_path / "model"
    pipe = tiny_sdxl_pipeline(seed=0, directory=model_dir)
    identity = tiny_identity(pipe, "<fox>", seed=1)
    identity.metadata = {"base_model": str(model_dir)}
    return identity.save(tmp_path / "identity")


def test_story_command_on_a_tiny_sdxl(identity_dir, tmp_path):
    prompts = tmp_path / "story.txt"
    prompts.write_text("# a story\n{token} in the snow\n\na {token} at night\n")
    out = tmp_path / "story"
    args = ["story", str(identity_dir), str(prompts), "--out", str(out), "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--seed", "3"])
    assert result.exit_code == 0, result.output
    # Besides the hidden list of the files it wrote (OutputFolder.MANIFEST):
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "000.png",
        "001.png",
        CONTACT_SHEET,
        STORY_JSON,
    ]
    assert Image.open(out / "000.png").size == (32, 32)


def test_story_command_without_prompts_is_an_error(identity_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["story", str(identity_dir), str(empty), "--out", str(out)])
    assert result.exit_code == 2 and "has no prompts" in result.output
