"""What a run keeps and loses: exact values of the drift and validity measures on a hand-made
run folder read by a fake probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from consistent_char.eval.drift import (
    drift,
    image_validity,
    iteration_measures,
    kept,
    min_validity,
    modal_identity,
)

A = {"shape": "round", "color": "red", "hat": "cap", "hat_color": "blue", "eyes": "big"}
FADED = {**A, "hat": "none", "hat_color": "none", "eyes": "sleepy"}


class CodedProbe:
    """Reads image k (its red channel is k) as records[k]; images with green > 0 are invalid."""

    def __init__(self, records):
        self.records = records

    def predict(self, images):
        return [self.records[int(np.asarray(im)[0, 0, 0])] for im in images]

    def predict_validity(self, images):
        return np.array([0.1 if np.asarray(im)[0, 0, 1] > 0 else 0.9 for im in images])


def _image(code: int, invalid: bool = False) -> Image.Image:
    return Image.new("RGB", (8, 8), (code, 255 if invalid else 0, 0))


def _write_iteration(root, i, codes, invalid=(), labels=None, chosen=None):
    folder = root / f"iter_{i:03d}" / "images"
    folder.mkdir(parents=True)
    for j, code in enumerate(codes):
        _image(code, j in invalid).save(folder / f"{j:04d}.png")
    if labels is not None:
        (root / f"iter_{i:03d}" / "clusters.json").write_text(
            json.dumps({"labels": labels, "chosen": chosen})
        )


def test_modal_identity_and_kept():
    records = [{**A, "scene": "snow"}, {**A, "scene": "city"}, {**FADED, "scene": "night"}]
    assert modal_identity(records) == A
    assert kept(A, A) == 1.0 and kept(A, FADED) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least one record"):
        modal_identity([])


def test_iteration_measures_follow_the_first_chosen_character(tmp_path):
    records = {
        0: {**A, "scene": "snow"},
        1: {**A, "scene": "city"},
        2: {**FADED, "scene": "night"},
        3: {**A, "color": "blue", "scene": "forest"},
    }
    # Iteration 0: cluster 1 (images 0, 1, 3) is chosen; its modal identity is A.
    _write_iteration(tmp_path, 0, [0, 1, 2, 3], labels=[1, 1, 0, 1], chosen=1)
    # Iteration 1: half the images faded, one of them invalid.
    _write_iteration(tmp_path, 1, [0, 2, 2, 1], invalid={2}, labels=[0, 0, 0, 0], chosen=0)
    measures = iteration_measures(tmp_path, CodedProbe(records))
    assert [m["iteration"] for m in measures] == [0, 1]
    first, second = measures
    assert first["chosen_modal"] == A and first["validity"] == 1.0
    assert first["agreement"]["color"] == pytest.approx(0.75)  # image 3 is blue
    assert first["identity_share"] == pytest.approx(0.5)  # images 0 and 1
    assert second["validity"] == pytest.approx(0.75)
    assert second["agreement"]["hat"] == pytest.approx(0.5)
    assert second["scenes"]["night"] == pytest.approx(0.5)
    assert min_validity(measures) == pytest.approx(0.75)

    faded_final = [{**FADED, "scene": "snow"}] * 3 + [{**A, "scene": "city"}]
    result = drift(measures, faded_final)
    assert result["chosen"] == A and result["final"] == FADED
    assert result["kept"] == pytest.approx(0.4)
    assert result["attributes"] == {
        "shape": True,
        "color": True,
        "hat": False,
        "hat_color": False,
        "eyes": False,
    }


def test_a_run_without_clusters_has_no_reference(tmp_path):
    _write_iteration(tmp_path, 0, [0, 0])
    measures = iteration_measures(tmp_path, CodedProbe({0: {**A, "scene": "snow"}}))
    assert measures[0]["chosen_modal"] is None and measures[0]["identity_share"] is None
    assert drift(measures, [{**A, "scene": "snow"}])["kept"] is None


def test_validity_needs_a_validity_head():
    class NoHead:
        def predict(self, images):
            return []

    assert image_validity(NoHead(), [_image(0)]) is None
    assert image_validity(CodedProbe({}), [_image(0), _image(0, invalid=True)]) == 0.5
    assert min_validity([{"validity": None}]) is None
