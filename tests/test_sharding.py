"""One iteration's images sharded over several devices: two CPU workers stand in for two GPUs.

The sharded images must be byte for byte those of one device, with and without an identity,
each worker drawing its own contiguous run of whole batches on its own copy of the pipeline.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from typer.testing import CliRunner

from consistent_char import toy
from consistent_char.cli import app
from consistent_char.config import ConfigError, ExtractorConfig
from consistent_char.errors import InvalidValueError
from consistent_char.extractor import IterativeIdentityExtractor
from consistent_char.generators import SDXLGenerator
from consistent_char.generators.sharding import plan_shards, resolve_devices
from consistent_char.testing import tiny_identity

SCENES = ["in the snow", "in a forest", "on a beach", "at night", "in a city", "in the snow"]
PROMPTS = [f"a <fox> creature {scene}" for scene in SCENES]
SEEDS = [11, 12, 2**40 + 3, 14, 15, 2**63 - 1]
# ToyWorld's sampler, few steps: the real model, a second per call.
SETTINGS = {
    "num_inference_steps": 4,
    "guidance_scale": 3.0,
    "scheduler": "EulerAncestralDiscreteScheduler",
    "batch_size": 2,
}


@pytest.fixture(scope="module")
def one():
    return SDXLGenerator.from_pretrained(toy.model_dir(), device="cpu", **SETTINGS)


@pytest.fixture(scope="module")
def two(one):
    return SDXLGenerator.from_pipeline(one.pipeline, devices=["cpu", "cpu"], **SETTINGS)


@pytest.fixture(scope="module")
def fox(one):
    return tiny_identity(one.pipeline, "<fox>", seed=3, scale=0.05)


def _bytes(images):
    return [im.tobytes() for im in images]


def _record_calls(monkeypatch):
    """Every pipeline call: (pipeline, thread name, its prompts)."""
    calls = []
    original = SDXLGenerator._call_pipeline

    def spy(self, prompts, seeds, height, width):
        calls.append((self.pipeline, threading.current_thread().name, list(prompts)))
        return original(self, prompts, seeds, height, width)

    monkeypatch.setattr(SDXLGenerator, "_call_pipeline", spy)
    return calls


@pytest.mark.parametrize("with_identity", [False, True], ids=["base", "identity"])
def test_two_workers_draw_the_same_images_as_one_device(one, two, fox, with_identity):
    identity = fox if with_identity else None
    alone = one.generate(PROMPTS, SEEDS, identity)
    sharded = two.generate(PROMPTS, SEEDS, identity)
    assert _bytes(sharded) == _bytes(alone)
    # The identity really changed the images (it was applied on every copy).
    if with_identity:
        plain = one.generate(PROMPTS, SEEDS)
        assert all(a != b for a, b in zip(_bytes(plain), _bytes(sharded), strict=True))


def test_each_worker_draws_a_contiguous_run_of_whole_batches_on_its_own_copy(one, two, monkeypatch):
    calls = _record_calls(monkeypatch)
    two.generate(PROMPTS, SEEDS)
    by_pipeline: dict[int, list[str]] = {}
    threads = set()
    for pipeline, thread, prompts in calls:
        assert len(prompts) == 2  # the batches one device draws (batch_size 2)
        by_pipeline.setdefault(id(pipeline), []).extend(prompts)
        threads.add(thread)
    # Three batches over two workers: the first draws one, its copy the other two.
    assert by_pipeline == {id(one.pipeline): PROMPTS[:2], id(_copy(two)): PROMPTS[2:]}
    assert len(threads) == 2 and threading.current_thread().name not in threads
    # The copy holds its own weights: not views of the first pipeline's.
    first = one.pipeline.unet.conv_in.weight
    copied = _copy(two).unet.conv_in.weight
    assert copied.data_ptr() != first.data_ptr() and torch.equal(copied, first)


def _copy(generator):
    workers = generator._workers()
    assert len(workers) == 2 and workers[0] is generator
    return workers[1].pipeline


def test_sharded_generation_leaves_every_pipeline_and_the_global_rng_as_they_were(two, fox):
    rng = torch.get_rng_state()
    two.generate(PROMPTS, SEEDS, fox)
    assert torch.equal(torch.get_rng_state(), rng)
    for pipeline in (two.pipeline, _copy(two)):
        assert "<fox>" not in pipeline.tokenizer.get_vocab()
        assert not getattr(pipeline.unet, "peft_config", None)


def test_progress_adds_up_the_shards_on_the_calling_thread(two):
    reports = []
    caller = threading.current_thread()
    two.generate(
        PROMPTS,
        SEEDS,
        callback=lambda done, total: reports.append((done, total, threading.current_thread())),
    )
    assert [done for done, _, _ in reports] == sorted(done for done, _, _ in reports)
    assert reports[-1][:2] == (6, 6)
    assert all(total == 6 and thread is caller for _, total, thread in reports)


def test_a_setting_assigned_later_reaches_every_device(one, two):
    two.num_inference_steps = 2
    try:
        one.num_inference_steps = 2
        assert _bytes(two.generate(PROMPTS, SEEDS)) == _bytes(one.generate(PROMPTS, SEEDS))
    finally:
        one.num_inference_steps = two.num_inference_steps = SETTINGS["num_inference_steps"]


@pytest.mark.parametrize(
    ("total", "batch", "workers", "expected"),
    [
        (6, 2, 2, [(0, 2), (2, 6)]),
        (8, 2, 2, [(0, 4), (4, 8)]),
        (64, 8, 3, [(0, 16), (16, 40), (40, 64)]),
        (7, 3, 2, [(0, 3), (3, 7)]),
        (3, 4, 2, [(0, 3)]),  # one batch keeps one worker busy
        (5, 1, 8, [(k, k + 1) for k in range(5)]),
    ],
)
def test_shards_are_contiguous_runs_of_whole_batches(total, batch, workers, expected):
    shards = plan_shards(total, batch, workers)
    assert shards == expected
    assert shards[0][0] == 0 and shards[-1][1] == total
    for (_, stop), (start, _) in zip(shards, shards[1:], strict=False):
        assert stop == start and start % batch == 0


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ("cuda:1", "give a list such as [cuda:0, cuda:1], or auto"),
        (["tpu:0"], "unknown device 'tpu:0': use cpu, cuda or cuda:N"),
        (["cuda:0", "cuda:0"], "cuda:0 is listed twice"),
        (["cuda", "cuda:0"], "cuda:0 is listed twice"),
        (["cuda:0", "cpu"], "mixes CPU and CUDA devices"),
        ([], "the list is empty"),
    ],
)
def test_bad_device_lists_are_config_errors_naming_the_field(devices, message):
    with pytest.raises(ConfigError, match="generator.devices") as err:
        ExtractorConfig.from_overrides({"generator.devices": devices})
    assert message in str(err.value)


def test_good_device_lists_are_kept():
    for devices in ("auto", ["cpu", "cpu"], ["cuda:1", "cuda:0"], None):
        config = ExtractorConfig.from_overrides({"generator.devices": devices})
        assert config.generator.devices == devices


def _cuda_devices(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_devices_resolve_with_the_pipelines_device_first(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_devices(None, cpu) == [cpu]
    assert resolve_devices("auto", cpu) == [cpu]  # auto means GPUs, and the run is on the CPU
    assert resolve_devices(["cpu", "cpu"], cpu) == [cpu, cpu]
    _cuda_devices(monkeypatch, 3)
    cuda = [torch.device("cuda", i) for i in range(3)]
    assert resolve_devices("auto", cuda[1]) == [cuda[1], cuda[0], cuda[2]]
    assert resolve_devices(["cuda", "cuda:2"], torch.device("cuda")) == [cuda[0], cuda[2]]


def test_more_cuda_devices_than_visible_is_a_clear_error(monkeypatch):
    _cuda_devices(monkeypatch, 2)
    with pytest.raises(InvalidValueError, match="lists cuda:2, but torch sees 2 CUDA device"):
        resolve_devices(["cuda:0", "cuda:2"], torch.device("cuda", 0))
    with pytest.raises(InvalidValueError, match="must start with the pipeline's device cuda:0"):
        resolve_devices(["cuda:1", "cuda:0"], torch.device("cuda", 0))


def test_cli_names_missing_cuda_devices_in_one_line_before_loading(
    tmp_path, monkeypatch, no_pipeline_loading
):
    _cuda_devices(monkeypatch, 0)

    result = CliRunner().invoke(
        app,
        [
            "extract", "a creature", "--model", "toy", "--set", "device=cpu", "--quiet",
            "--out", str(tmp_path / "run"), "--set", "generator.devices=[cpu, cuda:1]",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: invalid configuration: generator.devices")
    assert "mixes CPU and CUDA" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        app,
        [
            "extract", "a creature", "--model", "toy", "--set", "device=cpu", "--quiet",
            "--out", str(tmp_path / "run"), "--set", "generator.devices=[cuda:0, cuda:1]",
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "torch sees 0 CUDA device(s)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def _extract(devices, run_dir):
    config = ExtractorConfig.from_overrides(
        {
            "device": "cpu",
            "num_images": 8,
            "d_size_c": 4,
            "d_min_c": 2,
            "core_size": None,
            "max_iterations": 2,
            "generator.num_inference_steps": 3,
            "generator.batch_size": 2,
            "generator.devices": devices,
            "refiner.steps": 2,
            "convergence.d_conv_relative": 0.01,
        },
        base={"model": "toy"},
    )
    IterativeIdentityExtractor.from_config(config).extract("a creature", run_dir=run_dir)
    return {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in sorted(run_dir.glob("iter_*/images/*.png"))
    }


def test_an_extraction_with_two_workers_writes_the_same_images_as_with_one(tmp_path):
    alone = _extract(None, tmp_path / "one")
    sharded = _extract(["cpu", "cpu"], tmp_path / "two")
    # Iteration 1 draws with the identity iteration 0 learned: on both copies of the pipeline.
    assert len(alone) == 16 and {name.split("/")[0] for name in alone} == {"iter_000", "iter_001"}
    assert sharded.keys() == alone.keys()
    assert all(sharded[name] == alone[name] for name in alone)


def test_devices_of_the_machine_a_run_used_stay_with_that_machine(one, monkeypatch):
    from consistent_char.eval.run import generator_from_config
    from consistent_char.usage import identity_generator

    config = ExtractorConfig.from_overrides(
        {"generator.devices": ["cuda:0", "cuda:1"]}, base={"model": "toy"}
    )
    # Drawing a run's images again on another device, or on a loaded pipeline: that one alone.
    assert generator_from_config(config, pipeline=one.pipeline).devices is None
    # An identity learned on two GPUs draws on this CPU.
    owl = tiny_identity(one.pipeline, "<owl>", seed=4)
    owl.metadata.update(base_model="toy", config=config.to_dict())
    monkeypatch.setattr(SDXLGenerator, "from_pretrained", lambda *a, **settings: settings)
    assert identity_generator(owl, device="cpu")["devices"] is None


def test_the_sharding_benchmark_runs_and_compares_with_one_device(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sharding.py"
    spec = importlib.util.spec_from_file_location("sharding_benchmark", path)
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = benchmark.main(["--model", "tiny", "--devices", "cpu,cpu", "--images", "4"])
    assert [run["devices"] for run in result["runs"]] == [["cpu"], ["cpu", "cpu"]]
    assert all(run["identical_to_one_device"] and run["images_per_s"] > 0 for run in result["runs"])
    assert '"speedup"' in capsys.readouterr().out


def test_fewer_batches_than_devices_is_a_warning_and_draws_on_one(two, monkeypatch, caplog):
    calls = _record_calls(monkeypatch)
    monkeypatch.setattr(two.settings, "batch_size", 6)
    with caplog.at_level(logging.WARNING):
        two.generate(PROMPTS, SEEDS)
    assert "6 image(s) in batches of 6 keep 1 of 2 devices busy" in caplog.text
    assert [(pipeline, prompts) for pipeline, _, prompts in calls] == [(two.pipeline, PROMPTS)]


def test_the_automatic_batch_is_the_one_every_device_holds(two, monkeypatch):
    calls = _record_calls(monkeypatch)
    monkeypatch.setattr(two.settings, "batch_size", None)
    copy = two._workers()[1]
    monkeypatch.setattr(copy, "_batch_cap", lambda height, width: 2)  # a fuller device
    two.generate(PROMPTS, SEEDS)
    assert sorted(len(prompts) for _, _, prompts in calls) == [2, 2, 2]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_draw_the_same_images_as_one():
    from consistent_char.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0).to("cuda:0")
    settings = {"num_inference_steps": 2, "batch_size": 2}
    one = SDXLGenerator.from_pipeline(pipe, **settings)
    two = SDXLGenerator.from_pipeline(pipe, devices=["cuda:0", "cuda:1"], **settings)
    assert _copy(two).unet.device == torch.device("cuda", 1)
    prompts = [p.replace("<fox>", "<owl>") for p in PROMPTS]
    owl = tiny_identity(pipe, "<owl>", seed=3)
    for identity in (None, owl):
        alone = one.generate(prompts, SEEDS, identity)
        assert _bytes(two.generate(prompts, SEEDS, identity)) == _bytes(alone)
