import numpy as np
import pytest

from consistent_char.toy.data import INVALID_KINDS, degrade, render_set
from consistent_char.toy.world import CreatureRecord, render


def test_a_probe_set_holds_the_asked_fraction_of_invalid_images():
    data = render_set(
        100, seed=0, captions_per_image=1, workers=1, prior="uniform", invalid_fraction=0.3
    )
    assert data.valid.shape == (200,) and data.valid.dtype == bool
    assert 0.2 < 1 - data.valid.mean() < 0.4
    clean = render_set(20, seed=0, captions_per_image=1, workers=1)
    assert clean.valid.all()
    with pytest.raises(ValueError, match="invalid_fraction"):
        render_set(2, seed=0, invalid_fraction=1.0)


@pytest.mark.parametrize("kind", INVALID_KINDS)
def test_every_kind_of_invalid_image_differs_from_the_render(kind):
    record = CreatureRecord("round", "blue", "crown", "red", "big", "forest")
    image = degrade(record, np.random.default_rng(0), kind, 64)
    assert image.size == (64, 64)
    diff = np.abs(np.asarray(image).astype(int) - np.asarray(render(record)).astype(int))
    assert (diff.sum(axis=-1) > 30).sum() >= 20, kind
    with pytest.raises(ValueError, match="kind must be one of"):
        degrade(record, np.random.default_rng(0), "melt", 64)
