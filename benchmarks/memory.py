"""Estimates the peak CUDA memory of refinement on full-size SDXL, without a GPU.

Which settings let the refiner train on a 24 GB card? Measuring that takes a GPU for each setting;
this script estimates it on any machine, from the same code. Every model is built from its config
on PyTorch's ``meta`` device (shapes and dtypes, no data), and the library's own
`TextualInversionLoRARefiner.refine` runs two steps on it (real autograd, peft and optimizer),
while:

* `LiveBytes`, a dispatch mode, counts the bytes of every storage while it is alive, rounded up
  to the CUDA caching allocator's 512-byte blocks, and keeps the peak of each phase (setup, VAE
  encode, training). That is what ``torch.cuda.max_memory_allocated`` reports, less what it
  cannot see: cuBLAS/cuDNN workspaces and the fused attention kernels' own buffers.
* `CudaAutocast`, a function mode, applies CUDA autocast's op lists (from ATen's
  ``autocast_mode.h``) where the refiner would enter ``torch.autocast("cuda", bfloat16)``: norms
  and upsampling run in float32 on CUDA, and their float32 outputs are a large share of the
  activations. CPU autocast's lists differ, so CPU autocast would not do.
* ``scaled_dot_product_attention`` goes to the fused kernel CUDA would pick (flash, or
  memory-efficient for head sizes over 256), which keeps the output and a log-sum-exp for the
  backward; meta's default is the math path, which would hold whole attention matrices.

Host reads of device values (``float(loss)``) read zeros, and data-dependent sizes (a boolean
mask) take their largest value.

The estimate is checked against a GPU measurement where one exists: ``--measured`` takes a JSON of
``benchmarks/iteration.py`` and sets the naive loop's and the library's estimated refinement
peaks against its ``peak_gib_refinement`` figures (the library's at the settings that run had).

Example:
    PYTHONPATH=src python benchmarks/memory.py \\
        --measured benchmarks/results/h200_reduced_2026-11-27.json --out /tmp/memory.json
    PYTHONPATH=src python benchmarks/memory.py --settings default --set refiner.batch_size=3
    PYTHONPATH=src python benchmarks/memory.py --tiny      # the test-sized models (a test runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as fx_config
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
import iteration  # noqa: E402 - the benchmark's SDXL, DINOv2 and tiny configs and naive loop

META = torch.device("meta")
#: The CUDA caching allocator hands out blocks in multiples of 512 bytes.
BLOCK_BYTES = 512
GIB = 2**30

#: Settings estimated by default: ``--set`` overrides of `ExtractorConfig`, and ``encode_pixels``
#: for the refiner's `ENCODE_PIXELS` (8 x 1024² is how it encoded before the pixel bound, and
#: how the H200 run in ``benchmarks/results`` encoded).
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "encode_8_per_call": {"encode_pixels": 8 * 1024 * 1024},
    "batch_2": {"refiner.batch_size": 2},
    "batch_4": {"refiner.batch_size": 4},
    "gradient_checkpointing": {"refiner.gradient_checkpointing": True},
    "gradient_checkpointing_batch_4": {
        "refiner.gradient_checkpointing": True,
        "refiner.batch_size": 4,
    },
}
#: The setting whose estimate is set against a measured library refinement peak.
MEASURED_SETTING = "encode_8_per_call"


# ------------------------------------------------------------------------- counting bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages on `device_type`, and their peak per phase.

    On ``meta`` it also answers what a meta tensor cannot: a read of its value on the host is
    zero and a copy to the CPU is zeros.
    """

    def __init__(self, device_type: str = "meta") -> None:
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.current = 0
        self.phase = "setup"
        self.peaks: dict[str, int] = {}

    def reset(self, phase: str = "setup") -> None:
        """Starts new peaks from what is alive now."""
        self.peaks = {}
        self.enter(phase)

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.current)

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        before = self.phase
        self.enter(phase)
        try:
            yield
        finally:
            self.enter(before)

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=self.current)

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        self.current -= self.live.pop(key, 0)

    def _count(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = -(-storage.nbytes() // BLOCK_BYTES) * BLOCK_BYTES
        self.live[key] = size
        self._refs[key] = weakref.ref(storage, lambda _ref, k=key: self._free(k))
        self.current += size
        if self.current > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.device_type == "meta":
            answer = _answer_for_meta(func, args, kwargs)
            if answer is not NotImplemented:
                return answer
        out = func(*args, **kwargs)
        tree_map(self._count, out)
        return out


def _on_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _answer_for_meta(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """What a GPU would hand the host, as far as memory goes; NotImplemented: run the op."""
    aten = torch.ops.aten
    if func is aten._local_scalar_dense.default and _on_meta(args[0]):
        return False if args[0].dtype == torch.bool else 0
    if func is aten._to_copy.default and _on_meta(args[0]):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu":
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
    if func is aten.copy_.default and not _on_meta(args[0]) and _on_meta(args[1]):
        return args[0]
    return NotImplemented


# --------------------------------------------------------------------- CUDA autocast on meta

#: CUDA autocast's op lists in ATen's autocast_mode.h (torch 2.13), by function name.
TO_BF16 = frozenset({
    "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr",
    "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm",
    "chain_matmul", "linalg_multi_dot", "lstm_cell", "gru_cell", "rnn_tanh_cell",
    "rnn_relu_cell", "scaled_dot_product_attention",
})  # fmt: skip
TO_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "rms_norm",
    "group_norm", "norm", "frobenius_norm", "nuclear_norm", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
})  # fmt: skip
#: float32 unless the call names a dtype.
TO_FP32_UNLESS_DTYPE = frozenset({
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "sum",
})  # fmt: skip
#: To the widest floating input.
PROMOTE = frozenset({
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
    "index_put", "tensordot", "scatter_add",
})  # fmt: skip
ALIASES = {"__matmul__": "matmul", "__rmatmul__": "matmul", "__pow__": "pow", "__rpow__": "pow"}
#: Flash attention's largest head size; larger heads take the memory-efficient kernel.
FLASH_MAX_HEAD = 256


def _castable(t: Any) -> bool:
    return _on_meta(t) and t.is_floating_point() and t.dtype != torch.float64


class CudaAutocast(TorchFunctionMode):
    """``torch.autocast("cuda", bfloat16)`` for meta tensors, inside `region` blocks.

    As CUDA autocast does, it caches the bfloat16 copy of a float32 leaf that needs a gradient
    (a trained weight) until the outermost region ends. Outside a region only attention is
    rerouted (to the fused kernels, as CUDA runs it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self._cache: dict[int, tuple[weakref.ref[Any], torch.Tensor]] = {}
        self.attention: dict[str, int] = {}

    @contextlib.contextmanager
    def region(self, enabled: bool = True) -> Iterator[None]:
        saved = self.depth
        self.depth = saved + 1 if enabled else 0
        try:
            yield
        finally:
            self.depth = saved
            if saved == 0:
                self._cache.clear()

    def _cast(self, t: Any, dtype: torch.dtype) -> Any:
        if not _castable(t) or t.dtype == dtype:
            return t
        cached = dtype == torch.bfloat16 and t.dtype == torch.float32 and t.is_leaf
        cached = cached and t.requires_grad
        if cached and id(t) in self._cache:
            ref, copy = self._cache[id(t)]
            if ref() is t:
                return copy
        out = t.to(dtype)
        if cached:
            self._cache[id(t)] = (weakref.ref(t), out)
        return out

    def _cast_all(self, args: Any, kwargs: dict[str, Any], dtype: torch.dtype) -> Any:
        return tree_map(lambda x: self._cast(x, dtype), (args, kwargs))

    def _attention(self, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        q, k, v = (bound[n] for n in names[:3])
        if self.depth > 0:
            q, k, v = (self._cast(t, torch.bfloat16) for t in (q, k, v))
        if not _on_meta(q):
            return F.scaled_dot_product_attention(*args, **kwargs)
        mask, p = bound.get("attn_mask"), bound.get("dropout_p", 0.0)
        causal, scale = bound.get("is_causal", False), bound.get("scale")
        if mask is None and q.shape[-1] <= FLASH_MAX_HEAD and q.dtype != torch.float32:
            self.attention["flash"] = self.attention.get("flash", 0) + 1
            aten = torch.ops.aten._scaled_dot_product_flash_attention
            return aten(q, k, v, p, causal, False, scale=scale)[0]
        self.attention["memory_efficient"] = self.attention.get("memory_efficient", 0) + 1
        if mask is not None:  # an additive bias of the scores' shape, as the kernel takes it
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=META)
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        aten = torch.ops.aten._scaled_dot_product_efficient_attention
        return aten(q, k, v, mask, grad, p, causal, scale=scale)[0]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        name = ALIASES.get(name, name)
        if name == "scaled_dot_product_attention":
            return self._attention(args, kwargs)
        if self.depth == 0:
            return func(*args, **kwargs)
        if name in TO_BF16:
            args, kwargs = self._cast_all(args, kwargs, torch.bfloat16)
        elif name in TO_FP32:
            args, kwargs = self._cast_all(args, kwargs, torch.float32)
        elif name == "interpolate":  # its upsample_* ops are on the float32 list ("area" is not)
            mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
            if mode != "area":
                args, kwargs = self._cast_all(args, kwargs, torch.float32)
        elif name in TO_FP32_UNLESS_DTYPE:
            first = args[0] if args else None
            named = kwargs.get("dtype") is not None or (
                name in ("softmax", "log_softmax") and len(args) > 2 and args[2] is not None
            )
            if not named and _castable(first) and first.dtype != torch.float32:
                kwargs = {**kwargs, "dtype": torch.float32}
        elif name in PROMOTE:
            floats = [t for t in tree_leaves((args, kwargs)) if _castable(t)]
            if floats:
                wide = any(t.dtype == torch.float32 for t in floats)
                dtype = torch.float32 if wide else floats[0].dtype
                args, kwargs = self._cast_all(args, kwargs, dtype)
        return func(*args, **kwargs)


# ------------------------------------------------------------------- the refiner as on CUDA


class _Region:
    """A reusable stand-in for the refiner's autocast object (it enters the same one every
    step)."""

    def __init__(self, autocast: CudaAutocast) -> None:
        self.autocast = autocast
        self._open: list[contextlib.AbstractContextManager[None]] = []

    def __enter__(self) -> None:
        region = self.autocast.region()
        region.__enter__()
        self._open.append(region)

    def __exit__(self, *exc: Any) -> None:
        self._open.pop().__exit__(*exc)


@contextlib.contextmanager
def as_on_cuda(
    refiner: Any, autocast: CudaAutocast, counter: LiveBytes, encode_pixels: int | None
) -> Iterator[None]:
    """The refiner on meta as it runs on CUDA with ``mixed_precision="auto"``: its autocast is
    `autocast`'s region (so peft's LoRA input casts are off, as under autocast), the LoRA layers
    peft makes on the CPU for meta weights go to meta, gradient checkpointing's recomputation
    runs under the same autocast state, and the VAE encode is its own phase."""
    import torch.utils.checkpoint as checkpoint_module

    from consistent_char.refiners.ti_lora import encoding
    from consistent_char.refiners.ti_lora.state import TRAIN_ADAPTER

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        # A renamed attribute must fail here, not leave the estimate silently unpatched.
        if not hasattr(owner, name):
            raise AttributeError(f"{owner!r} has no {name!r} to patch: update memory.py")
        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    patch(refiner, "_autocast", lambda device, cache=True: _Region(autocast))
    patch(refiner, "_uses_autocast", lambda device: True)
    if encode_pixels is not None:
        patch(encoding, "ENCODE_PIXELS", encode_pixels)

    encode = encoding.encode_images

    def encode_phase(*args: Any, **kwargs: Any) -> Any:
        with counter.during("encode"):
            return encode(*args, **kwargs)

    patch(encoding, "encode_images", encode_phase)

    unet = refiner.pipeline.unet
    add_adapter = unet.add_adapter

    def add_adapter_on_meta(*args: Any, **kwargs: Any) -> Any:
        out = add_adapter(*args, **kwargs)
        for name, p in unet.named_parameters():
            if TRAIN_ADAPTER in name and not _on_meta(p):
                p.data = p.data.to(META)
        return out

    patch(unet, "add_adapter", add_adapter_on_meta)

    checkpoint = checkpoint_module.checkpoint

    def checkpoint_as_on_cuda(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        depth = autocast.depth

        def recomputable(*a: Any, **k: Any) -> Any:
            # The backward's recomputation runs outside every function mode: enter ours again.
            outside = autocast not in _get_current_function_mode_stack()
            with autocast if outside else contextlib.nullcontext(), autocast.region(depth > 0):
                return function(*a, **k)

        return checkpoint(recomputable, *args, **kwargs)

    patch(checkpoint_module, "checkpoint", checkpoint_as_on_cuda)
    try:
        with counter.during("train"):
            yield
    finally:
        for owner, name, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


_MISSING = object()


# ------------------------------------------------------------------------------ estimates


def build(tiny: bool) -> tuple[iteration.Models, iteration.Plan]:
    """Full-size (or tiny) SDXL and DINOv2 on meta, as `iteration.build_models` builds them, and
    the benchmark's plan (its resolution)."""
    argv = ["--device", "meta", "--tiny" if tiny else "--reduced"]
    plan = iteration.make_plan(iteration.parse_args(argv))
    models = iteration.build_models(plan, iteration.Device("meta"), iteration.Clock(None))
    return models, plan


def training_images(n: int, size: int) -> list[Any]:
    from PIL import Image

    return [Image.new("RGB", (size, size), (40 + 5 * i, 90, 160)) for i in range(n)]


def estimate_refine(
    models: iteration.Models,
    counter: LiveBytes,
    autocast: CudaAutocast,
    setting: dict[str, Any],
    images: Sequence[Any],
    steps: int,
) -> dict[str, Any]:
    """The library's refinement (`ExtractorConfig` defaults plus `setting`) on the bf16 models,
    DINOv2 resident as in the benchmark's library path."""
    from consistent_char.config import ExtractorConfig
    from consistent_char.stages import build_refiner

    overrides = dict(setting)
    encode_pixels = overrides.pop("encode_pixels", None)
    cfg = ExtractorConfig.from_overrides(overrides)
    refiner = build_refiner(cfg.refiner, models.pipe, steps=steps, show_progress=False)
    captions = [f"a photo of {refiner.token}"] * len(images)
    counter.reset()
    resident = counter.current
    autocast.attention.clear()
    t0 = time.perf_counter()
    with as_on_cuda(refiner, autocast, counter, encode_pixels):
        refiner.refine(None, images, captions, seed=0)
    return {
        "setting": setting,
        "resident_gib": resident / GIB,
        "peak_gib": counter.peak / GIB,
        "peak_gib_by_phase": {k: v / GIB for k, v in counter.peaks.items()},
        "attention_kernels": dict(autocast.attention),
        "estimate_s": time.perf_counter() - t0,
    }


def estimate_naive(
    models: iteration.Models,
    plan: iteration.Plan,
    counter: LiveBytes,
    images: Sequence[Any],
    steps: int,
) -> dict[str, Any]:
    """The benchmark's naive refinement loop (bf16 SDXL without autocast, fp32 DINOv2)."""
    iteration.set_dtype(models, torch.bfloat16, torch.float32)
    plan = dataclasses.replace(plan, naive_train_steps=steps, warmup_train_steps=0)
    counter.reset("train")
    resident = counter.current
    t0 = time.perf_counter()
    iteration.naive_refine(models, plan, iteration.Device("meta"), images, flops=0.0)
    return {
        "resident_gib": resident / GIB,
        "peak_gib": counter.peak / GIB,
        "estimate_s": time.perf_counter() - t0,
    }


def against_measured(result: dict[str, Any], path: str) -> dict[str, Any]:
    """Estimated against measured refinement peaks of an `iteration.py` run."""
    measured = json.loads(Path(path).read_text())
    paths = measured.get("paths", {})
    out: dict[str, Any] = {"file": path, "device": measured["environment"].get("device_name")}
    pairs = {
        "naive": result.get("naive", {}).get("peak_gib"),
        "library": result["settings"].get(MEASURED_SETTING, {}).get("peak_gib"),
    }
    for name, estimate in pairs.items():
        value = paths.get(name, {}).get("peak_gib_refinement")
        if estimate is None or value is None:
            continue
        out[name] = {
            "estimated_gib": estimate,
            "measured_gib": value,
            "relative_error": (estimate - value) / value,
        }
    return out


# ------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the test-sized models (seconds)")
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS),
                   help="which of SETTINGS to estimate (default: all)")  # fmt: skip
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="an ExtractorConfig override applied to every setting")  # fmt: skip
    p.add_argument("--images", type=int, default=21,
                   help="training images (the defaults' cluster: about 128 / 6)")  # fmt: skip
    p.add_argument("--steps", type=int, default=2,
                   help="refine steps (the second runs with the optimizer's state)")  # fmt: skip
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                   help="also estimate the benchmark's naive refinement loop")  # fmt: skip
    p.add_argument("--measured", help="an iteration.py JSON to set the estimates against")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.images < 1 or args.steps < 2:
        raise SystemExit("--images must be >= 1 and --steps >= 2 (the peak comes with step 2)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common = iteration.parse_overrides(args.set)
    iteration.quiet_libraries()
    t0 = time.perf_counter()
    counter, autocast = LiveBytes(), CudaAutocast()
    result: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "full",
        "method": "meta device: live storage bytes (512-byte blocks), CUDA autocast lists, "
        "fused attention; no cuBLAS/cuDNN workspaces",
        "torch": torch.__version__,
        "images": args.images,
        "steps": args.steps,
        "settings": {},
    }
    # A boolean mask's `nonzero` (the naive loop's row restore) takes its largest size on meta.
    largest = fx_config.patch(meta_nonzero_assume_all_nonzero=True)
    with largest, counter, autocast:
        models, plan = build(args.tiny)
        images = training_images(args.images, plan.resolution)
        iteration.set_dtype(models, torch.bfloat16, torch.bfloat16)  # as the library runs them
        result["weights_gib"] = counter.current / GIB
        for name in args.settings:
            setting = {**SETTINGS[name], **common}
            est = estimate_refine(models, counter, autocast, setting, images, args.steps)
            result["settings"][name] = est
            phases = ", ".join(f"{k} {v:.2f}" for k, v in est["peak_gib_by_phase"].items())
            print(f"{name}: peak {est['peak_gib']:.2f} GiB ({phases})", file=sys.stderr)
        if args.naive:
            result["naive"] = estimate_naive(models, plan, counter, images, args.steps)
            print(f"naive: peak {result['naive']['peak_gib']:.2f} GiB", file=sys.stderr)
    if args.measured:
        result["against_measured"] = against_measured(result, args.measured)
    result["elapsed_s"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
