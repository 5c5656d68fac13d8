"""What each finished ToyWorld run ended on: the last iteration's most common identity.

    python docs/final_identities.py runs/trials/*/ [--iterations]

For every run directory given, the probe reads all images of the run's last iteration (drawn
with the identity learned at the iteration before, which for a converged run is the identity it
returns, from the run's prompt with the token). The script prints the most
common identity, how many of the images show it, their most common scene, and the share of
images the probe reads as having no hat and as having sleepy eyes (the thinnest eyes, and what
faded eyes are read as). Runs whose last iteration is iteration 0 are skipped. With
``--iterations`` it also prints, for every iteration of each run, how many of its images show
sleepy eyes and no hat, and their sharpness away from night (the mean absolute Laplacian, as
`docs/drift_decomposition.py` measures it). The counts at the
end show which identities the runs ended on most often, and a check of the probe: what it reads
on 200 renders drawn with no eyes at all.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from drift_decomposition import _sharpness

from consistent_char.eval.run import load_probe
from consistent_char.rundir import RunDirectory
from consistent_char.toy import world
from consistent_char.toy.evaluate import identity_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished ToyWorld run directories")
    parser.add_argument("--iterations", action="store_true", help="every iteration's counts")
    args = parser.parse_args()
    probe = load_probe(None)
    endings: Counter[tuple[str, ...]] = Counter()
    for path in args.runs:
        run = RunDirectory(path)
        if not run.state_path.exists():
            continue
        history = run.read_state().history
        if len(history) < 2:
            continue
        last = len(history) - 1
        # Each iteration's images are read once; the last iteration's reading is the summary's.
        shown = range(len(history)) if args.iterations else [last]
        steps = []
        for i in shown:
            images = run.load_images(i, len(history[i]["seeds"]))
            records = probe.predict(images)
            if args.iterations:
                day = [im for im, r in zip(images, records, strict=True) if r["scene"] != "night"]
                sleepy, hatless = _faded(records)
                steps.append(f"{i}: {sleepy} / {hatless}, {_sharpness(day):.4f}")
        if args.iterations:
            print(
                f"{path.name}: sleepy eyes / no hat, sharpness away from night: {'; '.join(steps)}"
            )
        top, count = Counter(map(identity_key, records)).most_common(1)[0]
        scene, at = Counter(r["scene"] for r in records).most_common(1)[0]
        sleepy, hatless = _faded(records)
        endings[top[:3]] += 1
        print(
            f"{path.name}: iteration {last}: {' '.join(top)} on {count} of {len(records)}; "
            f"{scene} {at}; no hat {hatless / len(records):.2f}, "
            f"sleepy eyes {sleepy / len(records):.2f}"
        )
    print("\nmost common (shape, colour, hat) at the end:")
    for key, n in endings.most_common():
        print(f"  {n:3d}  {' '.join(key)}")

    # Renders whose eyes are left out: what the probe calls eyes that have faded away.
    rng = np.random.default_rng(0)
    records = [world.sample_record(rng) for _ in range(200)]
    draw_eyes = world._draw_eyes
    world._draw_eyes = lambda *args, **kwargs: None
    try:
        read = probe.predict([world.render(r) for r in records])
    finally:
        world._draw_eyes = draw_eyes
    counts = Counter(r["eyes"] for r in read)
    print(f"\neyes the probe reads on {len(records)} renders drawn without eyes: {dict(counts)}")


def _faded(records: list[dict[str, str]]) -> tuple[int, int]:
    """How many records have sleepy eyes, and how many no hat."""
    return sum(r["eyes"] == "sleepy" for r in records), sum(r["hat"] == "none" for r in records)


if __name__ == "__main__":
    main()
