"""The FAISS build check behind ``clusterer.use_gpu``, with the installed builds made up."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from consistent_char.cli import app
from consistent_char.clusterers import FaissKMeansClusterer, faiss_gpu
from consistent_char.clusterers.faiss_gpu import FaissBuild, check_faiss_gpu, faiss_build
from consistent_char.config import ExtractorConfig
from consistent_char.errors import InvalidValueError


def _build(*names: str, torch_cuda: str | None = "12.8", gpus: int = 1) -> FaissBuild:
    has_gpu = any(name.startswith("faiss-gpu") for name in names)
    return FaissBuild(
        {name: "1.14.1" for name in names}, has_gpu, gpus if has_gpu else 0, torch_cuda
    )


def test_the_installed_build_is_read_from_the_environment():
    build = faiss_build()
    import faiss
    import torch

    assert build.has_gpu == hasattr(faiss, "StandardGpuResources")
    assert build.torch_cuda == torch.version.cuda
    assert any(name.startswith("faiss") for name in build.distributions)


def test_nothing_is_checked_when_no_gpu_is_asked_for():
    assert check_faiss_gpu(_build("faiss-cpu"), use_gpu=False) == []


def test_a_cpu_build_asked_for_the_gpu_is_a_clear_error():
    with pytest.raises(InvalidValueError, match=r"CPU build \(faiss-cpu 1.14.1\)"):
        check_faiss_gpu(_build("faiss-cpu"), use_gpu=True)


def test_a_gpu_build_that_sees_no_gpu_is_a_clear_error():
    with pytest.raises(InvalidValueError, match=r"faiss \(faiss-gpu-cu12 1.14.1\) sees none"):
        check_faiss_gpu(_build("faiss-gpu-cu12", gpus=0), use_gpu=True)


@pytest.mark.parametrize(
    ("names", "torch_cuda", "expected"),
    [
        (("faiss-gpu-cu12",), "12.8", []),
        (("faiss-gpu-cu12",), "12.1", []),
        (("faiss-gpu-cu11",), "11.8", []),
        (("faiss-gpu-cu12",), None, []),  # a CPU torch: nothing to disagree with
        (("faiss-gpu",), "13.0", []),  # no CUDA version in the name: nothing to compare
        (("faiss-gpu-cu12",), "13.0", ["built for CUDA 12 but torch for CUDA 13.0"]),
        (("faiss-gpu-cu11",), "12.8", ["built for CUDA 11 but torch for CUDA 12.8"]),
        (("faiss-cpu", "faiss-gpu-cu12"), "12.8", ["faiss-cpu and faiss-gpu-cu12 are both"]),
    ],
)
def test_warnings_name_a_cuda_mismatch_and_two_builds_in_one_module(names, torch_cuda, expected):
    warnings = check_faiss_gpu(_build(*names, torch_cuda=torch_cuda), use_gpu=True)
    assert len(warnings) == len(expected)
    for warning, start in zip(warnings, expected, strict=True):
        assert start in warning and "docs/gpu.md" in warning


def test_the_clusterer_logs_the_warnings_of_a_usable_build(monkeypatch, caplog):
    monkeypatch.setattr(
        faiss_gpu, "faiss_build", lambda: _build("faiss-gpu-cu12", torch_cuda="13.0")
    )
    with caplog.at_level(logging.WARNING):
        assert FaissKMeansClusterer(use_gpu=True).use_gpu
    assert "built for CUDA 12 but torch for CUDA 13.0" in caplog.text


def test_use_gpu_without_a_gpu_build_stops_the_cli_before_loading(
    monkeypatch, tmp_path, no_pipeline_loading
):
    monkeypatch.setattr(faiss_gpu, "faiss_build", lambda: _build("faiss-cpu"))

    result = CliRunner().invoke(
        app,
        [
            "extract", "a creature", "--model", "toy", "--quiet", "--set", "device=cpu",
            "--out", str(tmp_path / "run"), "--set", "clusterer.use_gpu=true",
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: use_gpu=True needs faiss-gpu")
    assert len(result.output.strip().splitlines()) == 1
    assert ExtractorConfig.from_overrides({"clusterer.use_gpu": True}).clusterer.use_gpu
