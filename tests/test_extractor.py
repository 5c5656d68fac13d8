"""The loop of Algorithm 1 with small user-written stages: order, warm start, history, resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from fakes import ColourGenerator, MeanColourEmbedder, MeanColourRefiner, ScriptedRefiner
from PIL import Image

from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
from consistent_char.config import ConfigError, ExtractorConfig
from consistent_char.convergence import PairwiseDistanceCriterion, mean_pairwise_distance
from consistent_char.extractor import IterativeIdentityExtractor, image_seed
from consistent_char.identity import Identity
from consistent_char.rundir import RunDirectory


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

    # 40 images a call: one generator call and at most one refine per iteration.
    assert len(gen.calls) == result.iterations and len(ref.calls) >= result.iterations - 1
    # Iteration 0 draws the user's prompt without identity; iteration i > 0 draws with the
    # identity that iteration i - 1's refinement returned, its token in every prompt.
    assert gen.calls[0][1] is None and gen.calls[0][0] == ["a colour"] * 40
    for i in range(1, result.iterations):
        prompts, identity = gen.calls[i]
        assert identity is ref.returned[i - 1]
        assert prompts == [f"{ref.token} a colour"] * 40
    # The refiner continues from the identity it returned the iteration before (warm start).
    assert ref.calls[0][0] is None
    for i in range(1, len(ref.calls)):
        assert ref.calls[i][0] is ref.returned[i - 1]
    assert all(cap == f"{ref.token} a colour" for c in ref.calls for cap in c[2])
    assert float(result.identity.clip_l[0, 3]) == len(ref.calls) - 1


def test_captions_carry_the_refiners_own_token():
    # A refiner built apart from the config, with another token: its new identity's token is
    # the one the captions must hold, or the refinement learns a token it never sees.
    extractor = make_extractor(max_iterations=2)
    extractor.refiner = MeanColourRefiner(token="<own>")
    assert extractor.config.refiner.token != "<own>"
    result = extractor.extract("a colour")
    assert result.identity.token == "<own>"
    assert extractor.refiner.calls[0][2] == ["<own> a colour"] * len(extractor.refiner.calls[0][2])


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


# ------------------------------------------------------------ options beyond the paper


def scripted_extractor(refiner, **overrides):
    extractor = make_extractor(**overrides)
    extractor.refiner = refiner
    return extractor


def test_a_cold_start_refines_from_the_base_model_every_iteration():
    extractor = make_extractor(warm_start=False)
    extractor.extract("a colour")
    calls = extractor.refiner.calls
    assert len(calls) >= 2 and all(identity is None for identity, _, _ in calls)
    assert all(cap == "<cc-char> a colour" for _, _, caps in calls for cap in caps)


def test_the_anchor_keeps_a_drifting_loop_from_converging():
    # The first identity draws loosely on the chosen colour; each later refine draws tighter
    # (strength up) but moves the colour 60 further away.
    def run(ratio):
        refiner = ScriptedRefiner([0.5, 9.0, 27.0, 81.0, 243.0], shifts=[0.0, 60, 60, 60, 60])
        overrides = {"max_iterations": 5, "convergence.max_anchor_ratio": ratio}
        return scripted_extractor(refiner, **overrides).extract("a colour")

    free = run(None)
    assert free.converged
    guarded = run(1.5)
    # Iteration 1 sits on the first cluster's colour; later ones drift away from it.
    distances = [r.anchor_distance for r in guarded.history]
    assert distances[1] is not None and distances[-1] > 3 * distances[1]
    assert not guarded.converged and guarded.iterations == 5
    assert not any(r.converged for r in guarded.history)


def test_patience_stops_when_the_spread_stops_falling_and_return_best_keeps_the_best():
    # The first identity draws tightly, later ones loosely: the spread rises after iteration 1.
    def run(**overrides):
        refiner = ScriptedRefiner([20.0, 0.5, 0.5, 0.5, 0.5, 0.5])
        settings = {"convergence.d_conv_relative": 0.001, **overrides}
        return scripted_extractor(refiner, **settings).extract("a colour"), refiner

    plain, _ = run()
    assert plain.iterations == 6 and float(plain.identity.clip_l[0, 3]) == 0.5
    assert plain.stop_reason == "max_iterations reached"
    stopped, refiner = run(**{"convergence.patience": 2})
    assert stopped.iterations == 4 and not stopped.converged and len(refiner.calls) == 3
    assert stopped.stop_reason == "no lower spread in 2 iterations"
    best, _ = run(**{"convergence.patience": 2, "convergence.return_best": True})
    spreads = [r.spread for r in best.history]
    assert min(spreads[1:]) == spreads[1]
    assert float(best.identity.clip_l[0, 3]) == 20.0  # the identity that drew iteration 1


def test_a_run_stopped_by_patience_resumes_as_finished_without_computing_again(tmp_path, caplog):
    settings = {"convergence.d_conv_relative": 0.001, "convergence.patience": 2}
    first = scripted_extractor(ScriptedRefiner([20.0, 0.5, 0.5, 0.5, 0.5, 0.5]), **settings)
    stopped = first.extract("a colour", run_dir=tmp_path / "run")
    assert not stopped.converged and stopped.stop_reason == "no lower spread in 2 iterations"
    refiner = ScriptedRefiner([20.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    with caplog.at_level("WARNING"):
        again = scripted_extractor(refiner, **settings).extract(
            "a colour", run_dir=tmp_path / "run", resume=True
        )
    assert not [r for r in caplog.records if "again" in r.getMessage()]
    assert not refiner.calls and again.iterations == stopped.iterations
    assert torch.equal(again.identity.clip_l, stopped.identity.clip_l)


def test_prior_preservation_gives_the_refiner_iteration_0s_images_without_the_token():
    refiner = ScriptedRefiner([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    extractor = scripted_extractor(refiner, **{"refiner.prior_preservation": 0.5})
    extractor.extract("a colour")
    assert refiner.priors and all(p == (40, ["a colour"] * 40) for p in refiner.priors)
    refiner = ScriptedRefiner([1.0] * 6)
    scripted_extractor(refiner).extract("a colour")
    assert all(p is None for p in refiner.priors)


def test_core_size_refines_on_the_chosen_clusters_densest_images(tmp_path):
    extractor = make_extractor(core_size=3)
    result = extractor.extract("a colour", run_dir=tmp_path / "run")
    calls = extractor.refiner.calls
    assert calls and all(n == 3 for _, n, _ in calls)
    run = RunDirectory(tmp_path / "run")
    for i in range(len(calls)):
        saved = run.load_clusters(i)
        core = saved["core"]
        assert len(core) == 3 and all(saved["labels"][j] == saved["chosen"] for j in core)
        assert saved["cohesions"][saved["chosen"]] == result.history[i].chosen_cohesion
    assert "densest 3 images" in (tmp_path / "run" / "report.html").read_text()
    plain = make_extractor()
    plain.extract("a colour", run_dir=tmp_path / "plain")
    assert any(n > 3 for _, n, _ in plain.refiner.calls)
    assert RunDirectory(tmp_path / "plain").load_clusters(0)["core"] is None


def test_core_spans_variations_refines_on_images_of_every_variation(tmp_path):
    variations = ["{prompt} one", "{prompt} two", "{prompt} three", "{prompt} four"]
    extractor = make_extractor(
        core_size=4, prompt_variations=variations, core_spans_variations=True
    )
    extractor.extract("a colour", run_dir=tmp_path / "run")
    run = RunDirectory(tmp_path / "run")
    for i in range(len(extractor.refiner.calls)):
        saved = run.load_clusters(i)
        members = [j for j, label in enumerate(saved["labels"]) if label == saved["chosen"]]
        spanned = {j % 4 for j in saved["core"]}
        assert len(spanned) == min(4, len({j % 4 for j in members}))
    with pytest.raises(ValueError, match="set core_size and prompt_variations too"):
        ExtractorConfig.from_overrides({"core_spans_variations": True, "core_size": 4})


@pytest.mark.parametrize(("iteration", "stage"), [(1, "embed"), (2, "refine"), (3, "generate")])
def test_resume_with_every_option_on_gives_the_same_identity(tmp_path, iteration, stage):
    options = {
        "convergence.d_conv_relative": 0.001,
        "convergence.max_anchor_ratio": 4.0,
        "convergence.patience": 2,
        "convergence.return_best": True,
        "warm_start": False,
        "refiner.prior_preservation": 0.5,
        "core_size": 4,
    }

    def extractor():
        return scripted_extractor(ScriptedRefiner([20.0, 0.5, 0.5, 0.5, 0.5, 0.5]), **options)

    reference = extractor().extract("a colour", run_dir=tmp_path / "ref")
    with pytest.raises(Interrupt):
        extractor().extract(
            "a colour", run_dir=tmp_path / "cut", callback=stop_after(iteration, stage)
        )
    resumed_extractor = extractor()
    resumed = resumed_extractor.extract("a colour", run_dir=tmp_path / "cut", resume=True)
    assert [r.to_dict() | {"seconds": {}} for r in resumed.history] == [
        r.to_dict() | {"seconds": {}} for r in reference.history
    ]
    assert torch.equal(resumed.identity.clip_l, reference.identity.clip_l)
    assert float(resumed.identity.clip_l[0, 3]) == 20.0  # the best, read back from disk
    assert resumed.stop_reason == reference.stop_reason == "no lower spread in 2 iterations"
    reopened = extractor().extract("a colour", run_dir=tmp_path / "ref", resume=True)
    assert reopened.stop_reason == reference.stop_reason
    # Refines after the cut still got iteration 0's images as the prior.
    assert all(p == (40, ["a colour"] * 40) for p in resumed_extractor.refiner.priors)


class PaintingRefiner(ScriptedRefiner):
    """ScriptedRefiner whose refine at iteration k also sets the identity's colour to
    colours[k]."""

    def __init__(self, strengths, colours):
        super().__init__(strengths)
        self.colours = colours

    def refine(self, identity, images, captions, *, seed, **kwargs):
        new = super().refine(identity, images, captions, seed=seed, **kwargs)
        new.clip_l[0, :3] = torch.tensor(self.colours[self.seeds.index(seed)], dtype=torch.float32)
        return new


@pytest.mark.parametrize("cut", [None, (2, "embed"), (2, "generate")])
def test_over_saturated_images_stop_the_loop_and_the_identity_before_them_is_returned(
    tmp_path, cut
):
    # Iteration 1 draws a loose greyish red; iteration 2 a tight pure red, whose spread passes
    # the test but whose images are far more saturated than the base model's.
    def run(rise, run_dir=None, callback=None, resume=False):
        refiner = PaintingRefiner([1.0, 200.0, 200.0], [(120, 100, 100), (250, 5, 5), (0, 0, 0)])
        overrides = {
            "max_iterations": 3,
            "convergence.return_best": True,
            "convergence.max_saturation_rise": rise,
        }
        extractor = scripted_extractor(refiner, **overrides)
        return extractor.extract("a colour", run_dir=run_dir, callback=callback, resume=resume)

    free = run(None)
    assert free.converged and free.iterations == 3
    assert free.identity.clip_l[0, :3].tolist() == [250, 5, 5]
    if cut is None:
        guarded = run(0.3)
    else:
        with pytest.raises(Interrupt):
            run(0.3, tmp_path / "run", callback=stop_after(*cut))
        guarded = run(0.3, tmp_path / "run", resume=True)
    base, first, second = (r.saturation for r in guarded.history)
    assert first < 1.3 * base < second
    assert not guarded.converged and guarded.iterations == 3
    assert not any(r.converged for r in guarded.history)
    assert guarded.identity.clip_l[0, :3].tolist() == [120, 100, 100]  # drew iteration 1


class _PoolRecordingRefiner(ScriptedRefiner):
    """ScriptedRefiner that records the images of every refine call."""

    def __init__(self) -> None:
        super().__init__([0.5] * 6)
        self.pools: list[list[bytes]] = []

    def refine(self, identity, images, captions, *, seed, **kwargs):
        self.pools.append([image.tobytes() for image in images])
        return super().refine(identity, images, captions, seed=seed, **kwargs)


def _chosen_images(run_dir, iteration: int) -> list[bytes]:
    run = RunDirectory(run_dir)
    saved = run.load_clusters(iteration)
    images = run.load_images(iteration, len(saved["labels"]))
    return [images[j].tobytes() for j, c in enumerate(saved["labels"]) if c == saved["chosen"]]


def test_accumulate_chosen_refines_on_every_earlier_iterations_chosen_images(tmp_path):
    def run(accumulate, run_dir, **kwargs):
        refiner = _PoolRecordingRefiner()
        overrides = {"accumulate_chosen": accumulate, "convergence.d_conv_relative": 0.001}
        scripted_extractor(refiner, **overrides).extract("a colour", run_dir=run_dir, **kwargs)
        return refiner.pools

    alone = run(False, tmp_path / "alone")
    assert len(alone) >= 3
    assert all(pool == _chosen_images(tmp_path / "alone", i) for i, pool in enumerate(alone))
    pooled = run(True, tmp_path / "pooled")
    assert len(pooled) == len(alone)
    for i, pool in enumerate(pooled):
        expected = [im for k in range(i + 1) for im in _chosen_images(tmp_path / "pooled", k)]
        assert pool == expected
    # A resumed run reads the earlier iterations' chosen images back from its folder.
    with pytest.raises(Interrupt):
        run(True, tmp_path / "cut", callback=stop_after(2, "generate"))
    assert run(True, tmp_path / "cut", resume=True) == pooled[2:]


def test_per_variation_spread_is_measured_within_each_variations_images(tmp_path):
    variations = ["{prompt} by day", "{prompt} at night"]

    def spreads(per_variation):
        extractor = make_extractor(
            prompt_variations=variations,
            max_iterations=2,
            **{"convergence.per_variation": per_variation},
        )
        extractor.generator = _SettingGenerator()
        run_dir = tmp_path / str(per_variation)
        result = extractor.extract("a colour", run_dir=run_dir)
        return [r.spread for r in result.history], RunDirectory(run_dir)

    plain, _ = spreads(False)
    within, run = spreads(True)
    for i, spread in enumerate(within):
        x = run.load_embeddings(i)
        expected = (mean_pairwise_distance(x[0::2]) + mean_pairwise_distance(x[1::2])) / 2
        assert spread == pytest.approx(expected, rel=1e-9)
    assert within[0] < plain[0]  # day and night apart no longer count as disagreement


def test_per_variation_needs_two_images_per_variation():
    with pytest.raises(ConfigError, match="at least 2 images per prompt variation"):
        make_extractor(
            num_images=5,
            d_size_c=1,
            d_min_c=1,
            prompt_variations=["{prompt} a", "{prompt} b", "{prompt} c"],
            **{"convergence.per_variation": True},
        )


class _PromptKeepingGenerator(ColourGenerator):
    """ColourGenerator that remembers which prompt drew each image."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_of: dict[bytes, str] = {}

    def generate(self, prompts, seeds, identity=None):
        images = super().generate(prompts, seeds, identity)
        for prompt, image in zip(prompts, images, strict=True):
            self.prompt_of[image.tobytes()] = prompt
        return images


class _ImageKeepingRefiner(MeanColourRefiner):
    def __init__(self, token: str) -> None:
        super().__init__(token=token)
        self.pairs: list[tuple[bytes, str]] = []
        self.prior_captions: list[list[str]] = []

    def refine(self, identity, images, captions, *, seed, prior_images=None, prior_captions=None):
        self.pairs += [(im.tobytes(), cap) for im, cap in zip(images, captions, strict=True)]
        if prior_captions is not None:
            self.prior_captions.append(list(prior_captions))
        return super().refine(identity, images, captions, seed=seed)


def test_prompt_variations_are_drawn_in_turn_and_each_caption_names_its_images_variation():
    variations = ["{prompt} at night", "{prompt} by day", "a drawing of {prompt}"]
    extractor = make_extractor(
        prompt_variations=variations, max_iterations=3, **{"refiner.prior_preservation": 1.0}
    )
    generator = _PromptKeepingGenerator()
    refiner = _ImageKeepingRefiner(token="<cc-char>")
    extractor.generator, extractor.refiner = generator, refiner
    extractor.extract("a colour")

    texts = ["a colour at night", "a colour by day", "a drawing of a colour"]
    first, later = generator.calls[0][0], [p for prompts, _ in generator.calls[1:] for p in prompts]
    assert first == [texts[j % 3] for j in range(40)]
    assert later and all(p in [f"<cc-char> {t}" for t in texts] for p in later)
    # Every member is captioned with the words that drew it (the token added at iteration 0).
    assert len({cap for _, cap in refiner.pairs}) > 1
    for image, caption in refiner.pairs:
        drawn = generator.prompt_of[image]
        assert caption == (drawn if drawn.startswith("<cc-char> ") else f"<cc-char> {drawn}")
    # Prior preservation captions iteration 0's images by their own variation, without the token.
    assert refiner.prior_captions and all(c == first for c in refiner.prior_captions)


@pytest.mark.parametrize(
    ("variation", "message"),
    [
        ("in the snow", "the prompt variation must contain {prompt}"),
        ("{prompt} {token}", "the prompt variation may hold only {prompt}, found {token}"),
    ],
)
def test_a_prompt_variation_without_prompt_or_with_other_fields_is_refused(variation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ExtractorConfig.from_overrides({"prompt_variations": [variation]})


class _SettingGenerator(ColourGenerator):
    """ColourGenerator whose settings shift every image: by day in the darker half of each
    channel, at night in the brighter half (a setting that moves an embedding further than
    most colour differences do)."""

    def generate(self, prompts, seeds, identity=None):
        images = super().generate(prompts, seeds, identity)
        out = []
        for prompt, image in zip(prompts, images, strict=True):
            pixels = np.asarray(image, dtype=np.float32) * 0.5
            if prompt.endswith("at night"):
                pixels += 128
            out.append(Image.fromarray(pixels.astype(np.uint8)))
        return out


def test_centre_variations_clusters_the_character_not_the_setting():
    variations = ["{prompt} by day", "{prompt} at night"]

    def chosen_members(centre):
        extractor = make_extractor(
            prompt_variations=variations, centre_variations=centre, max_iterations=1
        )
        extractor.generator = _SettingGenerator()
        extractor.extract("a colour")
        return extractor.refiner.calls[0][2]  # the chosen members' captions

    # Without centring, every cluster holds one setting only.
    captions = chosen_members(False)
    assert len({c.endswith("at night") for c in captions}) == 1
    # Centred, the setting's offset is gone and clusters follow the colour across settings.
    captions = chosen_members(True)
    assert {c.endswith("at night") for c in captions} == {True, False}


def test_cosine_distance_clusters_directions_not_lengths():
    # Two nearby directions, each at two lengths: Euclidean k-means splits by length, cosine
    # by direction.
    rng = np.random.default_rng(0)
    directions = np.array([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0]])
    rows = [directions[j % 2] * (1.0 if j % 4 < 2 else 10.0) for j in range(40)]
    embeddings = (np.array(rows) + rng.normal(0, 0.01, (40, 3))).astype(np.float32)
    direction = np.arange(40) % 2

    def labels(distance):
        extractor = make_extractor(**{"clusterer.distance": distance})
        features = extractor._features(embeddings, ["a colour"] * 40)
        clusterer = FaissKMeansClusterer(spherical=distance == "cosine")
        found, _ = clusterer.cluster(features, 2, seed=0)
        return found

    cosine = labels("cosine")
    assert all(len(set(cosine[direction == d])) == 1 for d in (0, 1))
    assert len(set(cosine)) == 2
    euclidean = labels("euclidean")
    length = (np.arange(40) % 4) // 2
    assert all(len(set(euclidean[length == k])) == 1 for k in (0, 1))
    assert len(set(euclidean)) == 2


def test_cosine_features_have_unit_length_and_other_distances_are_errors():
    from consistent_char.config import ExtractorConfig

    config = ExtractorConfig.from_overrides({"clusterer.distance": "cosine"})
    extractor = make_extractor(**{"clusterer.distance": "cosine"})
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    features = extractor._features(x, ["p"] * 3)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), [1.0, 0.0, 1.0], rtol=1e-6)
    assert x[0, 0] == 3.0  # the embeddings themselves are left as they are
    assert config.clusterer.distance == "cosine"
    with pytest.raises(ConfigError, match="distance"):
        ExtractorConfig.from_overrides({"clusterer.distance": "manhattan"})
