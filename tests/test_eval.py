"""Evaluation: ToyWorld scoring (exact values on hand-made probe records), a finished run scored
beside its vanilla prompt, the benchmark, its outputs, and the real-model measures, all on tiny
random models (the numbers are meaningless there; shapes, keys and ranges are not)."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from consistent_char import ExtractorConfig, IterativeIdentityExtractor
from consistent_char.cli import app
from consistent_char.eval.methods import METHODS
from consistent_char.eval.toy import (
    render_identity_in_scenes,
    scene_prompts,
    scene_seed,
    score_records,
    score_toy,
)
from consistent_char.generators.sdxl import SDXLGenerator
from consistent_char.testing.tiny import tiny_dinov2, tiny_identity, tiny_sdxl_pipeline
from consistent_char.toy.models import IdentityProbe, ProbeConfig
from consistent_char.toy.world import IDENTITY_ATTRIBUTES, SCENES

A = {"shape": "round", "color": "red", "hat": "cap", "hat_color": "blue", "eyes": "big"}
B = {**A, "eyes": "dots"}
C = {**A, "color": "blue", "hat": "none", "hat_color": "none"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_sdxl_pipeline(seed=0, directory=root / "sdxl")
    tiny_dinov2(seed=0, directory=root / "dinov2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        IdentityProbe(ProbeConfig()).save_pretrained(root / "probe")  # random: shapes only
    return root


@pytest.fixture(scope="module")
def tiny_run(models, tmp_path_factory):
    """A finished two-iteration run on the tiny models."""
    run = tmp_path_factory.mktemp("runs") / "run"
    config = ExtractorConfig.from_overrides(
        {
            "model": str(models / "sdxl"),
            "device": "cpu",
            "num_images": 8,
            "d_size_c": 4,
            "d_min_c": 2,
            "max_iterations": 2,
            "generator.num_inference_steps": 2,
            "embedder.model": str(models / "dinov2"),
            "refiner.steps": 2,
            "refiner.batch_size": 2,
            "refiner.initializer_token": "creature",
        }
    )
    IterativeIdentityExtractor.from_config(config).extract("a red creature", run_dir=run)
    return run


class ListProbe:
    """Returns prepared records in order, as a probe would read them."""

    def __init__(self, records):
        self.records = list(records)
        self.seen = 0

    def predict(self, images):
        out = self.records[self.seen : self.seen + len(images)]
        self.seen += len(images)
        return out


# ----------------------------------------------------------------- the measures, exactly


def test_score_records_exact_values_on_hand_made_records():
    records = [
        {**A, "scene": "snow"},  # asked: snow
        {**A, "scene": "snow"},  # asked: snow
        {**A, "scene": "city"},  # asked: city
        {**B, "scene": "forest"},  # asked: city (wrong scene)
        {**C, "scene": "night"},  # asked: night
    ]
    scenes = ["snow", "snow", "city", "city", "night"]
    result = score_records(records, scenes, base_prompt="a red creature")

    # Cross-scene pairs: 10 pairs minus (0,1) and (2,3) = 8. Identity agrees on (0,2), (1,2): 2.
    assert result["identity_consistency"] == pytest.approx(2 / 8)
    # Scenes right on images 0, 1, 2, 4.
    assert result["prompt_adherence"] == pytest.approx(4 / 5)
    assert result["n_images"] == 5
    assert result["distinct_identities"] == 3
    agreement = result["attribute_agreement"]
    assert set(agreement) == set(IDENTITY_ATTRIBUTES)
    # eyes: A-A pairs (0,2), (1,2) and the C pairs with A (0,4), (1,4), (2,4) agree = 5 of 8.
    assert agreement["eyes"] == pytest.approx(5 / 8)
    # colour: C differs from everyone (4 pairs): 4 of 8 agree.
    assert agreement["color"] == pytest.approx(4 / 8)
    assert agreement["shape"] == 1.0
    # "a red creature" names colour only: images 0-3 are red.
    assert result["base_prompt_adherence"] == pytest.approx(4 / 5)
    assert score_records(records, scenes, base_prompt="a creature")["base_prompt_adherence"] is None
    # "wearing a hat" names no hat type but rules out "none" (image 4 has no hat).
    hat = score_records(records, scenes, base_prompt="a creature wearing a hat")
    assert hat["base_prompt_adherence"] == pytest.approx(4 / 5)
    both = score_records(records, scenes, base_prompt="a blue creature wearing a crown")
    assert both["base_prompt_adherence"] == 0.0


def test_score_records_matches_a_brute_force_count():
    records = [{**[A, B, C][i % 3], "scene": SCENES[i % 5]} for i in range(12)]
    scenes = [SCENES[(i * 2) % 5] for i in range(12)]
    pairs = [(i, j) for i, j in combinations(range(12), 2) if scenes[i] != scenes[j]]
    same = sum(all(records[i][a] == records[j][a] for a in IDENTITY_ATTRIBUTES) for i, j in pairs)
    result = score_records(records, scenes)
    assert result["identity_consistency"] == pytest.approx(same / len(pairs))
    hits = sum(r["scene"] == s for r, s in zip(records, scenes, strict=True))
    assert result["prompt_adherence"] == pytest.approx(hits / 12)
    assert "base_prompt_adherence" not in result


def test_score_records_rejects_what_it_cannot_measure():
    with pytest.raises(ValueError, match="at least 2 scenes"):
        score_records([{**A, "scene": "snow"}] * 2, ["snow", "snow"])
    with pytest.raises(ValueError, match="records but"):
        score_records([{**A, "scene": "snow"}], ["snow", "city"])


def test_score_toy_reads_images_with_the_probe():
    images = [Image.new("RGB", (8, 8))] * 4
    records = [{**A, "scene": "snow"}, {**A, "scene": "city"}, {**B, "scene": "city"}]
    records.append({**A, "scene": "snow"})
    drawn = list(zip(["snow", "snow", "city", "city"], images, strict=True))
    result = score_toy(drawn, ListProbe(records))
    # Cross-scene pairs (0,2) (0,3) (1,2) (1,3); identity agrees on (0,3) and (1,3).
    assert result["identity_consistency"] == pytest.approx(2 / 4)
    assert result["prompt_adherence"] == pytest.approx(2 / 4)


# ------------------------------------------------------------ drawing in scenes


def test_scene_prompts_use_the_identity_template_and_distinct_seeds(models):
    pipe = tiny_sdxl_pipeline()
    identity = tiny_identity(pipe, "<tiny>")
    identity.metadata["identity_prompt_template"] = "{prompt}, {token}"
    jobs = scene_prompts(identity, "a creature", ["snow", "night"], seeds_per_scene=3, seed=5)
    assert [j[0] for j in jobs] == ["snow"] * 3 + ["night"] * 3
    assert jobs[0][1] == "a creature in the snow, <tiny>"
    assert jobs[3][1] == "a creature at night, <tiny>"
    assert len({j[2] for j in jobs}) == 6
    assert jobs[4][2] == scene_seed(5, 1, 1)
    vanilla = scene_prompts(None, "a  creature ", ["beach"], seeds_per_scene=1)
    assert vanilla == [("beach", "a creature on the beach", scene_seed(0, 0, 0))]
    with pytest.raises(ValueError, match="scene must be one of"):
        scene_prompts(None, "a creature", ["moon"])


def test_render_identity_in_scenes_on_a_tiny_pipeline():
    pipe = tiny_sdxl_pipeline()
    generator = SDXLGenerator.from_pipeline(pipe, num_inference_steps=2)
    identity = tiny_identity(pipe, "<tiny>")
    drawn = render_identity_in_scenes(generator, identity, "a creature", SCENES, 1)
    assert [s for s, _ in drawn] == list(SCENES)
    assert all(im.size == (32, 32) and im.mode == "RGB" for _, im in drawn)
    again = render_identity_in_scenes(generator, identity, "a creature", SCENES, 1)
    assert all(a.tobytes() == b.tobytes() for (_, a), (_, b) in zip(drawn, again, strict=True))


# ------------------------------------------------------------- a finished run


def test_eval_run_cli_scores_identity_and_vanilla(models, tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "run", str(tiny_run), "--seeds-per-scene", "2", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--probe", str(models / "probe")])
    assert result.exit_code == 0, result.output
    assert "identity consistency" in result.output
    data = json.loads(out.read_text())
    assert data["prompt"] == "a red creature" and data["iterations"] == 2
    assert data["scenes"] == list(SCENES) and data["seeds_per_scene"] == 2
    for name in ("identity", "vanilla"):
        score = data[name]
        assert score["n_images"] == 10
        assert 0.0 <= score["identity_consistency"] <= 1.0
        assert 0.0 <= score["prompt_adherence"] <= 1.0
        assert set(score["attribute_agreement"]) == set(IDENTITY_ATTRIBUTES)
        assert score["base_prompt_adherence"] is None or 0 <= score["base_prompt_adherence"] <= 1
        assert 0.0 <= score["validity"] <= 1.0
        assert data["seconds"][name] > 0
    # Every iteration read back, iteration 0's chosen character against the final identity.
    assert [m["iteration"] for m in data["per_iteration"]] == [0, 1]
    assert all(0.0 <= m["validity"] <= 1.0 for m in data["per_iteration"])
    assert data["min_validity"] == min(m["validity"] for m in data["per_iteration"])
    assert set(data["drift"]["chosen"]) == set(IDENTITY_ATTRIBUTES)
    assert 0.0 <= data["drift"]["kept"] <= 1.0
    # Kept in the run, and shown in its report.
    assert json.loads((tiny_run / "evaluation.json").read_text())["drift"] == data["drift"]
    assert "ToyWorld evaluation" in (tiny_run / "report.html").read_text()


def test_eval_run_draws_at_the_guidance_scale_asked_for(models, tiny_run, monkeypatch):
    from consistent_char.eval.run import evaluate_run

    used: list[float] = []
    original = SDXLGenerator.generate

    def spy(self, prompts, seeds, identity=None):
        used.append(self.guidance_scale)
        return original(self, prompts, seeds, identity)

    monkeypatch.setattr(SDXLGenerator, "generate", spy)
    own = ExtractorConfig.from_file(tiny_run / "config.yaml").generator.guidance_scale
    probe = str(models / "probe")
    result = evaluate_run(tiny_run, seeds_per_scene=1, probe=probe, guidance_scale=2.5)
    assert used == [2.5, 2.5] and result["guidance_scale"] == 2.5
    used.clear()
    first = evaluate_run(tiny_run, seeds_per_scene=1, probe=probe)
    assert first["guidance_scale"] == own
    assert used == [own, own] and own != 2.5
    # An earlier vanilla score is reused, not drawn again: one draw, the identity's.
    used.clear()
    again = evaluate_run(tiny_run, seeds_per_scene=1, probe=probe, vanilla=first["vanilla"])
    assert used == [own] and again["vanilla"] == first["vanilla"]
    with pytest.raises(ValueError, match="guidance_scale must be a number > 0"):
        evaluate_run(tiny_run, probe=probe, guidance_scale=0.0)
    with pytest.raises(ValueError, match="not both"):
        evaluate_run(tiny_run, probe=probe, guidance_scale=2.0, generator=object())


def test_eval_run_cli_rejects_a_folder_that_is_not_a_finished_run(tmp_path):
    result = CliRunner().invoke(app, ["eval", "run", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run directory" in result.output


# ----------------------------------------------------------------- the benchmark


def test_minimal_benchmark_cli_writes_results_table_and_figure(models, tmp_path):
    out = tmp_path / "bench"
    args = [
        "eval",
        "toy",
        "--preset",
        "minimal",
        "--out",
        str(out),
        "--probe",
        str(models / "probe"),
    ]
    args += ["--set", f"model={models / 'sdxl'}", "--set", f"embedder.model={models / 'dinov2'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "reduced: prompts: 2" in result.output

    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 1 and data["preset"] == "minimal" and data["reduced"]
    assert data["config"]["num_images"] == 4 and data["settings"]["seeds_per_scene"] == 1
    assert list(data["methods"]) == list(METHODS)
    for method in data["methods"].values():
        assert set(method["prompts"]) == {"a creature", "a red creature"}
        for entry in method["prompts"].values():
            assert 0.0 <= entry["identity_consistency"] <= 1.0
            assert 0.0 <= entry["prompt_adherence"] <= 1.0
            assert entry["n_images"] == 2 and entry["seconds"] >= 0.0
            assert 0.0 <= entry["validity"] <= 1.0
        mean = method["mean"]
        assert mean["n_prompts"] == 2 and 0.0 <= mean["identity_consistency"] <= 1.0
    methods = data["methods"]
    # Drift: none without an identity; from the single image or the loop's first cluster else.
    assert methods["vanilla"]["prompts"]["a creature"]["drift"] is None
    for name in ("ti_single", "loop_1", "loop"):
        entry = methods[name]["prompts"]["a creature"]
        assert 0.0 <= entry["drift"]["kept"] <= 1.0, name
    assert methods["ti_single"]["prompts"]["a creature"]["min_validity"] is None
    assert 0.0 <= methods["loop"]["prompts"]["a creature"]["min_validity"] <= 1.0
    assert (out / "runs" / "loop" / "a-creature" / "state.json").is_file()
    assert methods["vanilla"]["mean"]["iterations"] == 0
    assert methods["ti_single"]["prompts"]["a creature"]["iterations"] == 1
    assert methods["loop_1"]["prompts"]["a creature"]["iterations"] == 1
    assert 1 <= methods["loop"]["prompts"]["a creature"]["iterations"] <= 2
    assert set(data["ablations"]) == {"embedder", "K", "d_min_c", "template", "refiner"}
    refiner = data["ablations"]["refiner"]
    assert set(refiner["variants"]) == {"ti_lora", "ti", "lora"}
    # The baseline of every group is the plain loop, reused, not rerun.
    assert (
        refiner["variants"]["ti_lora"]["prompts"]["a creature"]
        == (methods["loop"]["prompts"]["a creature"])
    )
    assert refiner["variants"]["ti"]["overrides"] == {"refiner.mode": "ti"}

    table = (out / "results.md").read_text()
    assert "| loop (full) |" in table and "`ti_lora` (baseline)" in table
    assert "| drift kept | validity |" in table
    with Image.open(out / "scatter.png") as image:
        assert image.size == (1000, 640)
    assert (out / "grids" / "loop" / "a-red-creature.png").is_file()

    # Other settings into the same folder: an error, not a silent overwrite.
    other = CliRunner().invoke(app, [*args, "--seeds-per-scene", "2"])
    assert other.exit_code == 2 and "written with other settings" in other.output
    # A second call reuses every entry of results.json.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("(from results.json)") == len(
        [line for line in again.output.splitlines() if line.startswith("[")]
    )


# ------------------------------------------------------------ real-model measures


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel with its tokenizer and image processor, saved like a hub folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from consistent_char.testing.tiny import TINY_WORDS
    from consistent_char.tokenizers import build_clip_tokenizer

    root = tmp_path_factory.mktemp("clip")
    tokenizer = build_clip_tokenizer(TINY_WORDS, root)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 16,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(root)
    return root


def test_clip_t_on_a_tiny_clip_loaded_from_a_folder(tiny_clip_dir):
    from transformers import CLIPModel

    from consistent_char.eval.real import CLIPScorer

    clip = CLIPScorer.from_pretrained(tiny_clip_dir)
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "white")]
    prompts = ["a red creature", "a blue cat in the snow", "a photo"]
    scores = clip.scores(images, prompts)
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)
    assert np.array_equal(scores, clip.scores(images, prompts))
    # The same cosine as CLIPModel's own logits (divided by its temperature).
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokens = clip.tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = torch.from_numpy(clip.preprocess(images))
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels)
        reference = (out.logits_per_image.diagonal() / model.logit_scale.exp()).numpy()
    np.testing.assert_allclose(scores, reference, atol=1e-5)
    with pytest.raises(ValueError, match="images but"):
        clip.scores(images, prompts[:2])


def test_identity_similarity_is_the_mean_pairwise_cosine():
    from consistent_char.eval.real import identity_similarity

    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # cosines: (0,1) 0, (0,2) 1/sqrt2, (1,2) 1/sqrt2
    assert identity_similarity(x) == pytest.approx(2 / np.sqrt(2) / 3)
    assert identity_similarity(np.ones((4, 3))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        identity_similarity(x[:1])


def test_prompt_set_file_subjects_times_settings(tmp_path):
    from consistent_char.eval.real import PromptSet

    path = tmp_path / "prompts.yaml"
    path.write_text(
        "settings: [in the snow, at night]\n"
        "subjects:\n"
        "  - a red cat\n"
        "  - subject: a green robot\n"
        "    settings: [in the city]\n"
    )
    ps = PromptSet.from_file(path)
    assert [s.name for s in ps.subjects] == ["a red cat", "a green robot"]
    assert ps.prompts(ps.subjects[0]) == [
        ("in the snow", "a red cat in the snow"),
        ("at night", "a red cat at night"),
    ]
    assert ps.prompts(ps.subjects[1]) == [("in the city", "a green robot in the city")]
    as_json = tmp_path / "prompts.json"
    as_json.write_text(
        json.dumps({"template": "{setting}, {subject}", "settings": ["x"], "subjects": ["a dog"]})
    )
    assert PromptSet.from_file(as_json).prompts(PromptSet.from_file(as_json).subjects[0]) == [
        ("x", "x, a dog")
    ]
    with pytest.raises(ValueError, match="unknown prompt-set keys"):
        PromptSet.from_mapping({"subjects": ["a"], "setting": ["b"]})
    with pytest.raises(ValueError, match="has no settings"):
        PromptSet.from_mapping({"subjects": ["a"]})


def test_evaluate_prompt_set_on_tiny_models(models, tiny_clip_dir):
    from consistent_char.embedders.dinov2 import DINOv2Embedder
    from consistent_char.eval.real import (
        CLIPScorer,
        PromptSet,
        dreamsim_available,
        evaluate_prompt_set,
    )

    pipe = tiny_sdxl_pipeline()
    generator = SDXLGenerator.from_pipeline(pipe, num_inference_steps=2)
    prompt_set = PromptSet.from_mapping(
        {"settings": ["in the snow", "at night"], "subjects": ["a red cat", "a blue dog"]}
    )
    result = evaluate_prompt_set(
        generator,
        prompt_set,
        clip=CLIPScorer.from_pretrained(tiny_clip_dir),
        dino=DINOv2Embedder.from_pretrained(models / "dinov2"),
        identities={"a red cat": tiny_identity(pipe, "<tiny>")},
        seeds_per_setting=2,
    )
    assert result["with_identity"] == ["a red cat"]
    assert set(result["subjects"]) == {"a red cat", "a blue dog"}
    for score in [*result["subjects"].values(), result["mean"]]:
        assert -1.0 <= score["clip_t"] <= 1.0
        assert -1.0 <= score["dino_similarity"] <= 1.0 + 1e-6
        if not dreamsim_available():
            assert score["dreamsim_similarity"] is None
    assert result["subjects"]["a red cat"]["n_images"] == 4
    for score in result["subjects"].values():
        assert -1.0 <= score["clip_i"] <= 1.0 + 1e-6
    assert "vanilla" not in result
    with pytest.raises(ValueError, match="not in the prompt set"):
        evaluate_prompt_set(generator, prompt_set, clip=None, dino=None, identities={"a fox": None})


def test_clip_i_is_the_mean_pairwise_cosine_of_clip_image_embeddings(models, tiny_clip_dir):
    from transformers import CLIPModel

    from consistent_char.embedders.dinov2 import DINOv2Embedder
    from consistent_char.eval.real import CLIPScorer, score_images

    clip = CLIPScorer.from_pretrained(tiny_clip_dir)
    dino = DINOv2Embedder.from_pretrained(models / "dinov2")
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "white")]
    drawn = {"a cat": [(f"a cat {k}", im) for k, im in enumerate(images)]}
    drawn["a dog"] = [("a dog", images[0]), ("a dog at night", images[0])]
    result = score_images(drawn, clip=clip, dino=dino)

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        pixels = torch.from_numpy(clip.preprocess(images))
        x = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    x = torch.nn.functional.normalize(x.double(), dim=1)
    pairs = [float(x[i] @ x[j]) for i, j in combinations(range(3), 2)]
    assert result["subjects"]["a cat"]["clip_i"] == pytest.approx(np.mean(pairs), abs=1e-5)
    assert result["subjects"]["a dog"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    expected = (np.mean(pairs) + 1.0) / 2
    assert result["mean"]["clip_i"] == pytest.approx(expected, abs=1e-5)


def test_vanilla_draws_the_identity_subjects_again_without_it(models, tiny_clip_dir):
    from consistent_char.embedders.dinov2 import DINOv2Embedder
    from consistent_char.eval.real import CLIPScorer, PromptSet, evaluate_prompt_set

    class Recorder:
        """The tiny SDXL generator, noting each call's seeds and identity."""

        def __init__(self, generator):
            self.generator, self.calls = generator, []

        def generate(self, prompts, seeds, identity=None):
            self.calls.append((list(prompts), list(seeds), identity))
            return self.generator.generate(prompts, seeds, identity)

    pipe = tiny_sdxl_pipeline()
    generator = Recorder(SDXLGenerator.from_pipeline(pipe, num_inference_steps=2))
    identity = tiny_identity(pipe, "<tiny>")
    prompt_set = PromptSet.from_mapping({"settings": ["at night"], "subjects": ["a cat", "a dog"]})
    result = evaluate_prompt_set(
        generator,
        prompt_set,
        clip=CLIPScorer.from_pretrained(tiny_clip_dir),
        dino=DINOv2Embedder.from_pretrained(models / "dinov2"),
        identities={"a dog": identity},
        seeds_per_setting=2,
        vanilla=True,
    )
    # The dog twice (with and without its identity, same seeds), the cat once.
    assert [(seeds, i is identity) for _, seeds, i in generator.calls] == [
        ([0, 1], False),
        ([1000, 1001], True),
        ([1000, 1001], False),
    ]
    assert generator.calls[2][0] == ["a dog at night"] * 2
    assert set(result["vanilla"]["subjects"]) == {"a dog"}
    assert result["mean_with_identity"] == {
        k: result["subjects"]["a dog"][k] for k in result["mean_with_identity"]
    }


def test_eval_real_reads_a_cast_folder_and_the_built_in_set(tmp_path):
    from consistent_char.cast import CastRecord, SubjectRecord, load_subjects
    from consistent_char.eval.commands import load_prompt_set

    names = [s.name for s in load_subjects("consistory+")[0].subjects]
    pipe = tiny_sdxl_pipeline()
    tiny_identity(pipe, "<tiny>").save(tmp_path / "cast" / "first" / "identity")
    record = CastRecord("consistory+", [SubjectRecord(names[0], "first", "done")])
    record.subjects.append(SubjectRecord(names[1], "second", "failed", error="boom"))
    record.write(tmp_path / "cast")

    prompts, identities, unfinished = load_prompt_set("consistory+", [], tmp_path / "cast")
    assert len(prompts.subjects) == 184
    assert list(identities) == [names[0]] and identities[names[0]].token == "<tiny>"
    assert len(unfinished) == 183 and names[1] in unfinished

    (tmp_path / "other.yaml").write_text("settings: [x]\nsubjects: [a fox]\n")
    with pytest.raises(ValueError, match="whose subjects .* are not in this prompt set"):
        load_prompt_set(str(tmp_path / "other.yaml"), [], tmp_path / "cast")
    with pytest.raises(FileNotFoundError, match="not a cast folder"):
        load_prompt_set("consistory+", [], tmp_path)


def test_eval_real_cli_scores_a_prompt_set_from_folders(models, tiny_clip_dir, tmp_path):
    from consistent_char.eval.real import dreamsim_available

    (tmp_path / "prompts.yaml").write_text(
        "settings: [in the snow, at night]\nsubjects: [a red cat, a blue dog]\n"
    )
    pipe = tiny_sdxl_pipeline()
    tiny_identity(pipe, "<tiny>").save(tmp_path / "cat")
    args = [
        "eval", "real", str(tmp_path / "prompts.yaml"),
        "--model", str(models / "sdxl"),
        "--identity", f"a red cat={tmp_path / 'cat'}",
        "--clip", str(tiny_clip_dir),
        "--dino", str(models / "dinov2"),
        "--seeds-per-setting", "2", "--steps", "2", "--device", "cpu",
        "--out", str(tmp_path / "real.json"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "real.json").read_text())
    assert saved["with_identity"] == ["a red cat"] and saved["identities"] == {
        "a red cat": "<tiny>"
    }
    assert {s: v["n_images"] for s, v in saved["subjects"].items()} == {
        "a red cat": 4,
        "a blue dog": 4,
    }
    assert -1.0 <= saved["mean"]["clip_t"] <= 1.0
    assert (saved["mean"]["dreamsim_similarity"] is None) == (not dreamsim_available())
    assert "a red cat" in result.output and "mean" in result.output

    unknown = CliRunner().invoke(
        app, [*args[:5], "--identity", f"a fox={tmp_path / 'cat'}", *args[7:]]
    )
    assert unknown.exit_code == 2 and "not in" in unknown.output
    malformed = CliRunner().invoke(app, [*args[:5], "--identity", "no-equals-sign", *args[7:]])
    assert malformed.exit_code == 2 and "SUBJECT=IDENTITY_DIR" in malformed.output

    # --cast maps each finished subject of a cast folder to its identity.
    from consistent_char.cast import CastRecord, SubjectRecord

    tiny_identity(pipe, "<tiny>").save(tmp_path / "cast" / "a-red-cat" / "identity")
    CastRecord("prompts.yaml", [SubjectRecord("a red cat", "a-red-cat", "done")]).write(
        tmp_path / "cast"
    )
    (tmp_path / "real.json").unlink()
    from_cast = CliRunner().invoke(app, [*args[:5], "--cast", str(tmp_path / "cast"), *args[7:]])
    assert from_cast.exit_code == 0, from_cast.output
    saved = json.loads((tmp_path / "real.json").read_text())
    assert saved["cast"] == str(tmp_path / "cast")
    assert saved["identities"] == {"a red cat": "<tiny>"}
    assert "1 subjects with an identity" in from_cast.output
    assert "The Chosen One (identity)" in from_cast.output
    assert "vanilla (base model)" in from_cast.output
    assert list(saved["vanilla"]["subjects"]) == ["a red cat"]
    assert "no finished identity for 1 of the set's 2 subjects" in from_cast.output


# ------------------------------------------------------- presets, estimate, outputs


def test_presets_are_valid_and_say_what_they_reduce():
    from consistent_char.eval.benchmark import (
        full_settings,
        minimal_settings,
        quick_settings,
        reductions,
    )

    full = full_settings()
    assert len(full.prompts) >= 6 and full.methods == list(METHODS)
    assert set(full.ablations) == {"embedder", "K", "d_min_c", "core_size", "template", "refiner"}
    assert reductions(full) == []
    assert list(full.ablation_variants("K")) == [
        "K=8 (d_size_c=8)",
        "K=4 (d_size_c=16)",
        "K=16 (d_size_c=4)",
    ]
    assert list(full.ablation_variants("refiner")) == ["ti_lora", "ti", "lora"]
    assert list(full.ablation_variants("core_size")) == ["core_size=5", "core_size=None"]
    quick = reductions(quick_settings())
    assert any(r.startswith("prompts: 2") for r in quick)
    assert "seeds per scene: 2 instead of 4" in quick
    assert "refiner.steps: 10 instead of 100" in quick
    assert minimal_settings().config().num_images == 4


def test_settings_fail_at_the_door():
    from consistent_char.config import ConfigError
    from consistent_char.eval.benchmark import quick_settings

    with pytest.raises(ValueError, match="unknown methods"):
        quick_settings().__class__(name="x", prompts=["a creature"], methods=["magic"])
    with pytest.raises(ConfigError, match="d_min_c"):
        quick_settings().with_overrides({"d_min_c": 99})
    with pytest.raises(ValueError, match="unknown ablation groups"):
        quick_settings().__class__(name="x", prompts=["a"], ablations={"lr": [{}]})


def test_a_benchmark_resumes_past_a_setting_added_since_at_its_default(tmp_path):
    from consistent_char.eval import benchmark

    settings = benchmark.minimal_settings()
    base = settings.config()
    saved = json.loads(json.dumps(benchmark._start(settings, base, None)))
    saved["methods"] = {"vanilla": {"prompts": {"a creature": {"done": True}}}}
    # A results.json written before `core_spans_variations` existed (it is off by default).
    del saved["config"]["core_spans_variations"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(saved))
    assert benchmark._start(settings, base, path)["methods"] == saved["methods"]
    saved["config"]["seed"] = base.seed + 1
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings or another config"):
        benchmark._start(settings, base, path)
    saved["config"] = {"num_images": "many"}
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other settings or another config"):
        benchmark._start(settings, base, path)


def test_estimate_counts_the_units_of_work():
    from consistent_char.eval.benchmark import UnitCosts, estimate_seconds, minimal_settings

    # Unit costs chosen so each term is easy to follow: 1 s per image-step (2 with an identity),
    # refine 10 s per call + 1 s per step, embedding and probe free, start-up 100 s.
    costs = UnitCosts(1.0, 2.0, 1.0, 10.0, 0.0, 0.0, startup=100.0)
    s = minimal_settings()  # 2 prompts; 2 scenes × 1 seed; N 4, 2 steps, 1 refine step, 2 its
    est = estimate_seconds(s, costs)
    evaluate = 2 * 2 * 2.0  # 2 images × 2 steps × 2 s
    assert est["methods"]["vanilla"] == 2 * (2 * 2 * 1.0)
    assert est["methods"]["ti_single"] == 2 * (2 * 1.0 + (10 + 1) + evaluate)
    loop = 2 * (10 + 1) + 4 * 2 * 1.0 + 1 * (4 * 2 * 2.0) + evaluate
    assert est["methods"]["loop"] == 2 * loop
    assert est["methods"]["loop_1"] == 2 * evaluate
    # 6 ablation variants on one prompt, each a loop of the same cost here; baselines are reused.
    assert est["ablations"] == 6 * loop
    assert est["total"] == 100 + sum(est["methods"].values()) + est["ablations"]


def test_markdown_table_and_scatter_from_hand_made_results(tmp_path):
    from consistent_char.eval.results import markdown_table, scatter_points, write_outputs

    entry = {
        "identity_consistency": 0.5,
        "prompt_adherence": 0.75,
        "base_prompt_adherence": None,
        "iterations": 2,
        "seconds": 3.0,
        "validity": 1.0,
        "min_validity": 0.5,
        "drift": {"kept": 0.8},
    }
    results = {
        "preset": "custom",
        "reduced": ["prompts: 1"],
        "settings": {
            "scenes": ["snow", "city"],
            "seeds_per_scene": 1,
            "prompts": ["a creature"],
            "ablation_prompts": ["a creature"],
        },
        "machine": {"torch_threads": 1},
        "seconds_total": 12.0,
        "methods": {"loop": {"label": "loop (full)", "prompts": {"a creature": entry}}},
        "ablations": {
            "refiner": {
                "baseline": "ti_lora",
                "variants": {
                    "ti_lora": {"overrides": {}, "prompts": {"a creature": entry}},
                    "ti": {"overrides": {"refiner.mode": "ti"}, "prompts": {}},
                },
            }
        },
    }
    table = markdown_table(results)
    assert "| loop (full) | 0.500 | 0.750 | – | 0.800 | 1.000 | 0.500 | 2.0 | 3.0 |" in table
    assert "| loop (full) | 0.500 / 0.750 |" in table
    assert "| refiner | `ti_lora` (baseline) | 0.500 | 0.750 | 0.800 | 0.500 | 2.0 | 3.0 |" in table
    assert "| refiner | `ti` | – | – | – | – | – | – |" in table
    assert "- prompts: 1" in table
    assert scatter_points(results)[0] == {
        "label": "loop (full)",
        "x": 0.75,
        "y": 0.5,
        "per_prompt": [(0.75, 0.5)],
    }
    paths = write_outputs(results, tmp_path)
    assert json.loads(paths["json"].read_text())["methods"]["loop"]["mean"]["n_prompts"] == 1
    with Image.open(paths["scatter"]) as image:
        # The mean's filled disc at (0.75, 0.5): plot area x 80..660, y 50..570, 12 px padding.
        centre = (80 + 12 + round(0.75 * (660 - 80 - 24)), 570 - 12 - round(0.5 * (570 - 50 - 24)))
        assert image.getpixel(centre) == (0, 114, 178)


def test_estimate_cli_on_tiny_models(models):
    args = ["eval", "toy", "--preset", "minimal", "--estimate", "--probe", str(models / "probe")]
    args += ["--set", f"model={models / 'sdxl'}", "--set", f"embedder.model={models / 'dinov2'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "per image-step" in result.output and "estimated total" in result.output
    bad = CliRunner().invoke(app, ["eval", "toy", "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown --preset 'huge'" in bad.output


def test_quick_benchmark_on_the_shipped_toyworld(tmp_path):
    """`eval toy --quick` as a user runs it: the shipped ToyWorld weights, every method and
    ablation at the quick size (about 2 minutes on a 2-core CPU)."""
    out = tmp_path / "quick"
    result = CliRunner().invoke(app, ["eval", "toy", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["preset"] == "quick" and data["reduced"]
    assert list(data["methods"]) == list(METHODS)
    assert (out / "results.md").is_file() and (out / "scatter.png").is_file()
    for method in data["methods"].values():
        assert 0.0 <= method["mean"]["identity_consistency"] <= 1.0
        assert 0.0 <= method["mean"]["prompt_adherence"] <= 1.0


def test_generator_from_config_wraps_a_loaded_pipeline():
    from consistent_char.eval.run import generator_from_config

    pipe = tiny_sdxl_pipeline(seed=0)
    config = ExtractorConfig.from_overrides(
        {"generator.num_inference_steps": 3, "generator.guidance_scale": 2.0}
    )
    generator = generator_from_config(config, guidance_scale=6.0, pipeline=pipe)
    assert generator.pipeline is pipe  # shared, not loaded again
    assert generator.guidance_scale == 6.0
    assert generator.num_inference_steps == 3
    assert generator_from_config(config, pipeline=pipe).guidance_scale == 2.0


# ------------------------------------------------------------------ the loop over seeds


def test_eval_seeds_runs_scores_and_summarises_every_prompt_and_seed(models, tmp_path):
    out = tmp_path / "study"
    tiny = {
        "model": str(models / "sdxl"),
        "embedder.model": str(models / "dinov2"),
        "device": "cpu",
        "num_images": 6,
        "d_size_c": 3,
        "d_min_c": 2,
        "max_iterations": 2,
        "generator.num_inference_steps": 2,
        "refiner.steps": 2,
        "refiner.batch_size": 2,
    }
    args = ["eval", "seeds", "a red creature", "a creature", "--seeds", "3,4", "--out", str(out)]
    args += ["--seeds-per-scene", "1", "--probe", str(models / "probe")]
    for key, value in tiny.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("seed 3:") == 2 and result.output.count("seed 4:") == 2
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["seeds"] == [3, 4]
    for prompt in ("a red creature", "a creature"):
        entry = data["prompts"][prompt]
        assert set(entry["runs"]) == {"3", "4"}
        summary = entry["summary"]
        consistencies = [r["identity_consistency"] for r in entry["runs"].values()]
        assert summary["consistency_min"] == min(consistencies)
        assert summary["consistency_mean"] == pytest.approx(sum(consistencies) / 2)
        assert 0 <= summary["drift_kept_seeds"] <= 2 and summary["seeds"] == 2
        assert 1 <= summary["distinct_identities"] <= 2
        for seed in (3, 4):
            run = out / "runs" / prompt.replace(" ", "-") / f"seed-{seed}"
            assert (run / "evaluation.json").is_file()
            assert ExtractorConfig.from_file(run / "config.yaml").seed == seed
    assert "| a red creature | 2 |" in (out / "results.md").read_text()
    # A second call reads every finished run back instead of running it again.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads((out / "results.json").read_text())["prompts"]
    # Other settings into the same folder: refused.
    other = CliRunner().invoke(app, [*args, "--set", "refiner.steps=3"])
    assert other.exit_code == 2 and "other settings" in other.output


@pytest.mark.parametrize("seeds", ["", "a-b", "3,x", "-1", "5-2"])
def test_eval_seeds_refuses_bad_seed_lists(seeds, tmp_path):
    result = CliRunner().invoke(
        app, ["eval", "seeds", "a creature", "--seeds", seeds, "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2 and "--seeds" in result.output, result.output
