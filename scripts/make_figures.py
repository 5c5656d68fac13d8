"""Makes the documentation's figures from a finished run: the report screenshot and a story sheet.

    python scripts/make_figures.py runs/demo                 # after `make demo` (ToyWorld)
    python scripts/make_figures.py runs/demo --skip-story    # the report screenshot only

Writes ``docs/images/report.png`` (the top of the run's ``report.html``, rendered by headless
Chromium) and ``docs/images/story_sheet.png`` (the contact sheet of ``docs/story.txt`` drawn with
the run's identity on its base model). Needs Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def screenshot(page: Path, out: Path, *, width: int = 1200, height: int = 1500) -> None:
    """Renders `page` in headless Chromium and writes a PNG of its top `height` pixels."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="A finished run directory.")
    parser.add_argument("--out", type=Path, default=DOCS / "images")
    parser.add_argument("--story", type=Path, default=DOCS / "story.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-story", action="store_true")
    args = parser.parse_args()

    from consistent_char.report import build_report

    args.out.mkdir(parents=True, exist_ok=True)
    report = build_report(args.run_dir)
    screenshot(report, args.out / "report.png")
    print(f"wrote {args.out / 'report.png'}")
    if args.skip_story:
        return

    from consistent_char.identity import Identity
    from consistent_char.story import CONTACT_SHEET, illustrate, read_prompts
    from consistent_char.usage import identity_generator

    identity = Identity.load(args.run_dir / "identity")
    generator = identity_generator(identity, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        illustrate(identity, read_prompts(args.story), tmp, generator=generator, seed=args.seed)
        shutil.copyfile(Path(tmp) / CONTACT_SHEET, args.out / "story_sheet.png")
    print(f"wrote {args.out / 'story_sheet.png'}")


if __name__ == "__main__":
    main()
