"""The run report: its content, and that headless Chromium renders it without errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from fakes import ColourGenerator, MeanColourEmbedder, MeanColourRefiner, ScriptedRefiner
from PIL import Image
from typer.testing import CliRunner

from consistent_char.cli import app
from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
from consistent_char.config import ExtractorConfig
from consistent_char.convergence import PairwiseDistanceCriterion
from consistent_char.extractor import IterativeIdentityExtractor
from consistent_char.report import REPORT_FILE, build_report

NUM_IMAGES = 16


def _extractor(**overrides) -> IterativeIdentityExtractor:
    config = ExtractorConfig.from_overrides(
        {
            "num_images": NUM_IMAGES,
            "d_size_c": 4,
            "d_min_c": 2,
            "max_iterations": 4,
            "convergence.d_conv_relative": 0.3,
            **overrides,
        }
    )
    return IterativeIdentityExtractor(
        ColourGenerator(),
        MeanColourEmbedder(),
        FaissKMeansClusterer(),
        MeanColourRefiner(token=config.refiner.token),
        PairwiseDistanceCriterion(d_conv_relative=config.convergence.d_conv_relative),
        config=config,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report") / "run"
    result = _extractor().extract("a colour", run_dir=root)
    assert result.iterations >= 2
    # Samples of the final identity, as `story.illustrate` writes them.
    samples = root / "samples"
    samples.mkdir()
    for j, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        Image.new("RGB", (24, 24), colour).save(samples / f"{j:03d}.png")
    story = {"images": [{"file": "000.png", "prompt": "<cc-char> at the beach"}]}
    (samples / "story.json").write_text(json.dumps(story))
    build_report(root)
    return root


class _Page(HTMLParser):
    """Collects what the tests look for: images, links, sections, plot lines, text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.sections: list[str] = []
        self.polylines = 0
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        elif tag == "section":
            self.sections.append(str(a.get("id")))
        elif tag == "polyline":
            self.polylines += 1
        elif tag in ("script", "link", "iframe"):
            self.scripts += 1

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def test_report_shows_every_iteration_its_clusters_and_the_spread(run_dir):
    state = json.loads((run_dir / "state.json").read_text())
    page = _parse(run_dir / REPORT_FILE)
    text = " ".join(page.text)

    iterations = len(state["history"])
    assert page.sections == [f"iter-{i}" for i in reversed(range(iterations))]
    # Every generated image is shown, as embedded data, linking to its PNG in the run.
    grid = [im for im in page.images if str(im.get("alt", "")).endswith(".png")]
    assert len(grid) == NUM_IMAGES * iterations
    assert len(page.images) == len(grid) + 2  # the two samples
    assert all(str(im["src"]).startswith("data:image/") for im in page.images)
    for href in page.links:
        assert (run_dir / href).is_file(), href
    # Spread and threshold lines, and every refined iteration's chosen cluster and cohesions.
    assert page.polylines == 2
    for record in state["history"]:
        assert f"spread {record['spread']:.4f}" in text
        if record["chosen_cluster"] is not None:
            chosen = record["chosen_cluster"]
            assert f"cluster {chosen} ★ chosen" in text
            assert f"{record['cluster_cohesions'][chosen]:.4f}" in text
    assert "<cc-char> at the beach" in text
    assert page.scripts == 0, "the report must need no scripts or external resources"


def test_report_of_a_cut_run(tmp_path):
    def stop(event):
        if event.kind == "stage_end" and event.iteration == 1 and event.stage == "embed":
            raise KeyboardInterrupt

    run = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _extractor().extract("a colour", run_dir=run, callback=stop)
    text = " ".join(_parse(build_report(run)).text)
    assert "unfinished" in text and "Iteration 1" in text


def test_report_command_rebuilds_the_report(run_dir):
    (run_dir / REPORT_FILE).unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / REPORT_FILE).is_file()
    missing = CliRunner().invoke(app, ["report", str(run_dir / "nope")])
    assert missing.exit_code == 2 and "not a run directory" in missing.output


# ------------------------------------------------------------------------- headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)",
)

# How "no console errors" is checked, robustly across Chromium versions: a probe script is put at
# the top of a copy of the page. It records, in the capture phase, every `error` event (uncaught
# exceptions, and resources that fail to load, which Chromium's stderr log does not show) and, at
# `load`, counts images that did not decode; it writes the result into the DOM, which
# `--dump-dom` prints. On top, the page's console (logged to stderr by `--enable-logging`) must
# be silent: the report has no scripts, so any console line is a problem. The probe is itself
# tested on a broken page, so the test cannot pass blind.
_PROBE = """<script>
var ccErrors = [];
window.addEventListener("error", function (e) {
  ccErrors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || e.type));
}, true);
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (i) {
    return !(i.complete && i.naturalWidth > 0);
  }).length;
  var out = document.createElement("pre");
  out.id = "cc-probe";
  out.textContent = JSON.stringify({images: document.images.length, broken: broken,
                                    errors: ccErrors});
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp: Path, page: Path, *action: str) -> subprocess.CompletedProcess[str]:
    args = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        # Let every image decode and the load event run before the action.
        "--virtual-time-budget=10000",
        "--window-size=1200,2000",
        *action,
        page.resolve().as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _probe(tmp: Path, page: Path) -> tuple[dict, list[str]]:
    probed = page.with_name("probed_" + page.name)
    probed.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    done = _chromium(tmp, probed, "--dump-dom")
    marker = '<pre id="cc-probe">'
    assert marker in done.stdout, f"the page did not load: {done.stderr[-2000:]}"
    result = json.loads(done.stdout.split(marker, 1)[1].split("</pre>", 1)[0])
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return result, console


@needs_chromium
def test_chromium_renders_the_report_without_errors(run_dir, tmp_path):
    result, console = _probe(tmp_path, run_dir / REPORT_FILE)
    assert result["errors"] == [] and console == [], (result, console)
    assert result["images"] >= NUM_IMAGES and result["broken"] == 0, result

    shot = tmp_path / "report.png"
    done = _chromium(tmp_path, run_dir / REPORT_FILE, f"--screenshot={shot}")
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    # Not blank: a white page has variance 0; the report has text, a plot and image grids.
    assert pixels.var() > 100, pixels.var()
    assert (pixels < 200).mean() > 0.05


@needs_chromium
def test_the_chromium_probe_sees_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        '<img src="missing.png"><script>notAFunction()</script></body></html>'
    )
    result, console = _probe(tmp_path, bad)
    assert result["broken"] == 1
    assert any("missing.png" in e for e in result["errors"])
    assert any("notAFunction" in e for e in result["errors"])
    assert any("notAFunction" in line for line in console)


@pytest.mark.parametrize(
    ("strengths", "why"),
    [
        # Each identity draws more tightly than the last: the spread falls to the end.
        ([1.0, 2.0, 4.0, 8.0], "max_iterations reached"),
        # The first identity draws tightly, later ones loosely: the spread rises after it.
        ([20.0, 0.5, 0.5, 0.5], "no lower spread in 1 iterations"),
    ],
)
def test_report_says_why_a_finished_run_stopped(tmp_path, strengths, why):
    extractor = _extractor(**{"convergence.d_conv_relative": 1e-6, "convergence.patience": 1})
    extractor.refiner = ScriptedRefiner(strengths, token=extractor.config.refiner.token)
    result = extractor.extract("a colour", run_dir=tmp_path / "run")
    assert result.stop_reason == why
    text = " ".join(_parse(tmp_path / "run" / REPORT_FILE).text)
    assert f"stopped: {why}" in text
