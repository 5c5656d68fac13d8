"""The documentation: it builds with --strict, and it does not drift from the code."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from consistent_char.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_mkdocs_build_is_strict_clean(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    # `make test` installs the docs extra: without mkdocs this check would pass unseen.
    assert mkdocs is not None, "mkdocs is not installed (pip install -e '.[docs]')"
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_command_is_documented():
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    documented = set(re.findall(r"^## `(\w+)`", (DOCS / "cli.md").read_text(), re.M))
    assert names == documented
    assert isinstance(app, typer.Typer)


def test_every_example_is_documented():
    scripts = {p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")}
    text = (DOCS / "examples.md").read_text()
    assert scripts and all(f"`{name}`" in text for name in scripts)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_python_snippets_parse(page):
    text = (DOCS / page).read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        ast.parse(block)
