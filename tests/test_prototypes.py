"""Prototypes: right space group, sensible distances and densities, right element filter."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from cscflow.prototypes import PROTOTYPES, prototype_structures

ALL = ["Li", "P", "S", "Zn", "Si"]

# experimental densities (g/cm3), CRC Handbook; prototypes must be within 5 %
DENSITY = {
    "Li-bcc-Im-3m": 0.534,
    "P-black-Cmce": 2.69,
    "S-alpha-S8-Fddd": 2.07,
    "S-S6-R-3": 2.21,
    "Li2S-antifluorite-Fm-3m": 1.66,
    "Li3P-Na3As-P63mmc": 1.43,
    "Zn-hcp-P63mmc": 7.14,
    "Si-diamond-Fd-3m": 2.33,
    "ZnS-sphalerite-F-43m": 4.09,
    "Li15Si4-I-43d": 1.18,
}
# shortest bond expected (Å), from the same literature structures
SHORTEST = {
    "Li-bcc-Im-3m": 3.04, "P-black-Cmce": 2.22, "S-alpha-S8-Fddd": 2.04, "S-S6-R-3": 2.05,
    "Li2S-antifluorite-Fm-3m": 2.47, "Li3P-Na3As-P63mmc": 2.47, "Zn-hcp-P63mmc": 2.66,
    "Si-diamond-Fd-3m": 2.35, "ZnS-sphalerite-F-43m": 2.34, "Li15Si4-I-43d": 2.66,
}


@pytest.fixture(scope="module")
def everything():
    return dict(prototype_structures(ALL))


def test_every_prototype_is_built_and_checked(everything):
    assert set(everything) == {p.label for p in PROTOTYPES} == set(DENSITY)


@pytest.mark.parametrize("proto", PROTOTYPES, ids=lambda p: p.label)
def test_space_group_density_distances(proto, everything):
    s = everything[proto.label]
    assert s.is_ordered and s.is_valid(tol=1.0)
    sga = SpacegroupAnalyzer(s, symprec=0.01)
    assert sga.get_space_group_number() == proto.space_group
    assert s.density == pytest.approx(DENSITY[proto.label], rel=0.05)
    d = s.distance_matrix + np.diag([np.inf] * len(s)) if len(s) > 1 else None
    shortest = min(d.min() if d is not None else np.inf, min(s.lattice.abc))
    assert shortest == pytest.approx(SHORTEST[proto.label], abs=0.05)
    assert set(map(str, s.composition.elements)) == set(proto.species)


def test_sulfur_rings():
    """alpha-S: every S has exactly two S neighbours at ~2.05 Å (S8 rings)."""
    s = dict(prototype_structures(["S"]))["S-alpha-S8-Fddd"]
    assert len(s) == 32
    counts = [len(s.get_neighbors(site, 2.2)) for site in s]
    assert set(counts) == {2}


def test_filter_and_warning():
    with pytest.warns(UserWarning, match="Cl"):
        got = dict(prototype_structures(["Li", "S", "Cl"]))
    assert set(got) == {"Li-bcc-Im-3m", "S-alpha-S8-Fddd", "S-S6-R-3", "Li2S-antifluorite-Fm-3m"}
    lips = dict(prototype_structures(["Li", "P", "S"]))
    assert {"Li-bcc-Im-3m", "P-black-Cmce", "Li2S-antifluorite-Fm-3m", "Li3P-Na3As-P63mmc"} <= set(lips)
    assert not any("Zn" in k or "Si" in k for k in lips)
    with pytest.raises(ValueError, match="unknown element"):
        prototype_structures(["Li", "Xx"])
    with pytest.raises(TypeError):
        prototype_structures("Li-P-S")


def test_structures_are_copies():
    a = dict(prototype_structures(["Li"]))["Li-bcc-Im-3m"]
    a.scale_lattice(100.0)
    b = dict(prototype_structures(["Li"]))["Li-bcc-Im-3m"]
    assert b.volume < 30


def test_match_materials_project(lips_structures):
    """Black P, Li2S and Li3P are the Materials Project ground states (topology check)."""
    protos = dict(prototype_structures(["Li", "P", "S"]))
    sm = StructureMatcher(scale=True)
    for label, mp_id in [("P-black-Cmce", "mp-157"), ("Li2S-antifluorite-Fm-3m", "mp-1153"),
                         ("Li3P-Na3As-P63mmc", "mp-736"), ("S-alpha-S8-Fddd", "mp-77"),
                         ("Li-bcc-Im-3m", "mp-135")]:
        assert sm.fit(protos[label], lips_structures[mp_id]), label
