"""The conformance suite, table-driven, on our stages and on small user-written ones; and proof
that it catches broken stages."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import zlib  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from consistent_char.clusterers import FaissKMeansClusterer  # noqa: E402
from consistent_char.convergence import PairwiseDistanceCriterion  # noqa: E402
from consistent_char.embedders import (  # noqa: E402
    CLIPImageEmbedder,
    DINOEmbedder,
    DINOv2Embedder,
    PixelEmbedder,
)
from consistent_char.generators import SDXLGenerator  # noqa: E402
from consistent_char.identity import Identity  # noqa: E402
from consistent_char.refiners import TextualInversionLoRARefiner  # noqa: E402
from consistent_char.testing.conformance import (  # noqa: E402
    ClustererTrial,
    check_clusterer,
    check_clusterer_labels,
    check_convergence_criterion,
    check_embedder,
    check_embedder_batch_independent,
    check_embedder_output_dtype,
    check_generator,
    check_identity,
    check_refiner,
    check_refiner_warm_start,
    check_stage,
    conformance_cases,
    sample_blobs,
)
from consistent_char.testing.tiny import (  # noqa: E402  # noqa: E402
    tiny_clip_vision,
    tiny_dinov2,
    tiny_identity,
    tiny_sdxl_pipeline,
    tiny_vit,
)

# ------------------------------------------------------------------ user-written stages
# Plain classes with the protocol methods, as a user would write them: no base class.


class MeanColourEmbedder:
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = [np.asarray(im.convert("RGB"), np.float32).mean(axis=(0, 1)) for im in images]
        return np.asarray(rows, dtype=np.float32).reshape(len(images), 3) / 255.0


class NumpyKMeans:
    """Lloyd's algorithm from k distinct random points."""

    def cluster(self, embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        x = embeddings.astype(np.float64)
        rng = np.random.default_rng(seed)
        centroids = x[rng.choice(len(x), k, replace=False)]
        for _ in range(20):
            labels = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
            for j in range(k):
                if (labels == j).any():
                    centroids[j] = x[labels == j].mean(0)
        labels = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        return labels.astype(np.int64), centroids.astype(np.float32)


class MaxDistanceCriterion:
    """Converged when no two images are farther apart than `limit`."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def spread(self, embeddings: np.ndarray) -> float:
        diff = embeddings[:, None].astype(np.float64) - embeddings[None]
        return float(np.sqrt((diff**2).sum(-1)).max())

    def threshold(self, spreads: Sequence[float]) -> float:
        return self.limit

    def converged(self, embeddings: np.ndarray, history: Sequence[Any]) -> bool:
        return self.spread(embeddings) < self.limit


def _colour(prompt: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(prompt.encode())])
    return rng.uniform(0, 255, 3)


class SolidColourGenerator:
    """Draws each image as one colour from (prompt, seed); an identity tints it."""

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], identity: Identity | None = None
    ) -> list[Image.Image]:
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            colour = _colour(prompt, seed)
            if identity is not None:
                colour = colour / 2 + 100 * float(identity.clip_l.abs().mean())
            pixels = np.full((16, 16, 3), np.clip(colour, 0, 255), dtype=np.uint8)
            images.append(Image.fromarray(pixels))
        return images


FIXED = Identity(token="<fixed>", clip_l=torch.full((1, 4), 0.5), clip_g=torch.ones(1, 6))


class FixedIdentityRefiner:
    """Always returns the same identity (or continues the given one unchanged)."""

    def refine(
        self,
        identity: Identity | None,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        *,
        seed: int,
    ) -> Identity:
        return identity if identity is not None else FIXED


# ----------------------------------------------------------------------- our stages


def _tiny_dinov2() -> DINOv2Embedder:
    return DINOv2Embedder.from_model(tiny_dinov2())


def _tiny_dino() -> DINOEmbedder:
    return DINOEmbedder.from_model(tiny_vit())


def _tiny_clip() -> CLIPImageEmbedder:
    return CLIPImageEmbedder.from_model(tiny_clip_vision())


# The tiny SDXL stages share one pipeline, as in the extractor.
_PIPE = tiny_sdxl_pipeline(seed=0)
_GENERATOR = SDXLGenerator.from_pipeline(_PIPE, num_inference_steps=2)
_TRAIN_IMAGES = _GENERATOR.generate(["a cat", "a cat"], [1, 2])
_CAPTIONS = ["a photo of <cat>", "a <cat> in the snow"]
_REFINER = TextualInversionLoRARefiner.from_pipeline(
    _PIPE, token="<cat>", initializer_token="cat", steps=2
)

STAGES: list[tuple[str, Any, dict[str, Any], dict[str, Any]]] = [
    # (id, stage, conformance inputs, marks by check name)
    ("dinov2", _tiny_dinov2(), {}, {}),
    ("dino", _tiny_dino(), {}, {}),
    ("clip", _tiny_clip(), {}, {}),
    ("pixels", PixelEmbedder(size=8), {}, {}),
    ("faiss_kmeans", FaissKMeansClusterer(), {}, {}),
    ("faiss_kmeans_nredo", FaissKMeansClusterer(nredo=3), {"k": 4, "seed": 5}, {}),
    ("pairwise_absolute", PairwiseDistanceCriterion(d_conv=1.0), {}, {}),
    ("pairwise_relative", PairwiseDistanceCriterion(d_conv_relative=0.6), {}, {}),
    ("sdxl_generator", _GENERATOR, {}, {}),
    ("ti_lora_refiner", _REFINER, {"images": _TRAIN_IMAGES, "captions": _CAPTIONS}, {}),
    ("user_mean_colour", MeanColourEmbedder(), {}, {}),
    ("user_numpy_kmeans", NumpyKMeans(), {}, {}),
    ("user_max_distance", MaxDistanceCriterion(limit=3.0), {}, {}),
    ("user_solid_colour", SolidColourGenerator(), {"identity": FIXED}, {}),
    (
        "user_fixed_refiner",
        FixedIdentityRefiner(),
        {"images": _TRAIN_IMAGES, "captions": ["<fixed>"] * 2},
        {},
    ),
    ("identity", tiny_identity(_PIPE, "<tiny>"), {}, {}),
]

CASES = [
    pytest.param(check, id=f"{stage_id}-{name}", marks=marks.get(name, ()))
    for stage_id, stage, inputs, marks in STAGES
    for name, check in conformance_cases(stage, **inputs)
]


@pytest.mark.parametrize("check", CASES)
def test_conformance(check: Callable[[], None]) -> None:
    check()


def test_the_table_covers_every_check_of_each_kind() -> None:
    names = {case.id.split("-", 1)[1] for case in CASES}  # type: ignore[union-attr]
    assert {
        "embedder_batch_independent",
        "clusterer_deterministic",
        "clusterer_separated_blobs",
        "criterion_converged_matches_threshold",
        "generator_per_image_seed",
        "generator_leaves_nothing_behind",
        "refiner_deterministic",
        "refiner_leaves_pipeline_unchanged",
        "refiner_only_identity_parameters_train",
        "refiner_identity_save_load_round_trip",
        "identity_save_load_round_trip",
    } <= names


# -------------------------------------------------------------------- broken stages


def failing_checks(stage: Any, **inputs: Any) -> dict[str, str]:
    """Runs every case; returns {check name: message} of those that fail."""
    failed = {}
    for name, check in conformance_cases(stage, **inputs):
        try:
            check()
        except AssertionError as err:
            assert str(err).startswith(f"[{name}] "), str(err)
            failed[name] = str(err)
    return failed


class Float64Embedder(MeanColourEmbedder):
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return super().embed(images).astype(np.float64)


class DropsLastImageEmbedder(MeanColourEmbedder):
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return super().embed(images[:-1] if len(images) > 1 else images)


class BatchNormalisingEmbedder(MeanColourEmbedder):
    """Subtracts the batch mean: each row depends on the other images of the call."""

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        e = super().embed(images)
        return (e - e.mean(axis=0)).astype(np.float32)


class NondeterministicClusterer(NumpyKMeans):
    def cluster(self, embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        labels, centroids = super().cluster(
            embeddings, k, int(np.random.default_rng().integers(99))
        )
        return labels, centroids + np.random.default_rng().normal(0, 1e-6, centroids.shape).astype(
            np.float32
        )


class Int32LabelsClusterer(NumpyKMeans):
    def cluster(self, embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        labels, centroids = super().cluster(embeddings, k, seed)
        return labels.astype(np.int32), centroids


class ArraySpreadCriterion(MaxDistanceCriterion):
    def spread(self, embeddings: np.ndarray) -> float:
        return np.atleast_1d(super().spread(embeddings))  # type: ignore[return-value]


class InconsistentCriterion(MaxDistanceCriterion):
    def converged(self, embeddings: np.ndarray, history: Sequence[Any]) -> bool:
        return self.spread(embeddings) >= self.limit


class SharedRngGenerator(SolidColourGenerator):
    """Draws the whole batch from seeds[0]: image j depends on the batch."""

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], identity: Identity | None = None
    ) -> list[Image.Image]:
        rng = np.random.default_rng(seeds[0])
        return [
            Image.fromarray(np.full((16, 16, 3), rng.uniform(0, 255, 3), dtype=np.uint8))
            for _ in prompts
        ]


class StickyIdentityGenerator(SolidColourGenerator):
    """Keeps the last identity it was given: later calls without one still use it."""

    def __init__(self) -> None:
        self.identity: Identity | None = None

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], identity: Identity | None = None
    ) -> list[Image.Image]:
        self.identity = identity or self.identity
        return super().generate(prompts, seeds, self.identity)


def test_catches_an_embedder_returning_float64() -> None:
    with pytest.raises(
        AssertionError, match=r"^\[embedder_output_dtype\] expected float32.*float64"
    ):
        check_embedder(Float64Embedder())
    assert set(failing_checks(Float64Embedder())) == {"embedder_output_dtype"}


def test_catches_an_embedder_returning_the_wrong_number_of_rows() -> None:
    with pytest.raises(AssertionError, match=r"^\[embedder_output_shape\] expected shape \(6, D\)"):
        check_embedder(DropsLastImageEmbedder())


def test_catches_an_embedder_whose_rows_depend_on_the_batch() -> None:
    assert set(failing_checks(BatchNormalisingEmbedder())) == {"embedder_batch_independent"}


def test_catches_a_nondeterministic_clusterer() -> None:
    with pytest.raises(
        AssertionError, match=r"^\[clusterer_deterministic\] .*seed=0 gave different"
    ):
        check_clusterer(NondeterministicClusterer())
    assert "clusterer_deterministic" in failing_checks(NondeterministicClusterer())


def test_catches_int32_labels() -> None:
    with pytest.raises(
        AssertionError, match=r"^\[clusterer_labels\] labels must be int64, got int32"
    ):
        check_clusterer(Int32LabelsClusterer())


def test_catches_broken_criteria() -> None:
    with pytest.raises(
        AssertionError, match=r"^\[criterion_spread_type\] .*real number, got ndarray"
    ):
        check_convergence_criterion(ArraySpreadCriterion(1.0))
    assert set(failing_checks(InconsistentCriterion(1.0))) == {
        "criterion_converged_matches_threshold"
    }


def test_catches_a_generator_whose_images_depend_on_the_batch() -> None:
    with pytest.raises(AssertionError, match=r"^\[generator_per_image_seed\] image 1 drawn alone"):
        check_generator(SharedRngGenerator())


def test_catches_a_generator_that_keeps_the_identity() -> None:
    failed = failing_checks(StickyIdentityGenerator(), identity=FIXED)
    assert set(failed) == {"generator_leaves_nothing_behind"}
    assert "a call without identity after one with it" in failed["generator_leaves_nothing_behind"]


def test_catches_a_generator_that_ignores_the_identity() -> None:
    failed = failing_checks(SharedRngGenerator(), identity=FIXED)
    assert "generator_uses_identity" in failed


class WrongWidthRefiner(FixedIdentityRefiner):
    def refine(
        self, identity: Identity | None, images: Any, captions: Any, *, seed: int
    ) -> Identity:
        return Identity(token="<fixed>", clip_l=torch.zeros(1, 5), clip_g=torch.zeros(1, 6))


class _PipelineRefiner:
    """A refiner over the tiny pipeline that returns a fitting identity without training."""

    def __init__(self) -> None:
        self.pipeline = tiny_sdxl_pipeline(seed=1)

    def refine(
        self,
        identity: Identity | None,
        images: Any,
        captions: Any,
        *,
        seed: int,
        callback: Callable[[int, int, float], None] | None = None,
    ) -> Identity:
        if callback is not None:
            callback(1, 1, 0.0)
        return identity or tiny_identity(self.pipeline, "<cat>", seed=0)


class TrainsTheUNetRefiner(_PipelineRefiner):
    """Changes a UNet weight while training, then puts it back."""

    def refine(
        self, identity: Any, images: Any, captions: Any, *, seed: int, callback: Any = None
    ) -> Identity:
        bias = self.pipeline.unet.conv_in.bias
        saved = bias.detach().clone()
        with torch.no_grad():
            bias.add_(1.0)
        try:
            return super().refine(identity, images, captions, seed=seed, callback=callback)
        finally:
            with torch.no_grad():
                bias.copy_(saved)


class LeavesATokenRefiner(_PipelineRefiner):
    def refine(
        self, identity: Any, images: Any, captions: Any, *, seed: int, callback: Any = None
    ) -> Identity:
        self.pipeline.tokenizer.add_tokens([f"<left-{len(self.pipeline.tokenizer)}>"])
        return super().refine(identity, images, captions, seed=seed, callback=callback)


def test_catches_a_refiner_with_wrong_widths() -> None:
    with pytest.raises(
        AssertionError, match=r"^\[refiner_identity_widths\] clip_l has shape \(1, 5\)"
    ):
        check_refiner(WrongWidthRefiner(), _TRAIN_IMAGES, ["<fixed>"] * 2, identity=FIXED)


def test_a_fitting_pipeline_refiner_passes() -> None:
    names = check_refiner(_PipelineRefiner(), _TRAIN_IMAGES, _CAPTIONS)
    assert "refiner_only_identity_parameters_train" in names


def test_catches_a_refiner_that_trains_base_weights() -> None:
    failed = failing_checks(TrainsTheUNetRefiner(), images=_TRAIN_IMAGES, captions=_CAPTIONS)
    assert set(failed) == {"refiner_only_identity_parameters_train"}
    assert "unet/conv_in.bias changed" in failed["refiner_only_identity_parameters_train"]


def test_catches_a_refiner_that_leaves_the_pipeline_changed() -> None:
    failed = failing_checks(LeavesATokenRefiner(), images=_TRAIN_IMAGES, captions=_CAPTIONS)
    assert set(failed) == {"refiner_leaves_pipeline_unchanged"}
    assert "tokenizer vocab size" in failed["refiner_leaves_pipeline_unchanged"]


def test_catches_an_identity_that_does_not_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    identity = tiny_identity(_PIPE, "<tiny>", with_lora=False)
    load = Identity.load

    def lossy(directory: Any) -> Identity:
        loaded = load(directory)
        loaded.clip_g = loaded.clip_g.half().float()
        return loaded

    monkeypatch.setattr(Identity, "load", staticmethod(lossy))
    with pytest.raises(AssertionError, match=r"^\[identity_save_load_round_trip\] clip_g changed"):
        check_identity(identity)


# ------------------------------------------------------------------- one check alone


def test_a_single_check_runs_alone_on_a_conforming_and_a_broken_stage() -> None:
    check_embedder_output_dtype(MeanColourEmbedder())
    with pytest.raises(
        AssertionError, match=r"^\[embedder_output_dtype\] expected float32 embeddings, got float64"
    ):
        check_embedder_output_dtype(Float64Embedder())
    check_embedder_batch_independent(MeanColourEmbedder())
    with pytest.raises(
        AssertionError, match=r"^\[embedder_batch_independent\] image 0 alone vs in the full batch"
    ):
        check_embedder_batch_independent(BatchNormalisingEmbedder())


def test_a_single_check_takes_its_inputs_through_a_trial() -> None:
    x, _ = sample_blobs(5, 2, 3)
    check_clusterer_labels(ClustererTrial(NumpyKMeans(), x, k=2))
    with pytest.raises(AssertionError, match=r"^\[clusterer_labels\] labels must be int64"):
        check_clusterer_labels(ClustererTrial(Int32LabelsClusterer(), x, k=2))
    with pytest.raises(TypeError, match="the refiner checks need images="):
        check_refiner_warm_start(FixedIdentityRefiner())


# ------------------------------------------------------------------------- dispatch


class EmbedderAndClusterer(MeanColourEmbedder, NumpyKMeans):
    pass


def test_check_stage_dispatches_by_protocol() -> None:
    names = check_stage(EmbedderAndClusterer())
    assert "embedder_output_dtype" in names and "clusterer_labels" in names
    assert check_stage(MaxDistanceCriterion(1.0))[0] == "criterion_protocol"


def test_dispatch_errors() -> None:
    with pytest.raises(TypeError, match="implements none of the stage protocols"):
        conformance_cases(object())
    with pytest.raises(
        TypeError, match=r"unknown input\(s\) \['imgs'\] .* known: \['atol', 'images', 'rtol'\]"
    ):
        conformance_cases(MeanColourEmbedder(), imgs=[])
    with pytest.raises(TypeError, match="the refiner checks need images="):
        conformance_cases(FixedIdentityRefiner())


def test_custom_inputs_are_used() -> None:
    x, _ = sample_blobs(5, 2, 3)
    assert check_clusterer(FaissKMeansClusterer(), x, k=2)
    assert check_convergence_criterion(PairwiseDistanceCriterion(d_conv=0.5), x)
    with pytest.raises(ValueError, match="at least 3 images"):
        check_embedder(MeanColourEmbedder(), _TRAIN_IMAGES)
