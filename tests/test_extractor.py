"""The loop of Algorithm 1 with small user-written stages: order, warm start, history, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes import ColourGenerator, MeanColourEmbedder, MeanColourRefiner

from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
from consistent_char.config import ConfigError, ExtractorConfig
from consistent_char.convergence import PairwiseDistanceCriterion
from consistent_char.extractor import IterativeIdentityExtractor, image_seed
from consistent_char.identity import Identity


def make_extractor(**overrides) -> IterativeIdentityExtractor:
    config = ExtractorConfig.from_overrides(
        {
            "num_images": 40,
            "d_size_c": 8,
            "d_min_c": 4,
            "max_iterations": 6,
            "convergence.d_conv_relative": 0.3,
            **overrides,
        }
    )
    return IterativeIdentityExtractor(
        ColourGenerator(),
        MeanColourEmbedder(),
        FaissKMeansClusterer(),
        MeanColourRefiner(token=config.refiner.token),
        PairwiseDistanceCriterion(
            d_conv=config.convergence.d_conv, d_conv_relative=config.convergence.d_conv_relative
        ),
        config=config,
    )


def test_loop_converges_and_records_history():
    extractor = make_extractor()
    result = extractor.extract("a colour")

    assert result.converged
    assert 2 <= result.iterations <= 6
    first, last = result.history[0], result.history[-1]
    assert first.prompt == "a colour"
    assert last.converged and last.spread < last.threshold
    assert first.threshold == pytest.approx(0.3 * first.spread)
    # Every refined iteration chose a kept cluster and timed each stage.
    for record in result.history[:-1]:
        assert record.chosen_cluster is not None
        assert record.cluster_sizes[record.chosen_cluster] >= 4
        assert sum(record.cluster_sizes) == 40 and len(record.cluster_sizes) == 5
        assert set(record.seconds) == {"generate", "embed", "cluster", "refine"}
        assert record.chosen_reason == "most_cohesive"


def test_later_iterations_generate_with_the_identity_and_refine_warm():
    extractor = make_extractor()
    result = extractor.extract("a colour")
    gen, ref = extractor.generator, extractor.refiner
    assert isinstance(gen, ColourGenerator) and isinstance(ref, MeanColourRefiner)

    # Iteration 0 draws the user's prompt without identity, later ones with the last identity.
    assert gen.calls[0][1] is None and gen.calls[0][0][0] == "a colour"
    later = [c for c in gen.calls if c[1] is not None]
    assert later and all(p == f"{ref.token} a colour" for c in later for p in c[0])
    # The refiner continues from the identity it returned before (warm start).
    assert ref.calls[0][0] is None
    for i in range(1, len(ref.calls)):
        assert ref.calls[i][0] is not None
    assert all(cap == f"{ref.token} a colour" for c in ref.calls for cap in c[2])
    assert float(result.identity.clip_l[0, 3]) == len(ref.calls) - 1


def test_image_seeds_are_distinct_reproducible_and_recorded():
    result = make_extractor().extract("a colour")
    seeds = [s for r in result.history for s in r.seeds]
    assert len(set(seeds)) == len(seeds)
    assert result.history[1].seeds[3] == image_seed(0, 1, 3)
    assert image_seed(0, 1, 3) != image_seed(1, 1, 3)


def test_run_directory_layout(tmp_path):
    run = tmp_path / "run"
    result = make_extractor().extract("a colour", run_dir=run)
    assert (run / "config.yaml").is_file()
    state = json.loads((run / "state.json").read_text())
    assert state["finished"] and state["converged"]
    assert len(state["history"]) == result.iterations
    assert len(list((run / "iter_000" / "images").glob("*.png"))) == 40
    assert np.load(run / "iter_000" / "embeddings.npy").shape == (40, 3)
    clusters = json.loads((run / "iter_000" / "clusters.json").read_text())
    assert clusters["chosen"] == result.history[0].chosen_cluster
    assert (run / "iter_000" / "identity" / "identity.json").is_file()
    loaded = Identity.load(run / "identity")
    assert torch.equal(loaded.clip_l, result.identity.clip_l)
    assert loaded.metadata["prompt"] == "a colour"
    assert loaded.metadata["iterations"] == result.iterations
    # No temporary file is left behind.
    assert not [p for p in run.rglob("*") if p.name.startswith(".")]


def test_existing_run_is_not_overwritten(tmp_path):
    make_extractor().extract("a colour", run_dir=tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        make_extractor().extract("a colour", run_dir=tmp_path)


class Interrupt(Exception):
    pass


def stop_after(iteration: int, stage: str):
    def callback(event):
        if event.kind == "stage_end" and event.iteration == iteration and event.stage == stage:
            raise Interrupt

    return callback


@pytest.mark.parametrize(
    ("iteration", "stage"),
    [(0, "generate"), (1, "embed"), (1, "cluster"), (1, "refine"), (2, "generate")],
)
def test_resume_after_interrupt_gives_the_same_identity(tmp_path, iteration, stage):
    reference = make_extractor().extract("a colour", run_dir=tmp_path / "ref")

    with pytest.raises(Interrupt):
        make_extractor().extract(
            "a colour", run_dir=tmp_path / "cut", callback=stop_after(iteration, stage)
        )
    resumed = make_extractor().extract("a colour", run_dir=tmp_path / "cut", resume=True)

    assert resumed.iterations == reference.iterations
    assert torch.equal(resumed.identity.clip_l, reference.identity.clip_l)
    assert torch.equal(resumed.identity.clip_g, reference.identity.clip_g)
    assert [r.spread for r in resumed.history] == [r.spread for r in reference.history]
    assert [r.chosen_cluster for r in resumed.history] == [
        r.chosen_cluster for r in reference.history
    ]


def test_resume_with_other_config_names_the_fields(tmp_path):
    with pytest.raises(Interrupt):
        make_extractor().extract("a colour", run_dir=tmp_path, callback=stop_after(0, "refine"))
    with pytest.raises(ConfigError, match=r"d_min_c \(run: 4, now: 5\).*seed"):
        make_extractor(d_min_c=5, seed=3).extract("a colour", run_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="prompt"):
        make_extractor().extract("another", run_dir=tmp_path, resume=True)


def test_resume_without_a_run_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        make_extractor().extract("a colour", run_dir=tmp_path / "none", resume=True)


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_bad_prompt(prompt):
    with pytest.raises(ValueError, match="prompt"):
        make_extractor().extract(prompt)


def test_fallback_to_largest_cluster_is_recorded():
    # d_min_c = 40 with 5 clusters of 40 images: no cluster qualifies.
    result = make_extractor(d_min_c=40, max_iterations=2).extract("a colour")
    assert result.history[0].chosen_reason == "largest_fallback"
    sizes = result.history[0].cluster_sizes
    assert sizes[result.history[0].chosen_cluster] == max(sizes)


def test_max_iterations_without_convergence():
    result = make_extractor(**{"convergence.d_conv_relative": 0.0001, "max_iterations": 3}).extract(
        "a colour"
    )
    assert not result.converged and result.iterations == 3
    assert isinstance(result.identity, Identity)
