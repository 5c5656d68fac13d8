"""The command line: ``python -m recipes.toyworld.train --out DIR``, from the repository root.

Renders the sets, runs the stages (`recipes.toyworld.stages`), each checkpointed under
``DIR/checkpoints/`` so a cut run resumes, then writes ``DIR/pipeline`` (diffusers),
``DIR/dinov2`` (transformers + preprocessor config) and ``DIR/probe``, reloads them from disk
and evaluates them into ``DIR/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from recipes.toyworld.checkpoint import atomic_write_text, seed_from_export, stage_done
from recipes.toyworld.evaluate import evaluate
from recipes.toyworld.export import export
from recipes.toyworld.log import fmt, log, seconds_since_start
from recipes.toyworld.plan import STAGES, Plan, make_plan
from recipes.toyworld.stages import TRAIN_STAGE
from recipes.toyworld.trainer import Trainer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's options, checked (positive scale, shares only with a budget)."""
    parser = argparse.ArgumentParser(
        prog="python -m recipes.toyworld.train",
        description="Train ToyWorld's pipeline, DINOv2 and probe from a seed.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count")
    parser.add_argument(
        "--stage",
        choices=["all", *STAGES],
        default="all",
        help="run one stage (earlier ones must be done); export and evaluation "
        "run once all are done",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole run; each stage gets a fixed share",
    )
    parser.add_argument(
        "--time-shares",
        type=_parse_shares,
        default=None,
        metavar="STAGE=FRACTION,...",
        help="each named stage's share of --time-budget, e.g. vae=0.2,unet=0.5 "
        "(default: the plan's; vae 0.14, unet 0.5, dino 0.09, probe 0.06)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="exported weights folder to start from; the --stage named stage trains on from "
        "them, the others are taken as finished",
    )
    parser.add_argument("--workers", type=int, default=None, help="render processes")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is faster on a CPU shared with other jobs",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    if args.time_shares and args.time_budget is None:
        parser.error("--time-shares needs --time-budget")
    return args


def _parse_shares(text: str) -> dict[str, float]:
    """``"vae=0.2,unet=0.5"`` -> ``{"vae": 0.2, "unet": 0.5}``; each stage named once, in (0, 1]."""
    shares: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in STAGES or name in shares:
            raise argparse.ArgumentTypeError(
                f"expected STAGE=FRACTION with STAGE one of {', '.join(STAGES)}, each once; "
                f"got {item!r}"
            )
        try:
            share = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None
        if not 0 < share <= 1:
            raise argparse.ArgumentTypeError(f"{name}: the share must be in (0, 1], got {share}")
        shares[name] = share
    if sum(shares.values()) > 1:
        raise argparse.ArgumentTypeError(f"the shares add up to more than 1: {text}")
    return shares


def main(argv: Sequence[str] | None = None, *, plan: Plan | None = None) -> dict[str, Any] | None:
    """Runs the command line; `plan` replaces the device's default plan (tests use a tiny one).

    Returns:
        The metrics written to ``metrics.json``, or ``None`` while stages remain.
    """
    args = parse_args(argv)
    device = _device(args.device, args.threads)
    plan = plan or make_plan(device.type, args.scale)
    for stage_name, share in (args.time_shares or {}).items():
        setattr(plan, stage_name, replace(getattr(plan, stage_name), time_share=share))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log(
        "setup",
        f"device {device}, seed {args.seed}, scale {args.scale}, out {out}, "
        f"{2 * plan.n_pairs} training images, steps "
        + ", ".join(f"{s} {getattr(plan, s).steps}×{getattr(plan, s).batch}" for s in STAGES),
    )
    trainer = Trainer(
        out,
        seed=args.seed,
        device=device,
        plan=plan,
        time_budget=args.time_budget,
        workers=args.workers,
    )
    if not _train(trainer, args.stage, args.init_from):
        return None
    sizes = export(trainer)
    metrics = evaluate(trainer, sizes)
    trainer.seconds["total"] = seconds_since_start()
    metrics.update(_run_record(args, trainer, sizes))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log("done", f"metrics in {out / 'metrics.json'}; seconds " + fmt(trainer.seconds))
    log("done", "targets " + fmt(metrics["targets"]))
    return metrics


def _device(name: str | None, threads: int | None) -> torch.device:
    """The torch device asked for (CUDA when there is one), with its speed settings."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def _train(trainer: Trainer, stage: str, init_from: Path | None) -> bool:
    """Runs `stage` (or every stage) and loads the finished ones; whether all are finished."""
    wanted = STAGES if stage == "all" else (stage,)
    if init_from is not None and not (trainer.ckpt_dir / "vae.json").exists():
        seed_from_export(init_from, trainer.ckpt_dir, wanted)
    # Rendered before any CUDA work, so the render workers can be forked.
    trainer.data()
    for name in STAGES:
        # A finished stage is loaded back (later stages and the export need it).
        if name in wanted or stage_done(trainer.ckpt_dir, name):
            TRAIN_STAGE[name](trainer)
    missing = [s for s in STAGES if not stage_done(trainer.ckpt_dir, s)]
    if missing:
        log("done", f"stages still to train: {missing}; run --stage all to finish")
    return not missing


def _run_record(
    args: argparse.Namespace, trainer: Trainer, sizes: dict[str, float]
) -> dict[str, Any]:
    """What ``metrics.json`` records of the run itself: its settings, times and versions."""
    device = trainer.device
    return {
        "seed": args.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "scale": args.scale,
        "time_budget": args.time_budget,
        "seconds": trainer.seconds,
        "steps": dict(trainer.results),
        "sizes_mb": sizes,
        "plan": _jsonable(asdict(trainer.plan)),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }


def _jsonable(value: Any) -> Any:
    """`value` with its tuples as lists, so the metrics returned equal those read back."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    main()
