"""The ToyWorld training recipe (`recipes/toyworld`), on tiny plans."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from consistent_char.toy.data import INVALID_KINDS
from consistent_char.toy.models import ToyModelConfig
from recipes.toyworld.checkpoint import Checkpoint
from recipes.toyworld.loop import run_loop
from recipes.toyworld.plan import Plan, StagePlan, make_plan
from recipes.toyworld.stages import nt_xent
from recipes.toyworld.train import _parse_shares, main


def _tiny_plan() -> Plan:
    def stage(batch: int) -> StagePlan:
        return StagePlan(steps=2, batch=batch, lr=1e-3, warmup=1, checkpoint_every=1, log_every=1)

    return Plan(
        n_pairs=12,
        heldout_pairs=6,
        captions_per_image=2,
        uniform_pairs=12,
        vae=stage(4),
        unet=stage(4),
        dino=stage(4),
        probe=stage(4),
        vae_crop=32,
        eval_images=2,
        diversity_images=2,
        eval_steps=2,
        eval_guidance=(5.0,),
        eval_batch=2,
        probe_eval_images=4,
        peak_images=2,
        # CUDA's code paths (bf16 autocast, channels_last), exercised on the CPU.
        bf16=True,
        channels_last=True,
        model=ToyModelConfig(),
    )


def test_every_stage_trains_exports_and_evaluates(tmp_path, capsys):
    out = tmp_path / "toy"
    argv = ["--out", str(out), "--device", "cpu", "--workers", "1"]
    assert main([*argv, "--stage", "vae"], plan=_tiny_plan()) is None
    metrics = main(argv, plan=_tiny_plan())
    assert metrics is not None
    for stage in ("vae", "unet", "dino", "probe"):
        state = Checkpoint(out / "checkpoints", stage).state()
        assert state is not None and state["done"] and state["step"] == 2
        assert math.isfinite(state["loss"]), stage
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "dinov2" / "preprocessor_config.json").is_file()
    assert (out / "probe" / "model.safetensors").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["probe_accuracy"]) == {"shape", "color", "hat", "hat_color", "eyes", "scene"}
    assert set(saved["probe_validity"]) == {"renders", *INVALID_KINDS}
    # One entry per prompt that names one attribute value, each set against the world's share.
    assert len(saved["peaks"]["prompts"]) == 26
    assert all(0 < p["world_share"] <= 1 for p in saved["peaks"]["prompts"].values())
    assert {"knn_same_identity", "knn_same_scene"} <= set(saved["dinov2"])
    assert {"peaks_ok", "dino_object_centric_ok", "diversity_ok"} <= set(saved["targets"])
    assert math.isfinite(saved["vae"]["recon_mse"]) and saved["vae"]["scaling_factor"] > 0
    assert saved["sizes_mb"]["total"] < 60
    assert {"vae", "unet", "dino", "probe", "eval"} <= set(saved["seconds"])
    assert "unet | step" in capsys.readouterr().out


def test_a_cut_run_resumes_to_the_same_weights(tmp_path):
    stage = StagePlan(steps=6, batch=8, lr=1e-2, warmup=1, checkpoint_every=2, log_every=1)

    def train(directory, fail_at=None):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)

        def loss_fn(step, rng, gen):
            if step == fail_at:
                raise KeyboardInterrupt
            x = torch.from_numpy(rng.normal(size=(8, 4))).float() + torch.randn(8, 4, generator=gen)
            return model(x).pow(2).mean()

        return run_loop(
            "probe",
            stage,
            modules={"m": model},
            loss_fn=loss_fn,
            checkpoint=Checkpoint(directory, "probe"),
            seed=0,
            device=torch.device("cpu"),
            ema_modules=("m",),
        )

    _, straight = train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", fail_at=5)
    assert Checkpoint(tmp_path / "b", "probe").state()["step"] == 4
    _, resumed = train(tmp_path / "b")
    for p, q in zip(straight["m"].parameters(), resumed["m"].parameters(), strict=True):
        assert torch.equal(p, q)


def test_plans_scale_and_fit_the_gpu_run():
    gpu = make_plan("cuda")
    assert gpu.unet.batch >= 256 and gpu.unet.steps >= 3000
    assert sum(getattr(gpu, s).time_share for s in ("vae", "unet", "dino", "probe")) < 0.85
    smoke = make_plan("cpu", 0.01)
    assert smoke.unet.steps == 50 and smoke.n_pairs == 500


def test_nt_xent_prefers_matching_pairs():
    z = torch.randn(8, 16)
    assert nt_xent(torch.cat([z, z]), 0.1) < nt_xent(torch.cat([z, torch.randn(8, 16)]), 0.1)
    assert np.isfinite(float(nt_xent(torch.cat([z, z]), 0.1)))


def test_init_from_continues_one_stage_and_keeps_the_rest(tmp_path):
    first = tmp_path / "first"
    argv = ["--device", "cpu", "--workers", "1"]
    assert main(["--out", str(first), *argv], plan=_tiny_plan()) is not None
    # A scaling factor no run would compute: the continued UNet must see the export's.
    vae_config = first / "pipeline" / "vae" / "config.json"
    config = json.loads(vae_config.read_text())
    vae_config.write_text(json.dumps({**config, "scaling_factor": 0.5}))

    second = tmp_path / "second"
    metrics = main(
        ["--out", str(second), *argv, "--stage", "unet", "--init-from", str(first)],
        plan=_tiny_plan(),
    )
    assert metrics is not None and metrics["vae"]["scaling_factor"] == 0.5
    assert json.loads((second / "pipeline" / "vae" / "config.json").read_text())[
        "scaling_factor"
    ] == pytest.approx(0.5)
    ckpt = second / "checkpoints"
    assert Checkpoint(ckpt, "unet").state()["step"] == 2  # trained on: the tiny plan's 2 steps
    for stage in ("vae", "dino", "probe"):
        assert Checkpoint(ckpt, stage).state()["step"] == 0  # taken as finished
    for folder, name in (("probe", "model.safetensors"), ("dinov2", "model.safetensors")):
        from safetensors.torch import load_file

        before, after = load_file(first / folder / name), load_file(second / folder / name)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k].float(), after[k].float()) for k in before)


@pytest.mark.parametrize(
    "text", ["unet=two", "unet=0", "unet=1.5", "gpu=0.1", "unet=0.5,unet=0.2", "vae=0.6,unet=0.6"]
)
def test_bad_time_shares_are_clear_errors(text):
    with pytest.raises(
        argparse.ArgumentTypeError, match="STAGE=FRACTION|share|not a number|add up"
    ):
        _parse_shares(text)


def test_time_shares_parse_and_need_a_budget():
    assert _parse_shares("vae=0.2, unet=0.5") == {"vae": 0.2, "unet": 0.5}
    with pytest.raises(SystemExit):
        main(["--out", "unused", "--time-shares", "unet=0.5"])
