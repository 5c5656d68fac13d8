"""Every example runs: in its --tiny mode (tiny random models built from configs, CPU), and the
loop examples on ToyWorld (the shipped model) with --quick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str, cwd: Path, mode: str = "--tiny") -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        # Tiny models: more threads only add contention.
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), mode, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("embedder", ["clip", "dino"])
def test_swap_embedder(embedder, tmp_path):
    out = _run("swap_embedder.py", "--embedder", embedder, "--out", "run", cwd=tmp_path)
    assert f"iteration 0: {embedder} spread" in out
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["finished"] and len(state["history"]) == 2


def test_existing_pipeline(tmp_path):
    out = _run("existing_pipeline.py", "--images", "images", cwd=tmp_path)
    assert "the pipeline is clean again" in out
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["0.png", "1.png"]


def test_custom_clusterer(tmp_path):
    out = _run("custom_clusterer.py", cwd=tmp_path)
    assert "conformance checks" in out and "iteration 1: clusters" in out


def test_two_characters(tmp_path):
    out = _run("two_characters.py", "--out", "scene.png", cwd=tmp_path)
    assert "cc_fox" in out and "cc_owl" in out
    assert (tmp_path / "scene.png").is_file()


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("swap_embedder.py", ("--embedder", "dino", "--out", "run"), "iteration 0: dino spread"),
        ("existing_pipeline.py", ("--images", "images"), "the pipeline is clean again"),
        ("custom_clusterer.py", (), "iteration 1: clusters"),
    ],
)
def test_examples_on_toyworld(script, args, expected, tmp_path):
    out = _run(script, *args, cwd=tmp_path, mode="--quick")
    assert expected in out
