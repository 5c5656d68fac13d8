"""``consistent-char eval toy-apps``: both applications measured on ToyWorld's model, with what
results.json holds, and the inputs it refuses before any model loads."""

from __future__ import annotations

import json

import pytest
from diffusers import StableDiffusionXLPipeline
from typer.testing import CliRunner

import consistent_char.toy as toy
from consistent_char.cli import app
from consistent_char.eval.apps import (
    PAPER_RECIPE,
    TARGETS,
    AppsSettings,
    apps_table,
    extraction_overrides,
    run_toy_apps,
)
from consistent_char.testing.tiny import tiny_identity
from consistent_char.toy.pose import POSE
from consistent_char.toy.world import SCENES


@pytest.fixture(scope="module")
def toy_identity(tmp_path_factory):
    """A random identity that fits the toy model (what is measured here is the bookkeeping)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(toy.model_dir())
    identity = tiny_identity(pipe, "<cc-char>", seed=3, scale=0.05)
    identity.metadata = {"base_model": "toy", "prompt": "a creature"}
    return identity.save(tmp_path_factory.mktemp("identity") / "identity")


def test_both_applications_are_measured_into_results(toy_identity, tmp_path):
    settings = AppsSettings("test", edits_per_scene=1, poses=2, images_per_pose=1,
                            reference_per_scene=1, identity_until=0.9,
                            identity_in_controlnet=True, late_control_scale=2.0,
                            lora_scale="auto", calibration_poses=1)  # fmt: skip
    lines: list[str] = []
    results = run_toy_apps(
        settings, tmp_path, identity_dir=toy_identity, device="cpu", say=lines.append
    )
    edit, pose = results["local_edit"], results["pose_control"]
    assert list(edit["per_scene"]) == list(SCENES)
    assert all(row["n"] == 1 for row in edit["per_scene"].values())
    # Outside the mask the input is composited back: every pixel within 2/255.
    assert edit["outside_unchanged"] == 1.0
    assert set(edit["baseline"]["per_scene"]) == set(SCENES)
    for way in ("controlnet", "no_controlnet"):
        for who in ("identity", "plain_prompt"):
            row = pose[way][who]
            for figure in ("control_followed", "identity_kept"):
                assert 0.0 <= row[figure] <= 1.0
            # Every field followed is needed to follow the pose.
            assert list(row["fields_followed"]) == list(POSE)
            assert row["control_followed"] <= min(row["fields_followed"].values())
    assert pose["poses"] == 2 and pose["images_per_pose"] == 1
    assert results["settings"]["identity_until"] == 0.9
    assert results["settings"]["identity_in_controlnet"] is True
    assert results["settings"]["late_control_scale"] == 2.0
    # The LoRA scale is chosen on one calibration pose, and the evaluation draws at it.
    choice = pose["lora_scale_choice"]
    assert choice["calibration_images"] == 1
    assert pose["lora_scale"] == choice["scale"] and f"{choice['scale']:g}" in choice["errors"]
    assert choice["bound"] >= choice["plain_error"] >= 0
    assert set(results["targets"]) == set(TARGETS)
    for t in results["targets"].values():
        assert t["met"] == (t["value"] >= t["target"])
    assert (tmp_path / "edit_sheet.png").is_file() and (tmp_path / "pose_sheet.png").is_file()
    # The stand-in identity says nothing of its loop; a loop's own identity says how it ended.
    assert results["identity"]["converged"] is None
    table = apps_table(results)
    assert "converg" not in table
    for converged, words in ((True, "(its loop converged)"), (False, "before converging")):
        with_loop = {**results, "identity": {**results["identity"], "converged": converged}}
        assert words in apps_table(with_loop)
    assert "then the ControlNet at 2" in table
    assert f"LoRA at {choice['scale']:g} (chosen on 1 calibration images" in table
    assert table.count("\n| ") >= len(SCENES) + 4 + len(TARGETS)
    assert any(line.startswith("pose control:") for line in lines)


def test_toy_apps_refuses_bad_input_in_one_line_before_loading(tmp_path):
    user_file = tmp_path / "mine"
    user_file.mkdir()
    (user_file / "results.json").write_text(json.dumps({"mine": True}))
    cases = [
        (["--out", str(tmp_path / "a"), "--identity", str(tmp_path / "nowhere")], "identity"),
        (["--out", str(user_file)], "not a result of consistent-char eval"),
        (["--out", str(tmp_path / "b"), "--device", "tpu9"], "not a torch device"),
        (["--out", str(tmp_path / "c"), "--identity-until", "1.5"], "must be in (0, 1]"),
        (
            ["--out", str(tmp_path / "f"), "--paper", "--late-control-scale", "2"],
            "after --identity-until",
        ),
        (
            ["--out", str(tmp_path / "i"), "--identity-until", "1", "--late-control-scale", "2"],
            "after --identity-until",
        ),
        (["--out", str(tmp_path / "g"), "--lora-scale", "strong"], "a number >= 0 or 'auto'"),
        (["--out", str(tmp_path / "h"), "--lora-scale", "-1"], ">= 0"),
        (["--out", str(tmp_path / "d"), "--set", "refiner.nonsense=1"], "nonsense"),
        (
            ["--out", str(tmp_path / "e"), "--identity", str(user_file), "--set", "seed=1"],
            "--set configures the extraction",
        ),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["eval", "toy-apps", *args])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.output
    assert json.loads((user_file / "results.json").read_text()) == {"mine": True}


def test_a_lora_scale_other_than_a_number_or_auto_is_refused():
    with pytest.raises(ValueError, match="'auto'"):
        AppsSettings("test", 1, 1, 1, 1, lora_scale="strong")


def test_the_overrides_configure_the_extraction(tmp_path, monkeypatch):
    from consistent_char.extractor import IterativeIdentityExtractor
    from consistent_char.toy.pose import REFINE_THROUGH_CONTROLNET

    built = []

    class Built(Exception):
        pass

    def from_config(config):
        built.append(config)
        raise Built

    monkeypatch.setattr(IterativeIdentityExtractor, "from_config", staticmethod(from_config))
    overrides = {f"refiner.{k}": v for k, v in REFINE_THROUGH_CONTROLNET.items()}
    settings = AppsSettings("test", 1, 1, 1, 1)
    with pytest.raises(Built):
        run_toy_apps(settings, tmp_path, overrides=overrides, device="cpu", say=lambda _: None)
    (config,) = built
    assert config.refiner.controlnet == "toy"
    assert config.refiner.control_annotator == REFINE_THROUGH_CONTROLNET["control_annotator"]
    assert config.model == "toy"


def _cli_settings(monkeypatch, tmp_path, *args):
    """The settings and extraction overrides ``eval toy-apps ARGS`` hands to `run_toy_apps`."""
    import consistent_char.eval.apps as apps

    seen = {}

    class Seen(Exception):
        pass

    def run(settings, out, *, identity_dir, overrides, device, say):
        seen.update(settings=settings, overrides=extraction_overrides(settings, overrides))
        raise Seen

    monkeypatch.setattr(apps, "run_toy_apps", run)
    result = CliRunner().invoke(app, ["eval", "toy-apps", "--out", str(tmp_path / "o"), *args])
    # The command stops on the stand-in's exception, after it has seen what it was handed.
    assert "unexpected Seen" in result.output and seen, result.output
    return seen["settings"], seen["overrides"]


def test_toy_apps_poses_the_identity_the_measured_way_unless_told_the_papers(monkeypatch, tmp_path):
    from consistent_char.toy.pose import REFINE_THROUGH_CONTROLNET

    through = {f"refiner.{k}": v for k, v in REFINE_THROUGH_CONTROLNET.items()}
    settings, overrides = _cli_settings(monkeypatch, tmp_path)
    assert (settings.identity_until, settings.lora_scale) == (0.85, "auto")
    assert settings.identity_in_controlnet is True and settings.late_control_scale == 2.0
    assert overrides == through
    settings, overrides = _cli_settings(monkeypatch, tmp_path, "--paper", "--set", "seed=3")
    for name, value in PAPER_RECIPE.items():
        assert getattr(settings, name) == value, name
    assert overrides == {"seed": 3}
    # Each option given replaces its default, under either recipe.
    settings, _ = _cli_settings(
        monkeypatch, tmp_path, "--paper", "--identity-until", "0.9", "--lora-scale", "1.2",
        "--identity-in-controlnet", "--late-control-scale", "3",
    )  # fmt: skip
    assert (settings.identity_until, settings.lora_scale) == (0.9, 1.2)
    assert settings.identity_in_controlnet is True and settings.late_control_scale == 3.0
    settings, _ = _cli_settings(
        monkeypatch, tmp_path, "--no-identity-in-controlnet", "--identity-until", "1"
    )
    assert settings.identity_in_controlnet is False and settings.lora_scale == "auto"
    # A late scale means nothing when the identity acts in every step: the default one goes.
    assert settings.identity_until == 1.0 and settings.late_control_scale is None
    # A refiner ControlNet of the user's own is kept.
    mine = {"refiner.controlnet": "mine", "refiner.control_annotator": "my.poses:annotate"}
    sets = [arg for k, v in mine.items() for arg in ("--set", f"{k}={v}")]
    _, overrides = _cli_settings(monkeypatch, tmp_path, *sets)
    assert overrides == mine


def test_toy_apps_help_names_the_defaults_the_settings_have():
    text = CliRunner().invoke(app, ["eval", "toy-apps", "--help"], terminal_width=200).output
    text = " ".join(text.replace("│", " ").split())
    defaults = AppsSettings("x", 1, 1, 1, 1)
    assert f"default {defaults.identity_until:g};" in text
    assert f"default {defaults.lora_scale};" in text
    assert f"default {defaults.late_control_scale:g};" in text
    assert "(default yes;" in text and defaults.identity_in_controlnet
