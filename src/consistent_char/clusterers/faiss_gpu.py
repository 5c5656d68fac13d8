"""Which FAISS build is installed, and whether it can run k-means on the GPU beside torch.

faiss-cpu (the default dependency) and the GPU builds on PyPI (``faiss-gpu-cu12``,
``faiss-gpu-cu11``: the ``[gpu]`` extra installs the first) all install the same ``faiss``
module, so the one installed last is the one imported. A GPU build carries its own CUDA runtime
(CUDA 12 or 11), which need not be the one torch was built for (`torch.version.cuda`); the
process then loads two CUDA runtimes. `check_faiss_gpu` says what stands in the way of
``clusterer.use_gpu`` and what is merely worth knowing.

Example:
    >>> build = FaissBuild(distributions={"faiss-cpu": "1.15.1"}, has_gpu=False, gpus=0,
    ...                    torch_cuda=None)
    >>> check_faiss_gpu(build, use_gpu=False)
    []
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from dataclasses import dataclass

from consistent_char.errors import InvalidValueError

__all__ = ["FaissBuild", "check_faiss_gpu", "faiss_build"]

logger = logging.getLogger(__name__)

_GPU_BUILD = re.compile(r"faiss-gpu(?:-cu(\d+))?")
#: Where the install and the swap between the builds are written down.
SEE = "see docs/gpu.md"


@dataclass(frozen=True)
class FaissBuild:
    """What is installed: the faiss distributions (name: version), whether the imported module
    has GPU support and how many GPUs it sees, and torch's CUDA version (None: a CPU build)."""

    distributions: dict[str, str]
    has_gpu: bool
    gpus: int
    torch_cuda: str | None

    @property
    def gpu_distributions(self) -> list[str]:
        """The installed faiss GPU builds, e.g. ``["faiss-gpu-cu12"]``."""
        return sorted(d for d in self.distributions if _GPU_BUILD.fullmatch(d))

    @property
    def cuda_major(self) -> int | None:
        """The CUDA major version the installed GPU build targets (its name says: ``-cu12``)."""
        majors = {
            int(m.group(1))
            for d in self.gpu_distributions
            if (m := _GPU_BUILD.fullmatch(d)) and m.group(1)
        }
        return majors.pop() if len(majors) == 1 else None

    def describe(self) -> str:
        """The installed faiss distributions, e.g. ``faiss-cpu 1.15.1``."""
        names = ", ".join(f"{d} {v}" for d, v in sorted(self.distributions.items()))
        return names or "no faiss distribution (a build from source or conda)"


def faiss_build() -> FaissBuild:
    """Reads what is installed: the faiss distributions, the module's GPU support, torch's CUDA."""
    import faiss
    import torch

    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "").lower())
        if name == "faiss" or name.startswith("faiss-"):
            found[name] = dist.version
    has_gpu = hasattr(faiss, "StandardGpuResources")
    gpus = int(faiss.get_num_gpus()) if has_gpu else 0
    return FaissBuild(found, has_gpu, gpus, torch.version.cuda)


def check_faiss_gpu(build: FaissBuild | None = None, *, use_gpu: bool) -> list[str]:
    """What stands between `build` (the installed one by default) and k-means on the GPU.

    Args:
        build: What is installed; ``None`` reads it (`faiss_build`).
        use_gpu: Whether the GPU is asked for (``clusterer.use_gpu``); without it nothing is
            checked.

    Returns:
        Warnings, one sentence each: a GPU build for another CUDA major version than torch's,
        or faiss-cpu installed beside a GPU build (either overwrites the other's module).

    Raises:
        InvalidValueError: The GPU is asked for, but the faiss module has no GPU support or
            sees no GPU.
    """
    if not use_gpu:
        return []
    build = build or faiss_build()
    if not build.has_gpu:
        raise InvalidValueError(
            f"use_gpu=True needs faiss-gpu (a FAISS build with GPU support), but the installed "
            f"faiss module is a CPU build ({build.describe()}): install the [gpu] extra and "
            f"remove faiss-cpu ({SEE}), or set clusterer.use_gpu: false"
        )
    if build.gpus < 1:
        raise InvalidValueError(
            f"use_gpu=True needs a GPU, but faiss ({build.describe()}) sees none: check "
            "CUDA_VISIBLE_DEVICES and the driver, or set clusterer.use_gpu: false"
        )
    warnings = []
    torch_major = int(build.torch_cuda.split(".")[0]) if build.torch_cuda else None
    if build.cuda_major is not None and torch_major not in (None, build.cuda_major):
        warnings.append(
            f"{build.gpu_distributions[0]} is built for CUDA {build.cuda_major} but torch for "
            f"CUDA {build.torch_cuda}: the process loads both CUDA runtimes; install a torch "
            f"build for CUDA {build.cuda_major} or the FAISS GPU build for CUDA {torch_major} "
            f"({SEE})"
        )
    if "faiss-cpu" in build.distributions and build.gpu_distributions:
        warnings.append(
            f"faiss-cpu and {build.gpu_distributions[0]} are both installed and write the same "
            "faiss module: reinstalling either overwrites the other; uninstall faiss-cpu, then "
            f"reinstall {build.gpu_distributions[0]} ({SEE})"
        )
    return warnings
