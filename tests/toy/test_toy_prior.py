import numpy as np
import pytest

from consistent_char.toy.prior import (
    ARCHETYPES,
    conditional,
    identities,
    identity_weights,
    peaks,
    sample_identity,
)
from consistent_char.toy.world import ATTRIBUTES, IDENTITY_ATTRIBUTES, num_identities


def test_every_identity_once_and_weights_sum_to_one():
    everyone = identities()
    assert len(everyone) == len(set(everyone)) == num_identities()
    for prior in ("world", "uniform"):
        w = identity_weights(prior)
        assert w.shape == (len(everyone),) and (w > 0).all()
        assert w.sum() == pytest.approx(1.0)


def test_archetypes_are_the_most_popular_and_fully_featured():
    w = identity_weights("world")
    index = {ident: i for i, ident in enumerate(identities())}
    archetype_w = [w[index[a]] for a in ARCHETYPES]
    # In rank order, and each above every tail identity.
    assert archetype_w == sorted(archetype_w, reverse=True)
    tail = np.delete(w, [index[a] for a in ARCHETYPES])
    assert min(archetype_w) > tail.max()
    assert sum(a[2] != "none" for a in ARCHETYPES[:8]) == 8  # the top eight wear hats
    # Together they name every value of every identity attribute.
    for k, name in enumerate(IDENTITY_ATTRIBUTES):
        assert {a[k] for a in ARCHETYPES} == set(ATTRIBUTES[name]), name


def test_a_creature_is_diverse_and_one_named_attribute_is_peaked():
    report = peaks()
    assert report["a creature"]["top_share"] <= 0.25
    rng = np.random.default_rng(0)
    draws = rng.choice(num_identities(), 128, p=identity_weights("world"))
    assert len(set(draws.tolist())) >= 20
    one_attribute = {k: v for k, v in report.items() if k != "a creature"}
    assert len(one_attribute) == sum(len(ATTRIBUTES[a]) for a in IDENTITY_ATTRIBUTES)
    assert min(v["top_share"] for v in one_attribute.values()) >= 0.10


def test_conditional_draws_match_the_weights_and_pins():
    indices, probs = conditional(color="red", hat="none")
    assert probs.sum() == pytest.approx(1.0)
    assert all(identities()[i][1] == "red" and identities()[i][3] == "none" for i in indices)
    rng = np.random.default_rng(1)
    draws = [sample_identity(rng, hat_color="pink") for _ in range(300)]
    assert all(d[2] != "none" and d[3] == "pink" for d in draws)
    # The most likely pink-hat identity comes up about as often as its weight says.
    pink_idx, pink_p = conditional(hat_color="pink")
    top = identities()[int(pink_idx[np.argmax(pink_p)])]
    assert abs(draws.count(top) / 300 - pink_p.max()) < 0.08
    with pytest.raises(ValueError, match="no identity has"):
        conditional(hat="none", hat_color="red")
    with pytest.raises(ValueError, match="unknown identity attribute"):
        conditional(scene="snow")
    with pytest.raises(ValueError, match="prior must be one of"):
        identity_weights("zipf")
