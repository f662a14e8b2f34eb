"""Perturbation statistics on real structures (paper Methods 4.2)."""

from __future__ import annotations

import numpy as np
import pytest

from cscflow.perturb import PerturbationError, close_pairs, perturb_structure


def _displacements(original, perturbed):
    """Cartesian displacements in the strained cell (minimum image in fractional space)."""
    dfrac = perturbed.frac_coords - original.frac_coords
    dfrac -= np.round(dfrac)
    return dfrac @ perturbed.lattice.matrix


def test_displacement_std_matches_sigma_times_a(lips_structures):
    li2s = lips_structures["mp-1153"].copy()  # antifluorite Li2S
    li2s.make_supercell([3, 3, 3])  # 81 atoms
    a = (li2s.volume / len(li2s)) ** (1 / 3)
    rng = np.random.default_rng(0)
    disps, records = [], []
    for _ in range(8):
        new, rec = perturb_structure(li2s, rng, position_sigma=(0.1, 0.1), lattice_strain=(0.03, 0.05))
        disps.append(_displacements(li2s, new))
        records.append(rec)
    d = np.concatenate(disps).ravel()
    assert records[0]["a"] == pytest.approx(a)
    assert records[0]["sigma"] == pytest.approx(0.1 * a)
    # ~1950 components: std known to ~2 %; the overlap redraws bias it only slightly
    assert d.std() == pytest.approx(0.1 * a, rel=0.08)
    assert abs(d.mean()) < 0.02
    for rec in records:
        assert all(0.03 <= abs(e) <= 0.05 for e in rec["lattice_strain"])


def test_lattice_strain_and_sigma_within_bounds(lips_structures):
    s = lips_structures["mp-736"]  # Li3P
    rng = np.random.default_rng(1)
    signs = set()
    for _ in range(20):
        new, rec = perturb_structure(s, rng)
        assert 0.08 <= rec["position_sigma_fraction"] <= 0.15
        ratio = np.array(new.lattice.abc) / np.array(s.lattice.abc)
        np.testing.assert_allclose(ratio - 1, rec["lattice_strain"], atol=1e-10)
        assert np.all((np.abs(ratio - 1) >= 0.03 - 1e-12) & (np.abs(ratio - 1) <= 0.05 + 1e-12))
        np.testing.assert_allclose(new.lattice.angles, s.lattice.angles, atol=1e-8)
        signs.update(np.sign(rec["lattice_strain"]).tolist())
        assert len(close_pairs(new, 0.7)) == 0
        assert rec["min_distance"] > 0.7 * 2 * 1.07  # no pair closer than 0.7 x (r_P + r_P) or Li-Li
        assert new.composition == s.composition
    assert signs == {-1.0, 1.0}


def test_deterministic_for_seed(lips_structures):
    s = lips_structures["mp-1153"]
    a, ra = perturb_structure(s, np.random.default_rng(7))
    b, rb = perturb_structure(s, np.random.default_rng(7))
    c, _ = perturb_structure(s, np.random.default_rng(8))
    assert ra == rb
    np.testing.assert_allclose(a.cart_coords, b.cart_coords)
    assert not np.allclose(a.cart_coords, c.cart_coords)


def test_overlaps_are_redrawn_and_recorded(lips_structures):
    s = lips_structures["mp-157"]  # black P: short P-P bonds, large sigma
    rng = np.random.default_rng(3)
    rounds = [perturb_structure(s, rng, position_sigma=(0.15, 0.15))[1]["redraw_rounds"] for _ in range(20)]
    assert max(rounds) > 0  # sigma = 0.15 a does produce overlaps here
    with pytest.raises(PerturbationError, match="redraw"):
        perturb_structure(s, np.random.default_rng(0), position_sigma=(0.6, 0.6), max_redraws=0,
                          min_distance_factor=1.5)


def test_tight_input_is_held_to_its_own_distances():
    """A compressed input (Li-Li 1.5 Å < 0.7 x 2.56 Å) is perturbed, not rejected."""
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(3.0), ["Li", "Li"], [[0, 0, 0], [0.5, 0.0, 0.0]])
    new, rec = perturb_structure(s, np.random.default_rng(0), position_sigma=(0.05, 0.05))
    assert rec["min_distance_factor"] == pytest.approx(0.9 * 1.5 / 2.56, rel=1e-3)
    assert rec["min_distance"] > 0.9 * 1.5 * (1 - 0.05)


def test_bad_input_is_explained(lips_structures):
    s = lips_structures["mp-1153"]
    with pytest.raises(ValueError, match="position_sigma"):
        perturb_structure(s, np.random.default_rng(0), position_sigma=(0.2, 0.1))
    with pytest.raises(ValueError, match="lattice_strain"):
        perturb_structure(s, np.random.default_rng(0), lattice_strain=(-0.1, 0.05))
    with pytest.raises(TypeError, match="pymatgen Structure"):
        perturb_structure("Li2S", np.random.default_rng(0))
