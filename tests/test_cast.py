"""``consistent-char cast`` on ToyWorld at its smallest: a cast of one subject equals an extract,
a cast resumes (finished subjects skipped, a cut run continued), a failed subject is recorded
while the rest go on; bad inputs end in one line and exit 2; the built-in ConsiStory+ set."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from consistent_char import ExtractorConfig, Identity, IterativeIdentityExtractor
from consistent_char.cast import CastRecord, load_subjects, run_folder_names
from consistent_char.cli import app
from consistent_char.rundir import RunLock

# ToyWorld at its smallest: 10 images, 2 denoising and 2 refine steps.
TINY = {
    "num_images": 10,
    "d_size_c": 5,
    "d_min_c": 2,
    "core_size": 2,
    "max_iterations": 2,
    "generator.num_inference_steps": 2,
    "refiner.steps": 2,
}


def _subjects_file(path: Path, subjects: list[str]) -> Path:
    path.write_text(yaml.safe_dump({"settings": ["in a forest"], "subjects": subjects}))
    return path


def _cast(subjects_file: Path, out: Path, **extra):
    args = ["cast", str(subjects_file), "--out", str(out), "--model", "toy", "--quiet"]
    for key, value in {**TINY, **extra}.items():
        args += ["--set", f"{key}={value}"]
    return CliRunner().invoke(app, args)


def _same_identity(a: Identity, b: Identity) -> bool:
    assert a.lora is not None and b.lora is not None
    return (
        torch.equal(a.clip_l, b.clip_l)
        and torch.equal(a.clip_g, b.clip_g)
        and a.lora.keys() == b.lora.keys()
        and all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    )


class Cut(Exception):
    pass


def test_cast_resumes_skips_finished_subjects_and_equals_extract(tmp_path):
    out = tmp_path / "cast"
    first = _cast(_subjects_file(tmp_path / "one.yaml", ["a creature"]), out)
    assert first.exit_code == 0, first.output
    done_state = (out / "a-creature" / "state.json").stat().st_mtime_ns

    # A second subject's run, cut after iteration 0's refinement, waits in the cast folder.
    config = ExtractorConfig.from_overrides(TINY, base={"model": "toy"})

    def cut(event):
        if event.kind == "stage_end" and event.stage == "refine" and event.iteration == 0:
            raise Cut

    with pytest.raises(Cut):
        IterativeIdentityExtractor.from_config(config).extract(
            "a red creature", run_dir=out / "a-red-creature", callback=cut
        )
    cut_image = (out / "a-red-creature" / "iter_000" / "images" / "0000.png").stat().st_mtime_ns

    three = ["a creature", "a red creature", "a round creature"]
    subjects = _subjects_file(tmp_path / "three.yaml", three)
    second = _cast(subjects, out)
    assert second.exit_code == 0, second.output
    assert "[1/3] 'a creature': 2 iterations" in second.output
    assert "(finished before)" in second.output and "done: 3 subjects" in second.output
    # The finished run was not touched; the cut one continued from its files.
    assert (out / "a-creature" / "state.json").stat().st_mtime_ns == done_state
    red = out / "a-red-creature"
    assert (red / "iter_000" / "images" / "0000.png").stat().st_mtime_ns == cut_image

    record = json.loads((out / "cast.json").read_text())
    assert record["prompt_set"] == str(subjects)
    entries = {e["subject"]: e for e in record["subjects"]}
    assert entries["a red creature"]["run"] == "a-red-creature"
    for entry in entries.values():
        assert entry["status"] == "done" and entry["error"] is None
        assert entry["iterations"] == 2 and isinstance(entry["converged"], bool)
    assert entries["a red creature"]["seconds"] > 0

    # Its runs were made with these settings: other ones are refused before anything loads.
    other = _cast(subjects, out, **{"refiner.steps": 3})
    assert other.exit_code == 2 and other.output.count("error:") == 1
    assert "was run with other settings; differing fields: refiner.steps" in other.output

    # A cast's subject is exactly what `extract SUBJECT --out` learns, also when it is not the
    # first that the cast's process extracted (the models are loaded once per process).
    args = ["extract", "a round creature", "--out", str(tmp_path / "alone"), "--model", "toy"]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    alone = CliRunner().invoke(app, [*args, "--quiet"])
    assert alone.exit_code == 0, alone.output
    assert _same_identity(
        Identity.load(out / "a-round-creature" / "identity"),
        Identity.load(tmp_path / "alone" / "identity"),
    )


def test_a_failed_subject_is_recorded_and_the_rest_go_on(tmp_path):
    out = tmp_path / "cast"
    subjects = _subjects_file(tmp_path / "s.yaml", ["a creature", "a red creature"])
    # Another writer holds the first subject's run folder.
    (out / "a-creature").mkdir(parents=True)
    with RunLock(out / "a-creature"):
        result = _cast(subjects, out, max_iterations=1)
    assert result.exit_code == 1, result.output
    assert "[1/2] 'a creature': failed:" in result.output
    assert "1 of 2 subjects done, 1 failed" in result.output
    record = CastRecord.read(out)
    failed, done = record.subjects
    assert failed.status == "failed" and "being written by another run" in (failed.error or "")
    assert done.status == "done" and (out / done.run / "identity" / "identity.json").is_file()

    # A config.yaml that is not this cast's is not ours to remove: the subject fails again.
    (out / "a-creature" / "config.yaml").write_text("model: toy\n")
    kept = _cast(subjects, out, max_iterations=1)
    assert kept.exit_code == 1, kept.output
    assert (out / "a-creature" / "config.yaml").read_text() == "model: toy\n"
    # As a writer killed between its config.yaml and its state.json leaves it: not a run yet.
    shutil.copy(out / done.run / "config.yaml", out / "a-creature" / "config.yaml")
    again = _cast(subjects, out, max_iterations=1)
    assert again.exit_code == 0, again.output
    assert [r.status for r in CastRecord.read(out).subjects] == ["done", "done"]
    assert "'a red creature': 1 iterations (not converged) → a-red-creature (finished before)" in (
        again.output
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-set"], "no-such-set is neither a built-in prompt set (consistory+) nor a"),
        (["missing.yaml"], "missing.yaml is neither a built-in prompt set"),
        (["bad.yaml"], "bad.yaml is not a prompt set: a prompt set needs at least one subject"),
        (["good.yaml", "--set", "num_images=3"], "K = num_images // d_size_c = 3 // 20 = 0"),
        (["good.yaml", "--out", "busy"], "busy exists and is not a cast folder"),
        (["good.yaml", "--ray", " "], "--ray needs 'auto' or a cluster address"),
        (["good.yaml", "--max-retries", "1"], "--max-retries: Ray task settings, which apply"),
    ],
)
def test_cast_bad_inputs_end_in_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text("subjects: []\n")
    _subjects_file(Path("good.yaml"), ["a creature"])
    Path("busy").mkdir()
    Path("busy", "notes.txt").write_text("mine")
    if "--out" not in args:
        args = [*args, "--out", "cast"]
    result = CliRunner().invoke(app, ["cast", *args])
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and message in result.output
    assert "Traceback" not in result.output
    assert not Path("cast").exists() and Path("busy", "notes.txt").read_text() == "mine"


def test_ray_missing_is_one_line_and_exit_2(tmp_path, monkeypatch):
    import consistent_char.cast.ray_backend as ray_backend

    monkeypatch.setattr(ray_backend, "ray_available", lambda: False)
    subjects = _subjects_file(tmp_path / "s.yaml", ["a creature"])
    result = CliRunner().invoke(
        app, ["cast", str(subjects), "--out", str(tmp_path / "c"), "--ray", "auto"]
    )
    assert result.exit_code == 2, result.output
    assert "error: --ray needs Ray, which is not installed: pip install" in result.output


def test_consistory_plus_is_built_in_with_its_licence(tmp_path):
    folder = resources.files("consistent_char") / "data" / "consistory_plus"
    assert "MIT License" in (folder / "LICENSE").read_text()
    assert "1Prompt1Story" in (folder / "README.md").read_text()
    # Counted from the yaml itself: one subject per distinct "{style} {subject}", whose
    # frames are every setting listed for it.
    data = yaml.safe_load((folder / "consistory+.yaml").read_text())
    frames: dict[str, set[str]] = {}
    for entries in data.values():
        for e in entries:
            frames.setdefault(f"{e['style']} {e['subject']}", set()).update(e["settings"])

    prompts, source = load_subjects("consistory+")
    assert source == "consistory+"
    assert len(prompts.subjects) == len(frames) == 184
    assert sum(len(s.settings) for s in prompts.subjects) == sum(map(len, frames.values()))
    phoenix = prompts.subjects[0]
    name = "A fiery and majestic illustration of A phoenix with bright orange feathers"
    assert phoenix.name == name
    assert prompts.prompts(phoenix)[0] == (
        "rising from a fiery ashes",
        f"{name} rising from a fiery ashes",
    )
    names = run_folder_names([s.name for s in prompts.subjects])
    assert len(set(names)) == len(names) and all(len(n) <= 60 for n in names)


def test_run_folder_names_are_slugs_made_distinct_by_a_hash():
    same = "a " + "very " * 20
    names = run_folder_names(["A Fox!", same + "long fox", same + "long cat"])
    assert names[0] == "a-fox"
    assert names[1] != names[2] and names[1][:53] == names[2][:53]
    assert run_folder_names([same + "long cat", same + "long fox"]) == names[:0:-1]
