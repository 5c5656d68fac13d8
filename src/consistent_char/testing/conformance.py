"""A conformance suite for stages, ours or a user's: scikit-learn's `check_estimator`, for the five
stage protocols of `consistent_char.interfaces`.

Each ``check_*`` function runs named checks against one stage and raises `AssertionError` whose
message starts with the name of the check that failed, e.g.
``[embedder_output_dtype] expected float32 embeddings, got float64``. The same checks come as a
table for pytest:

    >>> import pytest
    >>> from consistent_char.testing.conformance import conformance_cases
    >>> @pytest.mark.parametrize("name, check", conformance_cases(MyEmbedder()))  # doctest: +SKIP
    ... def test_my_embedder(name, check):
    ...     check()

What is checked:

- every stage: the protocol's methods exist; outputs have the promised types, dtypes and shapes;
  the same inputs (and seed) give the same result; inputs are not modified;
- `Embedder`: rows do not depend on the batch they were computed in, nor on its order;
- `Clusterer`: labels in ``[0, k)``, k = 1 and k = N work, well separated blobs are recovered;
- `ConvergenceCriterion`: the spread is a non-negative number that is 0 for identical
  embeddings and grows with scale; ``converged`` agrees with ``spread`` and ``threshold``;
- `Generator`: image j depends on ``seeds[j]`` alone; with an identity, the output changes and
  nothing is left behind (later calls without it draw what they drew before);
- `Refiner`: returns an `Identity` whose widths fit; the same seed gives the same identity; warm
  start keeps the token; for refiners exposing an SDXL ``pipeline``: the pipeline is
  bit-identical afterwards, and, when ``refine`` takes a ``callback`` (called as
  ``callback(step, total, ...)``), at the last training step every tensor the pipeline had
  before is unchanged: only the identity's tensors (new token rows, LoRA) train;
- `Identity`: save/load round trip.

The model-backed checks compare hashes of every parameter and buffer, so they also work on
full-size pipelines, at the cost of reading every weight once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import numbers
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from consistent_char.identity import Identity
from consistent_char.interfaces import (
    Clusterer,
    ConvergenceCriterion,
    Embedder,
    Generator,
    IterationRecord,
    Refiner,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ConformanceCase",
    "check_clusterer",
    "check_convergence_criterion",
    "check_embedder",
    "check_generator",
    "check_identity",
    "check_refiner",
    "check_stage",
    "conformance_cases",
    "sample_blobs",
    "sample_images",
]


class ConformanceCase(NamedTuple):
    """One named check bound to a stage and its inputs; call ``check()`` to run it."""

    name: str
    check: Callable[[], None]


# ----------------------------------------------------------------------------- inputs


def sample_images(
    n: int = 6, *, size: tuple[int, int] = (48, 40), seed: int = 0
) -> list[Image.Image]:
    """`n` distinct RGB images (colour gradients with a random square), non-square on purpose.

    Example:
        >>> [im.size for im in sample_images(2)]
        [(48, 40), (48, 40)]
    """
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for _ in range(n):
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-2, 2, (2, 3))
        pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
        s = max(2, min(w, h) // 3)
        top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        pixels[top : top + s, left : left + s] = rng.uniform(0, 255, 3)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"))
    return images


def sample_blobs(
    n_per_blob: int = 8, n_blobs: int = 3, dim: int = 4, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian blobs: float32 embeddings (N, dim) and their int64 blob labels.

    The centres are at least 10 apart, the points within 0.05 of them: any reasonable
    clusterer with k = n_blobs recovers the blobs.
    """
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(max(n_blobs, dim))[:n_blobs, :dim] * np.sqrt(2)
    if n_blobs > dim:
        centres = rng.normal(0, 1, (n_blobs, dim))
        centres *= 10 / min(
            np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]
        )
    x = np.concatenate([c + rng.normal(0, 0.01, (n_per_blob, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(n_blobs), n_per_blob).astype(np.int64)


# ----------------------------------------------------------------------------- helpers


def _fail(message: str) -> None:
    raise AssertionError(message)


def _named(name: str, fn: Callable[[], None]) -> ConformanceCase:
    def run() -> None:
        try:
            fn()
        except AssertionError as err:
            text = str(err)
            raise AssertionError(
                text if text.startswith(f"[{name}]") else f"[{name}] {text}"
            ) from err
        except Exception as err:
            raise AssertionError(f"[{name}] raised {type(err).__name__}: {err}") from err

    run.__name__ = run.__qualname__ = name
    return ConformanceCase(name, run)


class _Lazy:
    """Memoised zero-argument calls, shared by the checks of one `conformance_cases` table."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]

    def set(self, key: str, value: Any) -> None:
        self._values[key] = value


def _run_all(cases: list[ConformanceCase]) -> list[str]:
    for case in cases:
        case.check()
    return [case.name for case in cases]


def _pixels(images: Sequence[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im).astype(np.int16) for im in images]


def _max_pixel_diff(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> int:
    pa, pb = _pixels(a), _pixels(b)
    if [p.shape for p in pa] != [p.shape for p in pb]:
        return 10**9
    return max((int(np.abs(x - y).max()) for x, y in zip(pa, pb, strict=True)), default=0)


def _image_signature(images: Sequence[Image.Image]) -> list[tuple[str, tuple[int, int], str]]:
    return [(im.mode, im.size, hashlib.sha1(im.tobytes()).hexdigest()) for im in images]


# ------------------------------------------------------------------- pipeline snapshots


def _sdxl_pipeline(stage: Any) -> Any | None:
    """The SDXL pipeline a stage exposes as ``.pipeline`` (or ``.pipe``), if any."""
    for attr in ("pipeline", "pipe"):
        pipe = getattr(stage, attr, None)
        if pipe is not None and all(
            getattr(pipe, n, None) is not None
            for n in ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        ):
            return pipe
    return None


@dataclass
class _Snapshot:
    """Digest of every parameter and buffer of a pipeline's modules (keyed ``component/name``,
    with peft's ``.base_layer`` dropped from names), and flags: requires_grad, training mode,
    adapters, tokenizer sizes."""

    tensors: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)

    def diff(self, other: _Snapshot, limit: int = 5) -> list[str]:
        out = []
        for key in sorted(set(self.tensors) | set(other.tensors)):
            if key not in other.tensors:
                out.append(f"{key} disappeared")
            elif key not in self.tensors:
                out.append(f"{key} appeared")
            elif self.tensors[key] != other.tensors[key]:
                out.append(f"{key} changed")
        for key in sorted(set(self.flags) | set(other.flags)):
            if self.flags.get(key) != other.flags.get(key):
                out.append(f"{key}: {self.flags.get(key)!r} -> {other.flags.get(key)!r}")
        return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _digest(tensor: Any) -> str:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return f"{t.dtype}{tuple(t.shape)}:{hashlib.sha1(raw).hexdigest()}"


def _components(pipe: Any) -> dict[str, Any]:
    components = getattr(pipe, "components", None) or {
        n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    return dict(sorted(components.items()))


def _live_tensors(module: Any, cname: str) -> dict[str, Any]:
    """Parameters and buffers of `module`, keyed ``component/name`` without peft's
    ``.base_layer``."""
    out = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        out[f"{cname}/{name.replace('.base_layer', '')}"] = tensor
    return out


def _snapshot(pipe: Any) -> _Snapshot:
    import torch

    snap = _Snapshot()
    for cname, module in _components(pipe).items():
        if isinstance(module, torch.nn.Module):
            for key, tensor in _live_tensors(module, cname).items():
                snap.tensors[key] = _digest(tensor)
                snap.shapes[key] = tuple(tensor.shape)
                if isinstance(tensor, torch.nn.Parameter):
                    snap.flags[f"{key} requires_grad"] = bool(tensor.requires_grad)
            snap.flags[f"{cname} training"] = bool(module.training)
            peft_config = getattr(module, "peft_config", None)
            snap.flags[f"{cname} adapters"] = sorted(peft_config) if peft_config else []
        elif hasattr(module, "get_vocab"):
            snap.flags[f"{cname} vocab size"] = len(module)
    return snap


# ------------------------------------------------------------------------- embedder


def _embedder_cases(
    emb: Any, images: Sequence[Image.Image] | None, rtol: float, atol: float
) -> list[ConformanceCase]:
    imgs = list(images) if images is not None else sample_images(6)
    if len(imgs) < 3:
        raise ValueError(f"the embedder checks need at least 3 images, got {len(imgs)}")
    n = len(imgs)
    lazy = _Lazy()
    signature = _image_signature(imgs)

    def out() -> Any:
        return lazy.get("out", lambda: emb.embed(imgs))

    def valid() -> np.ndarray:
        e = out()
        if not (isinstance(e, np.ndarray) and e.ndim == 2 and e.shape[0] == n):
            _fail("needs a valid (N, D) output; see embedder_output_type/embedder_output_shape")
        return e

    def close(a: np.ndarray, b: np.ndarray, what: str) -> None:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            _fail(f"{what}: shapes {a.shape} and {b.shape} differ")
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            _fail(
                f"{what}: max abs difference {float(np.abs(a - b).max()):.3g} "
                f"(rtol={rtol}, atol={atol})"
            )

    def protocol() -> None:
        if not isinstance(emb, Embedder):
            _fail(f"{type(emb).__name__} has no embed(images) method")

    def output_type() -> None:
        if not isinstance(out(), np.ndarray):
            _fail(f"embed() must return a numpy array, got {type(out()).__name__}")

    def output_dtype() -> None:
        dtype = getattr(out(), "dtype", None)
        if dtype != np.float32:
            _fail(f"expected float32 embeddings, got {dtype}")

    def output_shape() -> None:
        shape = getattr(out(), "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != n or shape[1] < 1:
            _fail(f"expected shape ({n}, D) with D >= 1 for {n} images, got {shape}")

    def finite() -> None:
        if not np.isfinite(valid()).all():
            _fail("embeddings contain NaN or inf")

    def deterministic() -> None:
        close(emb.embed(imgs), valid(), "the same images embedded twice differ")

    def batch_independent() -> None:
        e = valid()
        close(emb.embed(imgs[:1]), e[:1], "image 0 alone vs in the full batch")
        close(emb.embed(imgs[1:3]), e[1:3], "images 1-2 alone vs in the full batch")

    def order_preserved() -> None:
        close(emb.embed(imgs[::-1]), valid()[::-1], "reversed images vs reversed embeddings")

    def distinguishes_images() -> None:
        e = valid()
        if np.allclose(e, e[:1], rtol=0, atol=0):
            _fail(f"all {n} distinct images got the same embedding")

    def leaves_inputs() -> None:
        out()
        if _image_signature(imgs) != signature:
            _fail("embed() modified its input images")

    return [
        _named("embedder_protocol", protocol),
        _named("embedder_output_type", output_type),
        _named("embedder_output_dtype", output_dtype),
        _named("embedder_output_shape", output_shape),
        _named("embedder_finite", finite),
        _named("embedder_deterministic", deterministic),
        _named("embedder_batch_independent", batch_independent),
        _named("embedder_order_preserved", order_preserved),
        _named("embedder_distinguishes_images", distinguishes_images),
        _named("embedder_does_not_modify_inputs", leaves_inputs),
    ]


def check_embedder(
    emb: Any, images: Sequence[Image.Image] | None = None, *, rtol: float = 1e-4, atol: float = 1e-5
) -> list[str]:
    """Runs the `Embedder` checks; returns the names of the checks that ran.

    Args:
        emb: The embedder.
        images: At least 3 distinct images (default: `sample_images`).
        rtol: Relative tolerance when comparing embeddings of the same image.
        atol: Absolute tolerance when comparing embeddings of the same image. The defaults
            suit CPU float32. On a GPU, another batch size can select other kernels: DINOv2
            ViT-L in float32 on an H100 moved a CLS value by 7e-4 between batch sizes, so
            pass e.g. ``rtol=1e-2, atol=1e-2`` there.

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> from consistent_char.embedders import PixelEmbedder
        >>> "embedder_output_dtype" in check_embedder(PixelEmbedder(size=4))
        True
    """
    return _run_all(_embedder_cases(emb, images, rtol, atol))


# ------------------------------------------------------------------------ clusterer


def _clusterer_cases(
    cl: Any, embeddings: np.ndarray | None, k: int | None, seed: int
) -> list[ConformanceCase]:
    x = sample_blobs()[0] if embeddings is None else np.asarray(embeddings)
    k = k if k is not None else min(3, x.shape[0])
    blobs, blob_truth = sample_blobs()
    n, d = x.shape
    lazy = _Lazy()

    def out() -> Any:
        return lazy.get("out", lambda: cl.cluster(x.copy(), k, seed))

    def valid() -> tuple[np.ndarray, np.ndarray]:
        o = out()
        if not (isinstance(o, tuple | list) and len(o) == 2):
            _fail("needs a (labels, centroids) output; see clusterer_output_types")
        labels, centroids = o
        if not (isinstance(labels, np.ndarray) and labels.shape == (n,)):
            _fail("needs (N,) labels; see clusterer_labels")
        return labels, centroids

    def protocol() -> None:
        if not isinstance(cl, Clusterer):
            _fail(f"{type(cl).__name__} has no cluster(embeddings, k, seed) method")

    def output_types() -> None:
        o = out()
        if not (isinstance(o, tuple | list) and len(o) == 2):
            _fail(f"cluster() must return (labels, centroids), got {type(o).__name__}")
        for what, a in zip(("labels", "centroids"), o, strict=True):
            if not isinstance(a, np.ndarray):
                _fail(f"{what} must be a numpy array, got {type(a).__name__}")

    def labels_ok() -> None:
        labels, _ = out()
        if labels.dtype != np.int64:
            _fail(f"labels must be int64, got {labels.dtype}")
        if labels.shape != (n,):
            _fail(f"labels must have shape ({n},), got {labels.shape}")
        if labels.min() < 0 or labels.max() >= k:
            _fail(f"labels must be in [0, {k}), got values in [{labels.min()}, {labels.max()}]")

    def centroids_ok() -> None:
        _, centroids = out()
        if centroids.dtype != np.float32:
            _fail(f"centroids must be float32, got {centroids.dtype}")
        if centroids.shape != (k, d):
            _fail(f"centroids must have shape ({k}, {d}), got {centroids.shape}")
        if not np.isfinite(centroids).all():
            _fail("centroids contain NaN or inf")

    def deterministic() -> None:
        labels, centroids = valid()
        labels2, centroids2 = cl.cluster(x.copy(), k, seed)
        if not np.array_equal(labels, labels2):
            _fail(f"the same embeddings and seed={seed} gave different labels")
        if not np.array_equal(centroids, centroids2):
            _fail(f"the same embeddings and seed={seed} gave different centroids")

    def leaves_input() -> None:
        copy = x.copy()
        cl.cluster(copy, k, seed)
        if not np.array_equal(copy, x):
            _fail("cluster() modified its input embeddings")

    def k_equals_1() -> None:
        labels, centroids = cl.cluster(blobs.copy(), 1, seed)
        if not (np.asarray(labels) == 0).all():
            _fail("with k=1 every label must be 0")
        if np.asarray(centroids).shape != (1, blobs.shape[1]):
            _fail(f"with k=1 centroids must have shape (1, D), got {np.asarray(centroids).shape}")

    def k_equals_n() -> None:
        m = blobs.shape[0]
        labels, _ = cl.cluster(blobs.copy(), m, seed)
        if len(np.unique(labels)) != m:
            _fail(
                f"with k=N={m} distinct points each must be its own cluster, got "
                f"{len(np.unique(labels))} clusters"
            )

    def separated_blobs() -> None:
        n_blobs = int(blob_truth.max()) + 1
        labels, centroids = cl.cluster(blobs.copy(), n_blobs, seed)
        labels = np.asarray(labels)
        for b in range(n_blobs):
            found = np.unique(labels[blob_truth == b])
            if found.size != 1:
                _fail(
                    f"blob {b} of {n_blobs} well separated blobs was split into labels "
                    f"{found.tolist()}"
                )
        if len({int(labels[blob_truth == b][0]) for b in range(n_blobs)}) != n_blobs:
            _fail(f"{n_blobs} well separated blobs were merged: labels {labels.tolist()}")
        for b in range(n_blobs):
            label = int(labels[blob_truth == b][0])
            mean = blobs[blob_truth == b].mean(axis=0)
            if not np.allclose(np.asarray(centroids)[label], mean, atol=1e-3):
                _fail(f"the centroid of cluster {label} is not the mean of its members")

    cases = [
        _named("clusterer_protocol", protocol),
        _named("clusterer_output_types", output_types),
        _named("clusterer_labels", labels_ok),
        _named("clusterer_centroids", centroids_ok),
        _named("clusterer_deterministic", deterministic),
        _named("clusterer_does_not_modify_input", leaves_input),
        _named("clusterer_k_equals_1", k_equals_1),
        _named("clusterer_k_equals_n", k_equals_n),
        _named("clusterer_separated_blobs", separated_blobs),
    ]
    return cases


def check_clusterer(
    cl: Any, embeddings: np.ndarray | None = None, *, k: int | None = None, seed: int = 0
) -> list[str]:
    """Runs the `Clusterer` checks; returns the names of the checks that ran.

    Args:
        cl: The clusterer.
        embeddings: (N, D) float32 input for the shape and determinism checks (default:
            `sample_blobs`); the k = 1, k = N and blob checks always use `sample_blobs`.
        k: Clusters for the shape and determinism checks (default 3, at most N).
        seed: Seed passed to ``cluster``.

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> from consistent_char.clusterers import FaissKMeansClusterer
        >>> "clusterer_deterministic" in check_clusterer(FaissKMeansClusterer())
        True
    """
    return _run_all(_clusterer_cases(cl, embeddings, k, seed))


# ------------------------------------------------------------------------ criterion


def _record(i: int, spread: float) -> IterationRecord:
    return IterationRecord(
        iteration=i, prompt="", seeds=[], spread=float(spread), threshold=0.0, converged=False
    )


def _criterion_cases(c: Any, embeddings: np.ndarray | None) -> list[ConformanceCase]:
    x = np.asarray(embeddings) if embeddings is not None else sample_blobs(4, 3, 8)[0]
    lazy = _Lazy()

    def spread() -> Any:
        return lazy.get("spread", lambda: c.spread(x.copy()))

    def real(value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            _fail(f"{what} must be a real number, got {type(value).__name__}")
        v = float(value)
        if not np.isfinite(v) or v < 0:
            _fail(f"{what} must be finite and >= 0, got {v}")
        return v

    def protocol() -> None:
        if not isinstance(c, ConvergenceCriterion):
            _fail(f"{type(c).__name__} needs spread(), threshold() and converged() methods")

    def spread_type() -> None:
        real(spread(), "spread()")

    def spread_deterministic() -> None:
        if c.spread(x.copy()) != spread():
            _fail("the same embeddings gave different spreads")

    def spread_zero() -> None:
        same = np.repeat(x[:1], len(x), axis=0)
        s = real(c.spread(same), "spread() of identical embeddings")
        if s > 1e-6:
            _fail(f"identical embeddings must have spread 0, got {s}")

    def spread_scale() -> None:
        s1 = real(spread(), "spread()")
        s2 = real(c.spread(x * 2), "spread() of 2x embeddings")
        if not s2 > s1:
            _fail(f"spreading the embeddings out (x2) must increase the spread, got {s1} -> {s2}")

    def threshold_type() -> None:
        s = real(spread(), "spread()")
        real(c.threshold([s]), "threshold([s0])")
        real(c.threshold([s, s / 2]), "threshold([s0, s1])")

    def converged_type() -> None:
        v = c.converged(x.copy(), [])
        if not isinstance(v, bool | np.bool_):
            _fail(f"converged() must return a bool, got {type(v).__name__}")

    def converged_consistent() -> None:
        s = real(spread(), "spread()")
        for scale, history in (
            (1.0, []),
            (1.0, [_record(0, s)]),
            (0.1, [_record(0, s)]),
            (0.01, [_record(0, s), _record(1, s / 2)]),
        ):
            e = x * scale
            current = float(c.spread(e))
            expected = current < float(c.threshold([r.spread for r in history] + [current]))
            got = bool(c.converged(e, history))
            if got != expected:
                _fail(
                    f"converged() = {got} but spread {current:.6g} vs threshold "
                    f"{float(c.threshold([r.spread for r in history] + [current])):.6g} says "
                    f"{expected} (history of {len(history)} iteration(s))"
                )

    return [
        _named("criterion_protocol", protocol),
        _named("criterion_spread_type", spread_type),
        _named("criterion_spread_deterministic", spread_deterministic),
        _named("criterion_spread_zero_for_identical", spread_zero),
        _named("criterion_spread_grows_with_scale", spread_scale),
        _named("criterion_threshold_type", threshold_type),
        _named("criterion_converged_type", converged_type),
        _named("criterion_converged_matches_threshold", converged_consistent),
    ]


def check_convergence_criterion(c: Any, embeddings: np.ndarray | None = None) -> list[str]:
    """Runs the `ConvergenceCriterion` checks; returns the names of the checks that ran.

    Args:
        c: The criterion.
        embeddings: (N, D) embeddings with N >= 2 that are not all identical (default:
            `sample_blobs`).

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> from consistent_char.convergence import PairwiseDistanceCriterion
        >>> len(check_convergence_criterion(PairwiseDistanceCriterion(d_conv=1.0)))
        8
    """
    return _run_all(_criterion_cases(c, embeddings))


# ------------------------------------------------------------------------- identity


def _identity_cases(
    identity_fn: Callable[[], Identity], prefix: str = "identity"
) -> list[ConformanceCase]:
    import torch

    def round_trip() -> None:
        identity = identity_fn()
        with tempfile.TemporaryDirectory() as tmp:
            loaded = Identity.load(identity.save(f"{tmp}/identity"))
        if loaded.token != identity.token:
            _fail(f"token {identity.token!r} came back as {loaded.token!r}")
        for name in ("clip_l", "clip_g"):
            a, b = getattr(identity, name).detach().float().cpu(), getattr(loaded, name)
            if a.shape != b.shape or not torch.equal(a, b.float()):
                _fail(f"{name} changed in the round trip")
        if (identity.lora is None) != (loaded.lora is None):
            _fail(f"the LoRA {'vanished' if loaded.lora is None else 'appeared'} in the round trip")
        if identity.lora is not None and loaded.lora is not None:
            if set(identity.lora) != set(loaded.lora):
                missing = sorted(set(identity.lora) ^ set(loaded.lora))[:3]
                _fail(f"LoRA keys changed in the round trip, e.g. {missing}")
            for key, value in identity.lora.items():
                if not torch.equal(value.detach().float().cpu(), loaded.lora[key].float()):
                    _fail(f"LoRA weight {key} changed in the round trip")
        for attr in ("lora_rank", "lora_alpha", "target_modules"):
            if getattr(identity, attr) != getattr(loaded, attr):
                _fail(f"{attr} {getattr(identity, attr)!r} came back as {getattr(loaded, attr)!r}")
        expected = json.loads(json.dumps(identity.metadata, default=str))
        if loaded.metadata != expected:
            _fail("metadata changed in the round trip")

    return [_named(f"{prefix}_save_load_round_trip", round_trip)]


def check_identity(identity: Identity) -> list[str]:
    """Checks that `identity` survives ``save`` and ``Identity.load`` unchanged.

    Raises:
        AssertionError: ``[identity_save_load_round_trip] what changed``.
    """
    return _run_all(_identity_cases(lambda: identity))


# ------------------------------------------------------------------------ generator


def _generator_cases(
    gen: Any,
    prompts: Sequence[str] | None,
    seeds: Sequence[int] | None,
    identity: Identity | None,
    pixel_atol: int,
) -> list[ConformanceCase]:
    prompts = (
        list(prompts)
        if prompts is not None
        else ["a photo of a cat", "a red robot", "a dog in the snow"]
    )
    seeds = list(seeds) if seeds is not None else [11, 22, 33][: len(prompts)]
    if len(prompts) < 2 or len(seeds) != len(prompts):
        raise ValueError("the generator checks need at least 2 prompts and one seed per prompt")
    pipe = _sdxl_pipeline(gen)
    if identity is None and pipe is not None:
        from consistent_char.testing.tiny import tiny_identity

        identity = tiny_identity(pipe, "<conformance>", seed=0)
    lazy = _Lazy()
    n = len(prompts)

    def out() -> Any:
        return lazy.get("out", lambda: gen.generate(prompts, seeds))

    def valid() -> list[Image.Image]:
        o = out()
        if not (isinstance(o, list) and len(o) == n and all(isinstance(i, Image.Image) for i in o)):
            _fail("needs a valid list of images; see generator_returns_images")
        return o  # type: ignore[no-any-return]

    def same(a: Sequence[Image.Image], b: Sequence[Image.Image], what: str) -> None:
        diff = _max_pixel_diff(a, b)
        if diff > pixel_atol:
            _fail(f"{what}: pixels differ by up to {diff} (allowed {pixel_atol})")

    def protocol() -> None:
        if not isinstance(gen, Generator):
            _fail(f"{type(gen).__name__} has no generate(prompts, seeds, identity=None) method")

    def returns_images() -> None:
        o = out()
        if not isinstance(o, list):
            _fail(f"generate() must return a list, got {type(o).__name__}")
        if len(o) != n:
            _fail(f"expected {n} images for {n} prompts, got {len(o)}")
        for j, im in enumerate(o):
            if not isinstance(im, Image.Image):
                _fail(f"image {j} is a {type(im).__name__}, not a PIL image")
            if im.mode != "RGB":
                _fail(f"image {j} has mode {im.mode!r}, expected 'RGB'")

    def consistent_size() -> None:
        sizes = {im.size for im in valid()}
        if len(sizes) != 1:
            _fail(f"images of one call have different sizes: {sorted(sizes)}")

    def deterministic() -> None:
        same(gen.generate(prompts, seeds), valid(), "the same prompts and seeds drawn twice")

    def per_image_seed() -> None:
        same(
            gen.generate(prompts[1:2], seeds[1:2]),
            valid()[1:2],
            "image 1 drawn alone vs in the batch",
        )
        reordered = gen.generate(prompts[::-1], seeds[::-1])
        same(reordered[::-1], valid(), "the batch drawn in reverse order")

    def seeds_vary() -> None:
        other = gen.generate(prompts, [s + 1000 for s in seeds])
        if _max_pixel_diff(other, valid()) == 0:
            _fail("different seeds gave identical images")

    cases = [
        _named("generator_protocol", protocol),
        _named("generator_returns_images", returns_images),
        _named("generator_consistent_size", consistent_size),
        _named("generator_deterministic", deterministic),
        _named("generator_per_image_seed", per_image_seed),
        _named("generator_seeds_vary_images", seeds_vary),
    ]
    if identity is None:
        logger.info(
            "%s exposes no SDXL pipeline and no identity was given: skipping the identity checks",
            type(gen).__name__,
        )
        return cases
    with_token = [f"{identity.token} {p}" for p in prompts]

    @dataclass
    class _Drawn:
        images: list[Image.Image]
        identity_changed: bool
        before: _Snapshot | None
        after: _Snapshot | None

    def with_identity() -> _Drawn:
        def draw() -> _Drawn:
            before = _snapshot(pipe) if pipe is not None else None
            rows = (identity.clip_l.clone(), identity.clip_g.clone())
            images = gen.generate(with_token, seeds, identity=identity)
            after = _snapshot(pipe) if pipe is not None else None
            changed = not (
                _torch_equal(rows[0], identity.clip_l) and _torch_equal(rows[1], identity.clip_g)
            )
            return _Drawn(images, changed, before, after)

        return lazy.get("identity", draw)  # type: ignore[no-any-return]

    def identity_used() -> None:
        plain = gen.generate(with_token, seeds)
        if _max_pixel_diff(with_identity().images, plain) == 0:
            _fail(f"generating with identity {identity.token!r} gave the same images as without it")

    def leaves_nothing() -> None:
        drawn = with_identity()
        if drawn.identity_changed:
            _fail("generate() modified the identity's embeddings")
        if drawn.before is not None and drawn.after is not None:
            diff = drawn.before.diff(drawn.after)
            if diff:
                _fail("the pipeline changed after generating with an identity: " + "; ".join(diff))
        same(gen.generate(prompts, seeds), valid(), "a call without identity after one with it")

    return cases + [
        _named("generator_uses_identity", identity_used),
        _named("generator_leaves_nothing_behind", leaves_nothing),
    ]


def _torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu()))


def check_generator(
    gen: Any,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    identity: Identity | None = None,
    pixel_atol: int = 0,
) -> list[str]:
    """Runs the `Generator` checks; returns the names of the checks that ran.

    Args:
        gen: The generator.
        prompts: At least 2 prompts (a default set otherwise). With an identity, its token is
            prepended to them for the identity checks.
        seeds: One seed per prompt.
        identity: An identity that fits the generator, for the identity checks. For a
            generator exposing an SDXL ``pipeline``, a random one is made when none is given;
            otherwise the identity checks are skipped.
        pixel_atol: Largest pixel difference (0-255) accepted between two draws of one image.

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> from consistent_char.generators import SDXLGenerator
        >>> from consistent_char.testing.tiny import tiny_sdxl_pipeline
        >>> gen = SDXLGenerator.from_pipeline(tiny_sdxl_pipeline(), num_inference_steps=2)
        >>> "generator_leaves_nothing_behind" in check_generator(gen)  # doctest: +SKIP
        True
    """
    return _run_all(_generator_cases(gen, prompts, seeds, identity, pixel_atol))


# -------------------------------------------------------------------------- refiner


def _identity_equal(a: Identity, b: Identity, atol: float) -> str | None:
    import torch

    if a.token != b.token:
        return f"tokens differ: {a.token!r} vs {b.token!r}"

    def close(x: Any, y: Any) -> bool:
        x, y = x.detach().float().cpu(), y.detach().float().cpu()
        return bool(
            x.shape == y.shape
            and (torch.equal(x, y) or (atol > 0 and torch.allclose(x, y, rtol=0, atol=atol)))
        )

    for name in ("clip_l", "clip_g"):
        if not close(getattr(a, name), getattr(b, name)):
            return f"{name} differs"
    if (a.lora is None) != (b.lora is None):
        return "one has a LoRA, the other not"
    if a.lora is not None and b.lora is not None:
        if set(a.lora) != set(b.lora):
            return "LoRA keys differ"
        for key in a.lora:
            if not close(a.lora[key], b.lora[key]):
                return f"LoRA weight {key} differs"
    return None


def _refiner_cases(
    refiner: Any,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    identity: Identity | None,
    seed: int,
    atol: float,
) -> list[ConformanceCase]:
    images, captions = list(images), list(captions)
    if not images or len(images) != len(captions):
        raise ValueError(
            f"the refiner checks need images and one caption per image, got {len(images)} "
            f"images and {len(captions)} captions"
        )
    pipe = _sdxl_pipeline(refiner)
    lazy = _Lazy()
    signature = _image_signature(images)

    observe_training = pipe is not None and _takes_callback(refiner.refine)

    def first() -> tuple[Any, Any, Any]:
        # With a pipeline and a refine(callback=...), the callback of the last step compares
        # the pipeline mid-training with its state before: the in-training check below.
        def run() -> tuple[Any, Any, Any]:
            before = _snapshot(pipe) if pipe is not None else None
            kwargs: dict[str, Any] = {}
            if observe_training and before is not None:
                reference = before

                def callback(*args: Any) -> None:
                    if len(args) >= 2 and args[0] != args[1]:
                        return  # callback(step, total, ...): only the last step is checked
                    lazy.set("training", _training_violations(pipe, reference))

                kwargs["callback"] = callback
            result = refiner.refine(identity, images, captions, seed=seed, **kwargs)
            after = _snapshot(pipe) if pipe is not None else None
            return before, after, result

        return lazy.get("first", run)  # type: ignore[no-any-return]

    def result() -> Identity:
        r = first()[2]
        if not isinstance(r, Identity):
            _fail("needs an Identity from refine(); see refiner_returns_identity")
        return r  # type: ignore[no-any-return]

    def protocol() -> None:
        if not isinstance(refiner, Refiner):
            _fail(
                f"{type(refiner).__name__} has no refine(identity, images, captions, *, seed) "
                "method"
            )

    def returns_identity() -> None:
        r = first()[2]
        if not isinstance(r, Identity):
            _fail(f"refine() must return an Identity, got {type(r).__name__}")

    def widths() -> None:
        r = result()
        if pipe is not None:
            r.check_fits(pipe)
        if identity is not None:
            for name in ("clip_l", "clip_g"):
                got, want = tuple(getattr(r, name).shape), tuple(getattr(identity, name).shape)
                if got != want:
                    _fail(f"{name} has shape {got} but the identity it continued from has {want}")

    def deterministic() -> None:
        again = refiner.refine(identity, images, captions, seed=seed)
        problem = _identity_equal(result(), again, atol)
        if problem:
            _fail(f"two refines with seed={seed} differ: {problem}")

    def warm_start() -> None:
        start = identity if identity is not None else result()
        warm = refiner.refine(start, images, captions, seed=seed + 1)
        if not isinstance(warm, Identity):
            _fail(f"refine() from an identity must return an Identity, got {type(warm).__name__}")
        if warm.token != start.token:
            _fail(f"continuing from {start.token!r} returned token {warm.token!r}")
        for name in ("clip_l", "clip_g"):
            if tuple(getattr(warm, name).shape) != tuple(getattr(start, name).shape):
                _fail(f"continuing changed the shape of {name}")

    def leaves_inputs() -> None:
        first()
        if _image_signature(images) != signature:
            _fail("refine() modified its input images")

    cases = [
        _named("refiner_protocol", protocol),
        _named("refiner_returns_identity", returns_identity),
        _named("refiner_identity_widths", widths),
        _named("refiner_deterministic", deterministic),
        _named("refiner_warm_start", warm_start),
        _named("refiner_does_not_modify_inputs", leaves_inputs),
    ]
    cases += _identity_cases(result, prefix="refiner_identity")
    if pipe is None:
        return cases

    def leaves_pipeline() -> None:
        before, after, _ = first()
        diff = before.diff(after)
        if diff:
            _fail("the pipeline changed during refine(): " + "; ".join(diff))

    def only_identity_parameters_train() -> None:
        first()
        problems = lazy.get("training", lambda: None)
        if problems is None:
            _fail("refine() never called its callback, so training could not be observed")
        if problems:
            _fail(
                "during training, tensors other than the identity's changed: "
                + "; ".join(problems[:5])
                + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
            )

    cases.append(_named("refiner_leaves_pipeline_unchanged", leaves_pipeline))
    if observe_training:
        cases.append(
            _named("refiner_only_identity_parameters_train", only_identity_parameters_train)
        )
    else:
        logger.info(
            "%s.refine takes no callback: skipping refiner_only_identity_parameters_train",
            type(refiner).__name__,
        )
    return cases


def _takes_callback(fn: Callable[..., Any]) -> bool:
    try:
        return "callback" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _training_violations(pipe: Any, before: _Snapshot) -> list[str]:
    """The tensors the pipeline had before training that differ mid-training.

    A tensor may have moved under a new name (an embedding wrapped to add rows, a layer wrapped
    by peft) and an embedding matrix may have grown new rows: only its old rows must match.
    Tensors that are new (token rows, LoRA weights) are the identity's and may change.
    """
    import torch

    live: dict[str, Any] = {}
    for cname, module in _components(pipe).items():
        if isinstance(module, torch.nn.Module):
            live.update(_live_tensors(module, cname))
    moved = {_digest(t) for k, t in live.items() if k not in before.tensors}
    problems = []
    for key, digest in before.tensors.items():
        tensor = live.get(key)
        if tensor is None:
            if digest not in moved:
                problems.append(f"{key} changed")
            continue
        if _digest(tensor) == digest:
            continue
        old = before.shapes[key]
        grown = (
            tensor.ndim == 2
            and len(old) == 2
            and tensor.shape[0] > old[0]
            and tensor.shape[1] == old[1]
            and _digest(tensor[: old[0]]) == digest
        )
        if not grown:
            problems.append(f"{key} changed")
    return problems


def check_refiner(
    refiner: Any,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    identity: Identity | None = None,
    seed: int = 0,
    atol: float = 0.0,
) -> list[str]:
    """Runs the `Refiner` checks; returns the names of the checks that ran.

    Refines three times (twice from `identity` with `seed`, once warm from the result), so
    configure the refiner with few training steps.

    Args:
        refiner: The refiner.
        images: Training images.
        captions: One caption per image, with the identity's token.
        identity: The identity to continue from (`None`: start fresh).
        seed: Seed passed to ``refine``.
        atol: Largest difference accepted between two refines with the same seed (0: exact).

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> check_refiner(my_refiner, images, ["a <cc> creature"] * len(images))  # doctest: +SKIP
    """
    return _run_all(_refiner_cases(refiner, images, captions, identity, seed, atol))


# -------------------------------------------------------------------------- dispatch

_KINDS = ("Generator", "Embedder", "Clusterer", "Refiner", "ConvergenceCriterion")


def conformance_cases(stage: Any, **inputs: Any) -> list[ConformanceCase]:
    """The checks for `stage` as ``(name, check)`` pairs, for ``pytest.mark.parametrize``.

    The stage's kind is found from the protocols it implements (several kinds give all their
    checks). The checks of one table share their stage calls, so each is computed once.

    Args:
        stage: A `Generator`, `Embedder`, `Clusterer`, `Refiner` or `ConvergenceCriterion`
            (or an `Identity`, for the round-trip check).
        **inputs: Keyword arguments of the matching ``check_*`` function, e.g. ``images=``
            for an embedder or ``images=, captions=`` for a refiner.

    Raises:
        TypeError: `stage` implements none of the protocols, or `inputs` has unknown keys.

    Example:
        >>> from consistent_char.convergence import PairwiseDistanceCriterion
        >>> [name for name, _ in conformance_cases(PairwiseDistanceCriterion(d_conv=1.0))][:2]
        ['criterion_protocol', 'criterion_spread_type']
    """
    builders: list[tuple[str, Callable[..., list[ConformanceCase]], set[str]]] = []
    if isinstance(stage, Identity):
        builders.append(("Identity", lambda: _identity_cases(lambda: stage), set()))
    if isinstance(stage, Generator):
        builders.append((
            "Generator",
            lambda prompts=None, seeds=None, identity=None, pixel_atol=0: _generator_cases(
                stage, prompts, seeds, identity, pixel_atol
            ),
            {"prompts", "seeds", "identity", "pixel_atol"},
        ))  # fmt: skip
    if isinstance(stage, Embedder):
        builders.append((
            "Embedder",
            lambda images=None, rtol=1e-4, atol=1e-5: _embedder_cases(stage, images, rtol, atol),
            {"images", "rtol", "atol"},
        ))  # fmt: skip
    if isinstance(stage, Clusterer):
        builders.append((
            "Clusterer",
            lambda embeddings=None, k=None, seed=0: _clusterer_cases(stage, embeddings, k, seed),
            {"embeddings", "k", "seed"},
        ))  # fmt: skip
    if isinstance(stage, Refiner):
        builders.append((
            "Refiner",
            lambda images=None, captions=None, identity=None, seed=0, atol=0.0: _refiner_cases(
                stage,
                _required(images, "images"),
                _required(captions, "captions"),
                identity,
                seed,
                atol,
            ),
            {"images", "captions", "identity", "seed", "atol"},
        ))  # fmt: skip
    if isinstance(stage, ConvergenceCriterion):
        builders.append((
            "ConvergenceCriterion",
            lambda embeddings=None: _criterion_cases(stage, embeddings),
            {"embeddings"},
        ))  # fmt: skip
    if not builders:
        raise TypeError(
            f"{type(stage).__name__} implements none of the stage protocols "
            f"({', '.join(_KINDS)}): nothing to check"
        )
    known = set().union(*(keys for _, _, keys in builders))
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise TypeError(
            f"unknown input(s) {unknown} for a {'/'.join(k for k, _, _ in builders)}; "
            f"known: {sorted(known)}"
        )
    cases: list[ConformanceCase] = []
    for _, build, keys in builders:
        cases += build(**{k: v for k, v in inputs.items() if k in keys})
    return cases


def _required(value: Any, name: str) -> Any:
    if value is None:
        raise TypeError(f"the refiner checks need {name}=...")
    return value


def check_stage(stage: Any, **inputs: Any) -> list[str]:
    """Runs every check that applies to `stage` (see `conformance_cases`); returns their names.

    Raises:
        AssertionError: ``[check_name] what went wrong``.
        TypeError: `stage` implements none of the stage protocols.

    Example:
        >>> from consistent_char.clusterers import FaissKMeansClusterer
        >>> check_stage(FaissKMeansClusterer())[0]
        'clusterer_protocol'
    """
    return _run_all(conformance_cases(stage, **inputs))
