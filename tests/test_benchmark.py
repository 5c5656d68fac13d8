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
import torch

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


def _run_tiny(out: Path, *flags: str) -> tuple[dict[str, Any], dict[str, Any]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", *flags, "--out", str(out)],
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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    return _run_tiny(tmp_path_factory.mktemp("bench") / "iteration.json", "--no-compile")


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
        # Which configuration the best figure came from: the default path, or one to switch on.
        assert isinstance(summary["targets"][target]["best_from"], str)
    skipped = {s["part"]: s["reason"] for s in result["skipped"]}
    assert skipped == {
        "compile": "--no-compile",
        "refine_graphed": "needs CUDA",
        "refine_graphed_no_autocast": "needs CUDA",
    }
    check = result["naive_check"]
    for key in ("reference_style_s_per_image", "naive_style_s_per_image"):
        assert check[key] > 0
    assert check["unet_batch2_ms_no_grad"] > 0 and check["unet_batch2_ms_inference_mode"] > 0
    assert summary["iteration_speedup_reference_style_naive"] > 0
    # Without autocast on the CPU is the CPU's default: the same training.
    assert result["refine_no_autocast"]["against_main_fit"] == {
        "rows_max_relative": 0.0,
        "lora_max_relative": 0.0,
    }
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


def test_compile_parts_time_the_compiled_refiner_and_generation(tmp_path: Path) -> None:
    result, _ = _run_tiny(
        tmp_path / "compiled.json", "--compile", "--skip-naive", "--no-variants",
        "--no-refine-batches",
    )  # fmt: skip
    assert result["complete"] is True and result["errors"] == [], result["errors"]
    assert not {"compile", "refine_compiled"} & {s["part"] for s in result["skipped"]}
    refine = result["refine_compiled"]
    assert refine["graphs_compiled"] >= 1  # the refiner compiled its blocks for training
    assert refine["s_per_step"] > 0 and refine["eager_s_per_step"] > 0
    assert refine["per_step_speedup_vs_eager"] > 0 and refine["compile_s"] >= 0
    assert refine["refinement_s_at_defaults"] > 0
    compiled = result["compiled"]
    assert compiled["compiled_blocks"] >= 1 and compiled["unet_forward"]["ms_per_sample"] > 0


def test_refine_ops_counts_a_training_step_on_the_meta_device() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import refine_ops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = refine_ops.main(["--tiny"])
    plain, lora = result["runs"]
    assert plain["lora_tensors"] == 0 and lora["lora_tensors"] > 0
    assert lora["repeated_blocks"] >= 1
    # The LoRA adds ops in both directions, and the counts add up.
    assert lora["forward_ops"] > plain["forward_ops"] > 0
    assert lora["backward_ops"] > plain["backward_ops"] > 0
    assert lora["step_ops"] == lora["forward_ops"] + lora["backward_ops"]
    assert result["lora_extra_ops_per_step"] == lora["step_ops"] - plain["step_ops"]
    assert 0 < lora["forward_ops_in_repeated_blocks"] < lora["forward_ops"]
    assert result["forward_share_in_repeated_blocks"] == pytest.approx(
        lora["forward_ops_in_repeated_blocks"] / lora["forward_ops"]
    )


def test_refine_variants_with_a_fake_graph(tmp_path: Path, monkeypatch: Any) -> None:
    # The graphed variants run on CUDA only; here a fake graph (tests/fakes.py) stands in, so
    # what is checked is the parts' own code: two refines, the fit, the summary and the check
    # against the main fit, which on the CPU must agree exactly.
    from fakes import fake_cuda_graphs

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import iteration
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    fake_cuda_graphs(monkeypatch)
    monkeypatch.setattr(iteration, "graphs_possible", lambda device: True)
    threads = torch.get_num_threads()
    try:
        result = iteration.main(
            ["--tiny", "--no-variants", "--no-refine-batches", "--no-compile",
             "--out", str(tmp_path / "variants.json")]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert result["complete"] is True and result["errors"] == [], result["errors"]
    assert result["skipped"] == [{"part": "compile", "reason": "--no-compile"}]
    for name in iteration.REFINE_VARIANTS:
        part = result[name]
        assert part["against_main_fit"] == {"rows_max_relative": 0.0, "lora_max_relative": 0.0}
        assert part["steps"] > part["short_refine_steps"] > iteration.CUDA_GRAPH_WARMUP_STEPS
        assert part["s_per_step"] > 0 and part["refinement_s_at_defaults"] > 0
        assert result["summary"]["refine_variants"][name]["iteration_speedup"] > 0
        if "graphed" in name:
            assert part["captured"] is True
            assert any("captured the training step" in m for m in part["refiner_log"])
        else:
            assert "captured" not in part and part["refiner_log"] == []
