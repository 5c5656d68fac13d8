"""Where two pose probes read an identity's posed drawings differently: `eval toy-apps`' 80
pose-control drawings of IDENTITY (LoRA `--lora-scale` until 85% of the steps, in the
ControlNet too, late scale 2), each image that either probe reads as losing the look, with what
each reads instead, and a sheet of those images in that order.

    python research/apps/probe_disagreements.py IDENTITY REFERENCE SEED --lora-scale 1.2 \
        --pose-probe WEIGHTS_COPY/pose_probe --sheet OUT.png
"""

from __future__ import annotations

import argparse

from PIL import Image
from pose_settings import PoseBench  # type: ignore[import-not-found]

from consistent_char.control import ControlledGenerator, load_controlnet
from consistent_char.toy.probe import IdentityProbe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("identity")
    parser.add_argument("reference")
    parser.add_argument("seed", type=int)
    parser.add_argument("--lora-scale", type=float, default=1.5)
    parser.add_argument("--pose-probe", required=True, help="the other pose probe's folder")
    parser.add_argument("--sheet", required=True)
    args = parser.parse_args()
    bench = PoseBench(args.identity, args.reference, args.seed)
    controlled = ControlledGenerator(
        bench.gen.pipeline,
        load_controlnet("toy", device="cpu"),
        identity_until=0.85,
        identity_in_controlnet=True,
        late_control_scale=2.0,
        **{**bench.gen.settings.model_dump(), "lora_scale": args.lora_scale},
    )
    prompts = [j.prompt("a creature", bench.identity) for j in bench.jobs]
    images = controlled.generate(prompts, bench.seeds, bench.identity, control_images=bench.maps)
    other = IdentityProbe.from_pretrained(args.pose_probe)
    shown = []
    for i, (image, a, b) in enumerate(
        zip(images, bench.probe.predict(images), other.predict(images), strict=True)
    ):
        lost_a, lost_b = _lost(a, bench.reference), _lost(b, bench.reference)
        if lost_a or lost_b:
            shown.append(image)
            print(f"image {i} ({prompts[i]}): shipped {lost_a} | other {lost_b}")
    sheet = Image.new("RGB", (128 * max(1, len(shown)), 128))
    for k, image in enumerate(shown):
        sheet.paste(image.resize((128, 128), Image.NEAREST), (128 * k, 0))
    sheet.save(args.sheet)


def _lost(read: dict[str, str], reference: dict[str, str]) -> dict[str, str]:
    """The attributes read otherwise than the reference's, with what was read."""
    return {k: read[k] for k, v in reference.items() if read[k] != v}


if __name__ == "__main__":
    main()
