"""QUESTS entropy wrappers on real Li-P-S structures."""

from __future__ import annotations

import numpy as np
import pytest
from quests.entropy import entropy as quests_entropy

from cscflow.entropy import (
    dataset_entropy,
    environment_descriptors,
    stack_descriptors,
    structure_descriptors,
    structure_entropy_gain,
    subsample,
)

LI2S, LI3PS4_A, LI3PS4_B, BLACK_P, ALPHA_S = "mp-1153", "mp-985583", "mp-1097036", "mp-157", "mp-96"


@pytest.fixture(scope="module")
def desc(lips_structures):
    ids = [LI2S, LI3PS4_A, LI3PS4_B, BLACK_P, ALPHA_S]
    return dict(zip(ids, structure_descriptors([lips_structures[i] for i in ids])))


def test_descriptor_shapes_and_invariance(lips_structures, desc):
    s = lips_structures[LI2S]
    assert desc[LI2S].shape == (3, 63)
    sc = s.copy()
    sc.make_supercell([2, 1, 1])
    x = environment_descriptors(sc)
    assert x.shape == (6, 63)
    # a supercell has the same environments as the primitive cell
    assert np.allclose(np.unique(x.round(6), axis=0), np.unique(desc[LI2S].round(6), axis=0))
    with pytest.raises(TypeError, match="pymatgen Structure"):
        environment_descriptors("Li2S")


def test_dataset_entropy_matches_quests_and_grows_with_new_structure(desc):
    x = stack_descriptors([desc[LI2S], desc[LI3PS4_A]])
    h = dataset_entropy(x)
    assert h == pytest.approx(float(quests_entropy(x)), rel=1e-9)
    h_more = dataset_entropy(stack_descriptors([desc[LI2S], desc[LI3PS4_A], desc[ALPHA_S]]))
    assert h_more > h + 0.1
    # duplicating the whole set changes nothing: H is a property of the distribution
    assert dataset_entropy(np.concatenate([x, x])) == pytest.approx(h, abs=1e-9)


def test_empty_inputs():
    assert dataset_entropy(np.zeros((0, 63))) == 0.0
    assert structure_entropy_gain([], None).shape == (0,)
    assert stack_descriptors([]).shape == (0, 63)
    gains = structure_entropy_gain([np.zeros((0, 63))], np.zeros((0, 63)))
    assert gains.tolist() == [0.0]
    with pytest.raises(ValueError, match="2-D"):
        dataset_entropy(np.zeros(5))


def test_gain_of_duplicate_is_lower_than_of_new_environments(desc):
    train = stack_descriptors([desc[LI2S], desc[LI3PS4_A]])
    gains = structure_entropy_gain([desc[LI3PS4_A], desc[LI3PS4_B], desc[ALPHA_S]], train)
    dup, other_polymorph, sulfur = gains
    assert dup < 0.01
    assert other_polymorph > dup + 0.2
    assert sulfur > dup + 0.2
    # ΔH is literally H(X ∪ Y) - H(X)
    expected = dataset_entropy(np.concatenate([train, desc[ALPHA_S]])) - dataset_entropy(train)
    assert sulfur == pytest.approx(expected, rel=1e-9)


def test_gain_without_reference_is_self_entropy(desc):
    gains = structure_entropy_gain([desc[LI2S], desc[BLACK_P]], None)
    assert gains[0] == pytest.approx(float(quests_entropy(desc[LI2S])), rel=1e-9)
    assert gains[1] == pytest.approx(0.0, abs=1e-9)  # black P: all 4 atoms equivalent


def test_subsample_is_seeded(desc):
    x = stack_descriptors(list(desc.values()))
    a, b = subsample(x, 20, seed=3), subsample(x, 20, seed=3)
    assert a.shape == (20, 63) and np.array_equal(a, b)
    assert not np.array_equal(a, subsample(x, 20, seed=4))
    assert subsample(x, None).shape == x.shape
    with pytest.raises(ValueError, match="length mismatch"):
        structure_entropy_gain([desc[LI2S]], x[:, :10])
