"""Eqs. (1)-(2) through QUESTS' own functions, on real Li-P-S descriptors."""

from __future__ import annotations

import numpy as np
import pytest
from quests.compression.metrics import sequential_metrics
from quests.entropy import delta_entropy as quests_delta_entropy
from quests.entropy import entropy as quests_entropy

from cscflow.entropy import (
    DH_CAP,
    DescriptorCache,
    delta_entropy,
    dh_dn,
    entropy,
    entropy_along,
    entropy_estimate,
    environment_descriptors,
    greedy_entropy_ranking,
    stack_descriptors,
    structure_descriptors,
)

LI2S, LI3PS4_A, LI3PS4_B, BLACK_P, ALPHA_S = "mp-1153", "mp-985583", "mp-1097036", "mp-157", "mp-96"
IDS = [LI2S, LI3PS4_A, LI3PS4_B, BLACK_P, ALPHA_S]
H = 0.1  # a bandwidth at which these few structures overlap (δH finite), so the sums are tested


@pytest.fixture(scope="module")
def desc(lips_structures):
    return dict(zip(IDS, structure_descriptors([lips_structures[i] for i in IDS])))


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


def test_h_and_delta_h_are_quests_functions(desc):
    x = stack_descriptors([desc[LI2S], desc[LI3PS4_A], desc[ALPHA_S]])
    for h in (0.015, H):
        assert entropy(x, h, device="cpu") == pytest.approx(float(quests_entropy(x, h=h)), rel=1e-12)
        y = desc[LI3PS4_B]
        ours = delta_entropy(y, x, h, device="cpu")
        ref = quests_delta_entropy(y, x, h=h)
        np.testing.assert_allclose(ours, ref, rtol=1e-12)
    # eq. (2) is per environment: an environment already in X has δH <= 0 (Σ K >= 1)
    assert np.all(delta_entropy(desc[LI2S], x, H, device="cpu") <= 1e-12)
    assert np.all(np.isinf(delta_entropy(desc[LI2S], np.zeros((0, 63)), device="cpu")))
    assert entropy(np.zeros((0, 63))) == 0.0
    with pytest.raises(ValueError, match="2-D"):
        entropy(np.zeros(5))
    with pytest.raises(ValueError, match="length mismatch"):
        delta_entropy(desc[LI2S], x[:, :10])


def test_torch_kernels_path_gives_the_same_numbers(desc):
    """The quests.gpu path (used on CUDA) run on the CPU: same H, δH and ranking."""
    frames = [desc[i] for i in IDS]
    x = stack_descriptors(frames[:3])
    assert entropy(x, H, device="torch-cpu") == pytest.approx(entropy(x, H, device="cpu"), rel=1e-9)
    np.testing.assert_allclose(
        delta_entropy(frames[3], x, H, device="torch-cpu"), delta_entropy(frames[3], x, H, device="cpu"), rtol=1e-9
    )
    a = greedy_entropy_ranking(frames, bandwidth=H, device="torch-cpu")
    b = greedy_entropy_ranking(frames, bandwidth=H, device="cpu")
    assert a.order == b.order and np.allclose(a.entropy, b.entropy, rtol=1e-9)


def test_greedy_ranking_recomputes_delta_h_against_the_chosen_set(desc):
    frames = [desc[i] for i in IDS]
    ranking = greedy_entropy_ranking(frames, bandwidth=H, device="cpu")
    assert sorted(ranking.order) == list(range(len(frames)))
    for n, i in enumerate(ranking.order):
        chosen = stack_descriptors([frames[j] for j in ranking.order[:n]])
        expected = np.minimum(quests_delta_entropy(frames[i], chosen, h=H), DH_CAP).mean() if n else DH_CAP
        assert ranking.delta_entropy[n] == pytest.approx(float(expected), rel=1e-9)
        # the pick is the best remaining frame at that moment
        rest = [j for j in range(len(frames)) if j not in ranking.order[:n]]
        if n:
            best = max(np.minimum(quests_delta_entropy(frames[j], chosen, h=H), DH_CAP).mean() for j in rest)
            assert ranking.delta_entropy[n] == pytest.approx(float(best), rel=1e-9)
        # H after the pick is eq. (1) on all environments chosen so far
        upto = stack_descriptors([frames[j] for j in ranking.order[: n + 1]])
        assert ranking.entropy[n] == pytest.approx(float(quests_entropy(upto, h=H)), rel=1e-9, abs=1e-12)
        assert ranking.n_environments[n] == len(upto)
    # first pick (empty set, every δH capped): the frame with the highest own H
    own = [float(quests_entropy(x, h=H)) for x in frames]
    assert ranking.order[0] == int(np.argmax(own))


def test_entropy_along_matches_quests_sequential_metrics(desc):
    frames = [desc[i] for i in IDS]
    ours = entropy_along(frames, bandwidth=H, device="cpu")
    ref = [m["entropy"] for m in sequential_metrics(frames, list(range(len(frames))), h=H)]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    rates = dh_dn(ours)
    assert rates[0] is None and rates[1] == pytest.approx(ours[1] - ours[0])
    assert dh_dn(ours, window=2)[3] == pytest.approx((ours[3] - ours[1]) / 2)


def test_estimator_is_exact_when_it_can_and_within_its_error(desc):
    x = stack_descriptors(list(desc.values()))
    exact = entropy(x, H, device="cpu")
    assert entropy_estimate(x, len(x), H) == (pytest.approx(exact), 0.0)
    est, err = entropy_estimate(x, len(x) // 2, H, seed=1, device="cpu")
    assert err > 0 and abs(est - exact) < 5 * err + 1e-9


def test_descriptor_cache_computes_each_frame_once(lips_structures, tmp_path):
    cache = DescriptorCache()
    structures = [lips_structures[LI2S], lips_structures[ALPHA_S]]
    a = structure_descriptors(structures, keys=["f1", "f2"], cache=cache)
    b = structure_descriptors(structures, keys=["f1", "f2"], cache=cache)
    assert cache.computed == 2 and all(x is y for x, y in zip(a, b))
    back = DescriptorCache.load(cache.save(tmp_path / "desc.npz"))
    assert set(back.arrays) == {"f1", "f2"} and np.array_equal(back.arrays["f2"], a[1])
    with pytest.raises(ValueError, match="cache is for"):
        structure_descriptors(structures, k=16, keys=["f1", "f2"], cache=cache)
