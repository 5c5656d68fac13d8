"""End to end on a tiny SDXL-architecture pipeline and a tiny DINOv2, both loaded from folders
with the real `from_pretrained` code: the CLI, and resume after a cut on the real stages."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from consistent_char import ExtractorConfig, Identity, IterativeIdentityExtractor
from consistent_char.cli import app
from consistent_char.testing.tiny import tiny_dinov2, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_sdxl_pipeline(seed=0, directory=root / "sdxl")
    tiny_dinov2(seed=0, directory=root / "dinov2")
    return root


def settings(models, **extra) -> dict:
    return {
        "model": str(models / "sdxl"),
        "device": "cpu",
        "num_images": 8,
        "d_size_c": 4,
        "d_min_c": 2,
        "max_iterations": 2,
        "generator.num_inference_steps": 2,
        "embedder.model": str(models / "dinov2"),
        "refiner.steps": 3,
        "refiner.batch_size": 2,
        "refiner.initializer_token": "creature",
        "refiner.lora_lr": 1e-3,
        **extra,
    }


def test_cli_extract_then_generate(models, tmp_path):
    run = tmp_path / "run"
    args = ["extract", "a creature", "--out", str(run), "--quiet"]
    for key, value in settings(models).items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    state = json.loads((run / "state.json").read_text())
    why = "converged" if state["converged"] else "stopped: max_iterations reached"
    assert f"done: 2 iterations ({why})" in result.output
    assert state["finished"] and len(state["history"]) == 2
    assert len(list((run / "iter_001" / "images").glob("*.png"))) == 8
    identity = Identity.load(run / "identity")
    assert identity.clip_l.shape == (1, 32) and identity.clip_g.shape == (1, 48)
    assert identity.metadata["base_model"] == str(models / "sdxl")
    assert (run / "report.html").is_file()

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["generate", str(run / "identity"), "a creature in the snow", "{token} at night"]
        + ["--out", str(out), "--steps", "2", "--device", "cpu", "-n", "2"],
    )
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 4
    assert f"{identity.token} a creature in the snow" in result.output
    assert f"{identity.token} at night" in result.output


def test_cli_reports_bad_inputs_before_loading(models, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(
        app, ["extract", "a creature", "--out", str(tmp_path / "r"), "--model", "./no/such/model"]
    )
    assert missing.exit_code == 2 and "model folder not found: ./no/such/model" in missing.output
    bad = runner.invoke(
        app, ["extract", "a creature", "--out", str(tmp_path / "r"), "--set", "num_images=3"]
    )
    assert bad.exit_code == 2 and "K = num_images // d_size_c = 3 // 20 = 0" in bad.output
    unknown = runner.invoke(
        app, ["extract", "a creature", "--out", str(tmp_path / "r"), "--set", "refiner.rank=3"]
    )
    assert unknown.exit_code == 2 and "refiner.rank: unknown key" in unknown.output
    not_identity = runner.invoke(app, ["generate", str(tmp_path), "x", "--out", str(tmp_path)])
    assert not_identity.exit_code == 2 and "not an identity directory" in not_identity.output


class Cut(Exception):
    pass


def test_resume_after_iteration_1_refine_matches_an_uninterrupted_run(models, tmp_path):
    config = ExtractorConfig.from_overrides(
        settings(models, max_iterations=3, **{"convergence.d_conv_relative": 0.001})
    )
    reference = IterativeIdentityExtractor.from_config(config).extract(
        "a creature", run_dir=tmp_path / "ref"
    )

    def cut_after_refine_1(event):
        if event.kind == "stage_end" and event.stage == "refine" and event.iteration == 1:
            raise Cut

    with pytest.raises(Cut):
        IterativeIdentityExtractor.from_config(config).extract(
            "a creature", run_dir=tmp_path / "cut", callback=cut_after_refine_1
        )
    resumed = IterativeIdentityExtractor.from_config(config).extract(
        "a creature", run_dir=tmp_path / "cut", resume=True
    )

    assert reference.iterations == resumed.iterations == 3
    a, b = reference.identity, resumed.identity
    assert torch.equal(a.clip_l, b.clip_l) and torch.equal(a.clip_g, b.clip_g)
    assert a.lora is not None and b.lora is not None and a.lora.keys() == b.lora.keys()
    assert all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    # The identity really changed over the iterations (the comparison is not vacuous).
    first = Identity.load(tmp_path / "ref" / "iter_000" / "identity")
    assert not torch.equal(first.clip_l, a.clip_l)
