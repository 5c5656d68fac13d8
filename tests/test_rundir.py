"""The run directory's image writer: parallel PNG writes that round-trip exactly."""

import numpy as np
import pytest
from PIL import Image

from consistent_char.rundir import RunDirectory
from consistent_char.rundir import directory as rundir


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("threads", [1, 4])
def test_saved_images_load_back_pixel_identical_in_order(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(rundir, "PNG_WRITER_THREADS", threads)
    run, images = RunDirectory(tmp_path), _images(7)
    run.save_images(2, 0, images[:3])
    run.save_images(2, 3, images[3:])
    assert run.existing_images(2, 10) == 7
    for saved, original in zip(run.load_images(2, 7), images, strict=True):
        assert np.array_equal(np.asarray(saved), np.asarray(original))
    assert not list((tmp_path / "iter_002" / "images").glob(".*.tmp"))


def test_a_failed_write_raises_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "PNG_WRITER_THREADS", 4)
    images = _images(5)

    real_save = rundir.save_png_atomic

    def flaky(path, image):
        if path.name == "0003.png":
            raise OSError("disk full")
        real_save(path, image)

    monkeypatch.setattr(rundir, "save_png_atomic", flaky)
    with pytest.raises(OSError, match="disk full"):
        RunDirectory(tmp_path).save_images(0, 0, images)
    assert not (tmp_path / "iter_000" / "images" / "0003.png").exists()
    assert RunDirectory(tmp_path).existing_images(0, 5) == 3
