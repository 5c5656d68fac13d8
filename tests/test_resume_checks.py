"""Resume checks what it loads: a file changed after the run wrote it is computed again.

state.json records a SHA-256 of every artefact as it is written; a resumed run compares each
finished step's files with it (and their shapes, dtypes and values) and rolls back to the first
step whose files fail, so the run still ends on the uncut run's identity. The stages are the small
user-written ones of tests/fakes.py, so each case takes a fraction of a second.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from test_extractor import Interrupt, make_extractor, stop_after

from consistent_char.errors import InputFileError
from consistent_char.rundir import RunDirectory


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return make_extractor().extract("a colour", run_dir=tmp_path_factory.mktemp("ref") / "run")


def _cut_run(tmp_path):
    """A run cut after iteration 1's refinement: iterations 0 and 1 are on disk."""
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        make_extractor().extract("a colour", run_dir=run_dir, callback=stop_after(1, "refine"))
    return run_dir


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _change_embeddings(run_dir):
    path = run_dir / "iter_000" / "embeddings.npy"
    array = np.load(path)
    array[0, 0] += 0.25  # still a valid float32 array: only the checksum tells
    path.write_bytes(_npy(array))
    return "iter_000/embeddings.npy"


def _nan_embeddings_without_checksums(run_dir):
    state = json.loads((run_dir / "state.json").read_text())
    state["checksums"] = {}  # as an older run without checksums has it
    (run_dir / "state.json").write_text(json.dumps(state))
    path = run_dir / "iter_001" / "embeddings.npy"
    array = np.load(path)
    array[3, 1] = np.nan
    path.write_bytes(_npy(array))
    return "NaN"


def _float64_embeddings_without_checksums(run_dir):
    state = json.loads((run_dir / "state.json").read_text())
    state["checksums"] = {}
    (run_dir / "state.json").write_text(json.dumps(state))
    path = run_dir / "iter_000" / "embeddings.npy"
    path.write_bytes(_npy(np.load(path).astype(np.float64)))
    return "float64"


def _change_clusters(run_dir):
    path = run_dir / "iter_000" / "clusters.json"
    data = json.loads(path.read_text())
    data["labels"][0] = (data["labels"][0] + 1) % data["k"]
    path.write_text(json.dumps(data))
    return "iter_000/clusters.json"


def _damage_identity(run_dir):
    (run_dir / "iter_000" / "identity" / "embeddings.safetensors").write_bytes(b"garbage")
    return "iter_000/identity/embeddings.safetensors"


def _change_image(run_dir):
    from PIL import Image

    path = run_dir / "iter_001" / "images" / "0005.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return "iter_001/images/0005.png"


@pytest.mark.parametrize(
    "damage",
    [
        _change_embeddings,
        _nan_embeddings_without_checksums,
        _float64_embeddings_without_checksums,
        _change_clusters,
        _damage_identity,
        _change_image,
    ],
)
def test_a_changed_file_is_computed_again_and_the_run_ends_as_uncut(
    damage, reference, tmp_path, caplog
):
    run_dir = _cut_run(tmp_path)
    named = damage(run_dir)
    with caplog.at_level(logging.WARNING, logger="consistent_char.rundir"):
        resumed = make_extractor().extract("a colour", run_dir=run_dir, resume=True)
    assert any(named in r.getMessage() for r in caplog.records), caplog.text
    assert torch.equal(resumed.identity.clip_l, reference.identity.clip_l)
    assert [r.spread for r in resumed.history] == [r.spread for r in reference.history]


def test_a_damaged_identity_folder_is_moved_aside_not_deleted(tmp_path):
    run_dir = _cut_run(tmp_path)
    _damage_identity(run_dir)
    make_extractor().extract("a colour", run_dir=run_dir, resume=True)
    aside = run_dir / "iter_000" / "identity.superseded" / "embeddings.safetensors"
    assert aside.read_bytes() == b"garbage"


def test_loading_a_changed_file_directly_is_refused(tmp_path):
    run_dir = _cut_run(tmp_path)
    _change_embeddings(run_dir)
    run = RunDirectory(run_dir)
    run.read_state()
    with pytest.raises(InputFileError, match="changed after the run wrote it"):
        run.load_embeddings(0)


def test_state_json_records_a_checksum_of_every_artefact(tmp_path):
    run_dir = _cut_run(tmp_path)
    checksums = json.loads((run_dir / "state.json").read_text())["checksums"]
    for i in (0, 1):
        assert f"iter_00{i}/embeddings.npy" in checksums
        assert f"iter_00{i}/clusters.json" in checksums
        assert all(f"iter_00{i}/images/{j:04d}.png" in checksums for j in range(40))
    # Iteration 1 was cut after its training but before it was marked refined.
    assert "iter_000/identity/embeddings.safetensors" in checksums
    assert "iter_001/identity/embeddings.safetensors" not in checksums
