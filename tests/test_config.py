"""Config validation: each bad value is an error naming the field, the value and what is allowed."""

from __future__ import annotations

import json

import pytest

from consistent_char.config import ConfigError, ExtractorConfig, parse_assignment


def test_defaults_follow_the_design():
    cfg = ExtractorConfig()
    assert (cfg.num_images, cfg.d_size_c, cfg.d_min_c, cfg.max_iterations) == (128, 20, 10, 10)
    assert cfg.num_clusters == 6
    assert cfg.refiner.lora_rank == 4 and cfg.refiner.steps == 500
    assert cfg.refiner.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.generator.num_inference_steps == 35 and cfg.generator.guidance_scale == 7.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_images": 5}, r"K = num_images // d_size_c = 5 // 20 = 0"),
        ({"num_images": 40, "d_size_c": 4, "d_min_c": 41}, r"d_min_c = 41 is larger than"),
        ({"d_size_c": 0}, r"d_size_c = 0: Input should be greater than or equal to 1"),
        ({"convergence.d_conv": -1.0}, r"convergence.d_conv = -1.0: .*greater than 0"),
        ({"convergence.d_conv_relative": 1.5}, r"d_conv_relative = 1.5: .*less than or equal"),
        ({"refiner.lora_rank": 0}, r"refiner.lora_rank = 0"),
        ({"refiner.lora_rnk": 3}, r"refiner.lora_rnk: unknown key \(did you mean 'lora_rank'\?\)"),
        (
            {"colour": 1},
            r"colour: unknown key; known keys: accumulate_chosen, centre_variations, clusterer",
        ),
        ({"embedder.kind": "resnet"}, r"embedder.kind = \"resnet\": Input should be 'dinov2'"),
        ({"identity_prompt_template": "{prompt}"}, r"must contain \{token\}"),
        ({"refiner.token": "two words"}, r"one word"),
        (
            {"refiner.cuda_graphs": True, "refiner.compile_blocks": True},
            r"at most one of cuda_graphs and compile_blocks",
        ),
        ({"generator.height": 100}, r"generator.height = 100: .*multiple of 8"),
        ({"generator.guidance_rescale": 1.5}, r"guidance_rescale = 1.5: .*less than or equal"),
        ({"seed": -1}, r"seed = -1"),
        ({"convergence.max_saturation_rise": 0.2}, r"max_saturation_rise needs return_best"),
        ({"refiner.caption_dropout": 1.0}, r"caption_dropout = 1.0: .*less than 1"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ExtractorConfig.from_overrides(overrides)


def test_absolute_threshold_replaces_the_relative_default():
    cfg = ExtractorConfig.from_overrides({"convergence.d_conv": 0.5})
    assert cfg.convergence.d_conv == 0.5 and cfg.convergence.d_conv_relative is None
    with pytest.raises(ConfigError, match="exactly one"):
        ExtractorConfig.from_overrides(
            {"convergence.d_conv": 0.5, "convergence.d_conv_relative": 0.5}
        )


def test_yaml_and_json_files(tmp_path):
    cfg = ExtractorConfig.from_overrides({"num_images": 64, "refiner.steps": 7})
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert ExtractorConfig.from_file(tmp_path / "c.yaml") == cfg
    assert ExtractorConfig.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "bad.yaml").write_text("num_images: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ExtractorConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        ExtractorConfig.from_file(tmp_path / "missing.yaml")


def test_toy_preset_under_user_overrides():
    cfg = ExtractorConfig.from_overrides({"model": "toy", "refiner.steps": 3})
    assert cfg.refiner.steps == 3
    assert cfg.refiner.initializer_token == "creature"
    assert cfg.embedder.model == "toy"
    assert cfg.generator.scheduler == "EulerAncestralDiscreteScheduler"
    plain = ExtractorConfig.from_overrides({"model": "toy", "generator.scheduler": None})
    assert plain.generator.scheduler is None


def test_differences_names_dotted_fields():
    a = ExtractorConfig()
    b = ExtractorConfig.from_overrides({"refiner.steps": 3, "seed": 9})
    assert a.differences(b) == ["refiner.steps", "seed"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num_images=64", ("num_images", 64)),
        ("refiner.lora_lr=1e-4", ("refiner.lora_lr", 1e-4)),
        ("generator.negative_prompt=blurry, dark", ("generator.negative_prompt", "blurry, dark")),
        ("convergence.d_conv_relative=null", ("convergence.d_conv_relative", None)),
    ],
)
def test_parse_assignment(text, expected):
    assert parse_assignment(text) == expected


def test_parse_assignment_rejects_missing_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("num_images")


def test_build_stages_passes_every_generator_and_refiner_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from consistent_char.config import ExtractorConfig
    from consistent_char.stages import build_stages

    config = ExtractorConfig.build(
        {
            "model": "toy",
            "generator": {"fuse_identity": True, "negative_prompt": "blurry"},
            "refiner": {
                "gradient_checkpointing": True,
                "compile_blocks": True,
                "batch_size": 3,
                "max_timestep": 700,
                "row_norm_cap": 1.5,
                "lr_decay": 0.8,
            },
        }
    )
    generator, _, _, refiner, _ = build_stages(config)
    for name, value in config.generator.model_dump().items():
        assert getattr(generator, name) == value, name
    assert refiner.gradient_checkpointing is True and refiner.batch_size == 3
    assert refiner.compile_blocks is True and refiner.max_timestep == 700
    assert refiner.row_norm_cap == 1.5 and refiner.lr_decay == 0.8


def test_build_stages_passes_the_clusterer_settings(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from consistent_char.config import ExtractorConfig
    from consistent_char.stages import build_stages

    for distance, spherical in (("cosine", True), ("euclidean", False)):
        config = ExtractorConfig.build(
            {"model": "toy", "clusterer": {"distance": distance, "niter": 7, "nredo": 2}}
        )
        _, _, clusterer, _, _ = build_stages(config)
        assert (clusterer.spherical, clusterer.niter, clusterer.nredo) == (spherical, 7, 2)
