"""Images per second of one iteration's generation on 1 device against N (`generator.devices`).

The same `SDXLGenerator` settings draw the same images on the first k devices for k = 1 and
k = N (and any counts given with ``--counts``), each after a warm-up call; the script prints one
JSON object with the rate, the speed-up over one device and whether the images are byte for
byte those of one device.

On a GPU node (full-size SDXL built from its configs with random weights: the real model's cost,
no download)::

    python benchmarks/sharding.py --model full --devices auto --images 64

On a CPU (two workers share the cores, so it shows only that the path runs)::

    python benchmarks/sharding.py --devices cpu,cpu --images 8 --steps 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from consistent_char.generators import SDXLGenerator
from consistent_char.generators.sharding import resolve_devices


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="toy",
        help="toy (ToyWorld), full (SDXL, random weights), tiny (tiny SDXL, random weights), or a "
        "diffusers folder",
    )
    parser.add_argument("--devices", default=None, help="auto, or a list: cuda:0,cuda:1")
    parser.add_argument("--counts", default=None, help="device counts to time, e.g. 1,2,4")
    parser.add_argument("--images", type=int, default=None, help="images per timed call")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps")
    parser.add_argument("--batch-size", type=int, default=None, help="images per pipeline call")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    return parser.parse_args(argv)


def random_sdxl_pipeline(device: torch.device, *, tiny: bool) -> Any:
    """SDXL (full size, or the tiny test size) from the iteration benchmark's configs, with
    random weights: the real model's cost without a download."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from iteration_setup import random_sdxl

    torch.manual_seed(0)
    return random_sdxl(tiny, torch.bfloat16 if device.type == "cuda" else torch.float32, device)


def load_pipeline(model: str, device: torch.device) -> Any:
    if model in ("full", "tiny"):
        return random_sdxl_pipeline(device, tiny=model == "tiny")
    from consistent_char.generators.sdxl import load_sdxl_pipeline
    from consistent_char.stages import resolve_model

    return load_sdxl_pipeline(resolve_model(model), device=device)


def digest(images: list[Any]) -> str:
    h = hashlib.sha256()
    for image in images:
        h.update(image.tobytes())
    return h.hexdigest()


def synchronize(devices: list[str]) -> None:
    for device in devices:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)


def pick_devices(spec: str | None) -> list[str]:
    """``--devices``: auto (every visible GPU), a list, or by default the GPUs or two CPU
    workers."""
    if spec in (None, "auto"):
        if not torch.cuda.is_available():
            return ["cpu", "cpu"] if spec is None else ["cpu"]
        return [str(d) for d in resolve_devices("auto", torch.device("cuda", 0))]
    listed = [d.strip() for d in spec.split(",")]
    return [str(d) for d in resolve_devices(listed, torch.device(listed[0]))]


def time_devices(
    pipe: Any, devices: list[str], images: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """Draws `images` images on `devices` after a warm-up call; the rate and the images' hash."""
    generator = SDXLGenerator.from_pipeline(pipe, devices=devices, **settings)
    prompts = [f"a photo of a creature, view {j}" for j in range(images)]
    seeds = list(range(images))
    warm = min(images, len(devices) * settings["batch_size"])  # one batch on each device
    generator.generate(prompts[:warm], seeds[:warm])
    synchronize(devices)
    start = time.perf_counter()
    drawn = generator.generate(prompts, seeds)
    synchronize(devices)
    seconds = time.perf_counter() - start
    return {
        "devices": devices,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 4),
        "sha256": digest(drawn),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    devices = pick_devices(args.devices)
    counts = sorted({1, len(devices), *(int(c) for c in (args.counts or "").split(",") if c)})
    full = args.model == "full"
    images = args.images or (8 * len(devices) if full else 4 * len(devices))
    settings = {
        "num_inference_steps": args.steps or (35 if full else 4),
        "guidance_scale": args.guidance_scale,
        "batch_size": args.batch_size or (8 if full else 2),
    }
    pipe = load_pipeline(args.model, torch.device(devices[0]))
    runs = [time_devices(pipe, devices[:k], images, settings) for k in counts if k <= len(devices)]
    one = runs[0]
    for run in runs:
        run["speedup"] = round(run["images_per_s"] / one["images_per_s"], 3)
        run["identical_to_one_device"] = run["sha256"] == one["sha256"]
    names = sorted({torch.cuda.get_device_name(d) for d in devices if d.startswith("cuda")})
    result = {
        "model": args.model,
        "device_names": names or ["cpu"],
        "settings": settings,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
