"""A contact sheet of a ToyWorld run's iterations, each image captioned with what the probe reads.

    python docs/iteration_sheet.py runs/demo docs/images/iterations.png [--per-iteration 8]

One row per iteration (the first images of ``iter_NNN/images/``), captioned
``iteration i: <colour> <shape>, <eyes> eyes, <hat>``, so that a reader sees both how the images
change from iteration to iteration and how the probe that scores them reads each one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from consistent_char.eval.run import load_probe
from consistent_char.story import contact_sheet


def caption(iteration: int, record: dict[str, str]) -> str:
    hat = "no hat" if record["hat"] == "none" else f"{record['hat_color']} {record['hat']}"
    return (
        f"it {iteration}: {record['color']} {record['shape']}, {record['eyes']} eyes, {hat}, "
        f"{record['scene']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished ToyWorld run directory")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--per-iteration", type=int, default=8)
    args = parser.parse_args()
    folders = sorted(args.run.glob("iter_*/images"))
    if not folders:
        raise SystemExit(f"{args.run} has no iter_*/images folders")
    probe = load_probe(None)
    images: list[Image.Image] = []
    captions: list[str] = []
    for i, folder in enumerate(folders):
        row = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
        row = row[: args.per_iteration]
        images += row
        captions += [caption(i, r) for r in probe.predict(row)]
    sheet = contact_sheet(images, captions, columns=args.per_iteration, cell_size=128)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"{args.out}: {len(folders)} iterations × {args.per_iteration} images")


if __name__ == "__main__":
    main()
