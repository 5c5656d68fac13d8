"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import os

# No test may reach a model hub: loaders must find everything on disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per process: the suite runs on two xdist workers, and tiny models gain nothing from
# intra-op threads (oversubscribed, they were many times slower here).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SDXL pipeline saved to a folder, for tests of the real loading path."""
    from consistent_char.testing import tiny_sdxl_pipeline

    directory = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl_pipeline(seed=0, directory=directory)
    return directory


@pytest.fixture
def mask_latents(monkeypatch):
    """The latent masks diffusers' SDXL inpainting pipeline blends with, as it prepares them
    (filled as the test draws)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    used = []
    prepare = StableDiffusionXLInpaintPipeline.prepare_mask_latents

    def spy(self, *args, **kwargs):
        mask, masked = prepare(self, *args, **kwargs)
        used.append(mask)
        return mask, masked

    monkeypatch.setattr(StableDiffusionXLInpaintPipeline, "prepare_mask_latents", spy)
    return used


def pytest_collection_modifyitems(config, items):
    """Skips the `gpu` tier where no CUDA device is visible, with the reason in the summary."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (select with `pytest -m gpu` on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_pipeline_loading(monkeypatch):
    """Makes loading an SDXL pipeline fail the test: for checks that must refuse before it."""

    def no_loading(*args, **kwargs):
        raise AssertionError("a pipeline loaded before the settings were checked")

    monkeypatch.setattr("consistent_char.generators.sdxl.load_sdxl_pipeline", no_loading)
