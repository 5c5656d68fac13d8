"""Shared test set-up: offline, deterministic, small."""

from __future__ import annotations

import os

# No test may reach a model hub: loaders must find everything on disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

# One thread per process: the suite runs on two xdist workers, and tiny models gain nothing from
# intra-op threads (oversubscribed, they were many times slower here).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skips the `gpu` tier where no CUDA device is visible, with the reason in the summary."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (select with `pytest -m gpu` on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
