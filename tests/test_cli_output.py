"""What the command line prints, and what it leaves on disk, on inputs that are not errors: user
text printed literally, the base model named, Ctrl-C's way back, an unexpected error's one line,
no third-party notices, files under the user's umask, no user file replaced."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from consistent_char import generation
from consistent_char.cli import app
from consistent_char.config import DEFAULT_MODEL
from consistent_char.identity import Identity
from consistent_char.rundir import RunDirectory, RunState, write_json_atomic
from consistent_char.testing.tiny import tiny_dinov2, tiny_identity, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    pipe = tiny_sdxl_pipeline(seed=0, directory=root / "sdxl")
    tiny_dinov2(seed=0, directory=root / "dino")
    identity = tiny_identity(pipe, "<tiny>", seed=1)
    identity.metadata = {"base_model": str(root / "sdxl")}
    identity.save(root / "identity")
    return root


def _lines(output: str, prefix: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefix)]


def test_prompts_with_markup_and_emoji_codes_print_literally(models, tmp_path):
    prompt = "[bold red]a fox[/] :cat: {token} [link=x]"
    result = CliRunner().invoke(
        app,
        ["generate", str(models / "identity"), prompt, "--out", str(tmp_path / "out")]
        + ["--steps", "1", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    expected = f"{tmp_path / 'out' / '000_seed0.png'}  ←  [bold red]a fox[/] :cat: <tiny> [link=x]"
    assert expected in result.output.splitlines()


def test_generate_names_the_model_it_loads_and_why(models, tmp_path):
    args = ["generate", str(models / "identity"), "{token}", "--steps", "1", "--device", "cpu"]
    own = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert own.exit_code == 0, own.output
    assert _lines(own.output, "model: ") == [
        f"model: {models / 'sdxl'} (the identity's base model, from its identity.json)"
    ]
    given = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "b"), "--model", str(models / "sdxl")]
    )
    assert given.exit_code == 0, given.output
    assert _lines(given.output, "model: ") == [f"model: {models / 'sdxl'} (given with --model)"]


def test_extract_help_shows_the_default_model():
    result = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert DEFAULT_MODEL in result.output


def test_export_hint_prints_the_lora_tag_literally(models, tmp_path):
    result = CliRunner().invoke(
        app, ["export", str(models / "identity"), "--out", str(tmp_path / "cat.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "<lora:cat:1>" in result.output and "🐱" not in result.output


def test_export_prints_only_its_own_lines(models, tmp_path):
    # A fresh process: transformers' import-time notices (torchvision missing) would show here.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    out = tmp_path / "fox.safetensors"
    code = "from consistent_char.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "export", str(models / "identity"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert [line.split(":")[0] for line in lines] == ["LoRA", "embedding"], lines


def _tiny_run_args(models, out: Path) -> list[str]:
    settings = {
        "model": str(models / "sdxl"),
        "device": "cpu",
        "num_images": 4,
        "d_size_c": 2,
        "d_min_c": 1,
        "max_iterations": 1,
        "generator.num_inference_steps": 1,
        "embedder.model": str(models / "dino"),
        "refiner.steps": 1,
        "refiner.initializer_token": "creature",
    }
    args = ["extract", "a creature", "--out", str(out), "--quiet"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_ctrl_c_in_extract_prints_the_resume_command_and_exits_130(models, tmp_path, monkeypatch):
    run = tmp_path / "my run"
    real = generation._generate_chunk

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "_generate_chunk", interrupted)
    result = CliRunner().invoke(app, _tiny_run_args(models, run))
    assert result.exit_code == 130, result.output
    command = f"consistent-char extract 'a creature' --out '{run}' --resume"
    assert _lines(result.output, "interrupted") == [
        f"interrupted; continue the run with: {command}"
    ]
    assert not (run / ".lock").exists()
    # The printed command continues the run.
    monkeypatch.setattr(generation, "_generate_chunk", real)
    resumed = CliRunner().invoke(app, shlex.split(command)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert (run / "identity" / "identity.json").is_file()


def test_ctrl_c_before_the_run_starts_says_there_is_nothing_to_resume(
    models, tmp_path, monkeypatch
):
    from consistent_char import stages

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "build_stages", interrupted)
    result = CliRunner().invoke(app, _tiny_run_args(models, tmp_path / "run"))
    assert result.exit_code == 130
    assert not (tmp_path / "run").exists()


def test_an_unexpected_error_is_one_line_and_a_traceback_with_verbose(
    models, tmp_path, monkeypatch
):
    from consistent_char.generators import sdxl

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom [red]")

    monkeypatch.setattr(sdxl.SDXLGenerator, "generate", broken)
    args = ["generate", str(models / "identity"), "{token}", "--steps", "1", "--device", "cpu"]
    quiet = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert quiet.exit_code == 1
    assert _lines(quiet.output, "error: ") == [
        "error: unexpected RuntimeError: boom [red] (run with --verbose for the traceback)"
    ]
    assert "Traceback" not in quiet.output
    loud = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--verbose"])
    assert loud.exit_code == 1
    assert "Traceback (most recent call last)" in loud.output and "boom [red]" in loud.output


def test_report_samples_replace_only_the_earlier_samples(models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    RunDirectory(run).write_state(RunState(prompt="a creature", finished=True))
    Identity.load(models / "identity").save(run / "identity")
    (run / "samples").mkdir()
    (run / "samples" / "my-drawing.png").write_bytes(b"mine")
    args = ["report", str(run), "--seed", "0", "--device", "cpu"]
    three = [a for p in ("{token} a", "{token} b", "{token} c") for a in ("--sample", p)]
    first = CliRunner().invoke(app, [*args, *three])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, [*args, "--sample", "{token} in the snow"])
    assert second.exit_code == 0, second.output
    names = sorted(p.name for p in (run / "samples").iterdir() if not p.name.startswith("."))
    assert names == ["000.png", "contact_sheet.png", "my-drawing.png", "story.json"]
    assert (run / "samples" / "my-drawing.png").read_bytes() == b"mine"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(models, tmp_path, umask):
    previous = os.umask(umask)
    try:
        identity_dir = Identity.load(models / "identity").save(tmp_path / "identity")
        write_json_atomic(tmp_path / "state.json", {"a": 1})
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(identity_dir) == 0o777 & ~umask
    assert mode(tmp_path / "state.json") == 0o666 & ~umask
    for path in identity_dir.iterdir():
        assert mode(path) == 0o666 & ~umask, path.name


def test_saving_over_an_identity_keeps_the_users_other_files(models, tmp_path):
    folder = Identity.load(models / "identity").save(tmp_path / "identity")
    (folder / "samples").mkdir()
    (folder / "samples" / "fox.png").write_bytes(b"mine")
    (folder / "README.txt").write_text("notes")
    identity = Identity.load(folder)
    identity.lora = None  # the new identity has no LoRA file: the old one must go
    identity.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.txt",
        "embeddings.safetensors",
        "identity.json",
        "samples",
    ]
    assert (folder / "samples" / "fox.png").read_bytes() == b"mine"
    assert Identity.load(folder).lora is None
    assert [p.name for p in tmp_path.iterdir()] == ["identity"], "a temporary folder was left"


def test_a_full_disk_is_one_line_that_says_what_to_do(models, tmp_path, monkeypatch):
    import errno

    from consistent_char.rundir import files

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_bytes_atomic", full)
    result = CliRunner().invoke(
        app,
        ["generate", str(models / "identity"), "{token}", "--out", str(tmp_path / "out")]
        + ["--steps", "1", "--device", "cpu"],
    )
    assert result.exit_code == 2, result.output
    assert _lines(result.output, "error: ") == [
        f"error: No space left on device: {tmp_path / 'out' / '.consistent-char-files.json'}; "
        "free some space and run the command again (extract: with --resume)"
    ]


@pytest.mark.parametrize(
    ("core_size", "says"),
    [
        (None, "→ cluster 1 (12 images, cohesion 0.880)"),
        (5, "→ cluster 1 (12 images; learns from its densest 5, tightness 0.880)"),
    ],
)
def test_each_iteration_line_says_what_the_refinement_learns_from(core_size, says):
    from rich.console import Console
    from rich.progress import Progress

    from consistent_char.cli import _ProgressPrinter
    from consistent_char.extractor import ProgressEvent
    from consistent_char.interfaces import IterationRecord

    console = Console(record=True, width=200)
    record = IterationRecord(1, "p", [0], 6.8, 6.7, False, cluster_sizes=[3, 12])
    record.chosen_cluster, record.chosen_cohesion = 1, 0.88
    with Progress(console=console) as progress:
        printer = _ProgressPrinter(progress, 8, core_size)
        printer(ProgressEvent("iteration_end", 1, record=record))
    assert f"iteration 1: spread 6.8000 (threshold 6.7000) {says}" in console.export_text()
