"""`benchmarks/iteration.py --tiny`: the GPU benchmark's own code, run end to end on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "iteration.py"
STAGES = ("generation", "saving", "embedding", "clustering", "refinement")


def _numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{path}[{i}]")]
    return []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "iteration.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--no-compile", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads(proc.stdout)
    written = json.loads(out.read_text())
    return printed, written


def test_prints_and_writes_the_same_complete_result(tiny_run: Any) -> None:
    printed, written = tiny_run
    assert printed == written
    assert printed["complete"] is True
    assert printed["errors"] == [], printed["errors"]
    assert printed["mode"] == "tiny"


def test_reports_every_stage_of_both_paths(tiny_run: Any) -> None:
    result, _ = tiny_run
    assert result["extrapolated"] is True  # tiny measures fewer units than its "defaults"
    for name in ("library", "naive"):
        path = result["paths"][name]
        assert set(path["stages"]) == set(STAGES)
        for stage in path["stages"].values():
            assert stage["measured_s"] > 0 and stage["s_at_defaults"] > 0
            assert stage["units_measured"] >= 1 and stage["extrapolated"] is True
        assert path["iteration_s_at_defaults"] > 0
        assert path["images_per_s"] > 0 and path["train_steps_per_s"] > 0
        assert path["unet"]["achieved_tflops"] > 0
        assert path["unet"]["fraction_of_matmul_peak"] > 0
        assert path["generation_breakdown"]["unet_s"] > 0
    # The naive loop encodes the prompt once per image, the library once per call.
    naive, library = result["paths"]["naive"], result["paths"]["library"]
    assert naive["generation_breakdown"]["text_encoder_calls"] == result["plan"]["naive_images"]
    assert library["generation_breakdown"]["text_encoder_calls"] == 1


def test_reports_device_ceiling_flops_and_targets(tiny_run: Any) -> None:
    result, _ = tiny_run
    env = result["environment"]
    for key in ("device_name", "torch", "diffusers", "transformers"):
        assert env[key]
    assert result["matmul_peak"]["median_tflops"] > 0
    assert result["unet_flops_per_sample"] > 0
    summary = result["summary"]
    assert summary["iteration_speedup"] > 0
    assert set(summary["stage_speedups"]) == set(STAGES)
    for target in ("iteration_speedup", "unet_fraction_of_peak"):
        assert isinstance(summary["targets"][target]["met"], bool)
        assert summary["targets"][target]["best"] > 0
    assert {s["part"] for s in result["skipped"]} == {"compile"}
    variants = result["unet_variants"]["variants"]
    assert set(variants) >= {"eager", "channels_last", "identity_lora", "identity_lora_fused"}
    assert all("error" not in v for v in variants.values()), variants
    assert result["refine_batches"]["batches"]["4"]["samples_per_s"] > 0


def test_every_number_is_finite_and_not_negative(tiny_run: Any) -> None:
    result, _ = tiny_run
    numbers = _numbers(result)
    assert len(numbers) > 50
    bad = [(p, v) for p, v in numbers if not math.isfinite(v) or v < 0]
    assert not bad, bad
