"""Incremental S.U.N. matching equals the all-pairs StructureMatcher comparison on real data."""

from __future__ import annotations

import numpy as np
import pytest

from cscflow.config import ScoreSettings
from cscflow.schemas import Candidate, Provenance, ReferenceEntry
from cscflow.score import SunMatcher, match_flags_all_pairs, match_key, reduced_structure, score_candidates


def _strained(s, axis, factor):
    t = s.copy()
    m = np.array(t.lattice.matrix)
    m[axis] *= factor
    t.lattice = type(t.lattice)(m)
    return t


def _variants(s, rng):
    """Copies that sit on both sides of the matcher's tolerances (ltol 0.2, stol 0.3)."""
    out = [s.copy()]
    for amp in (0.05, 0.4):
        r = s.copy()
        r.perturb(amp, min_distance=amp / 2, seed=int(rng.integers(2**31)))
        out.append(r)
    scaled = s.copy()
    scaled.scale_lattice(s.volume * 1.1)  # volume scaling is normalised by the matcher
    out += [scaled, _strained(s, 0, 1.15), _strained(s, 1, 1.3)]
    if len(s) <= 8:
        sup = s.copy()
        sup.make_supercell([1, 1, 2])
        out.append(sup)
    order = rng.permutation(len(s))
    out.append(type(s).from_sites([s[int(i)] for i in order]))
    return out


@pytest.fixture(scope="module")
def structures(lips_structures):
    """Small real MP Li-P-S cells, several per formula."""
    items = sorted(lips_structures.items())
    return [s for _, s in items if len(s) <= 16][:24]


@pytest.fixture(scope="module")
def cases(structures):
    rng = np.random.default_rng(7)
    known = structures[::2]
    current = []
    for s in structures[1::3] + structures[::4]:  # some are known, some are new
        current += _variants(s, rng)
    current = [current[i] for i in rng.permutation(len(current))]
    return known, current


def test_same_flags_as_all_pairs(cases):
    known, current = cases
    reference = match_flags_all_pairs(current, known)
    sun = SunMatcher(ScoreSettings())
    for k in known:
        sun.add_known(k)
    flags = [sun.check(s)[:2] for s in current]
    assert flags == reference
    # both outcomes occur, so the comparison is not trivially all-True or all-False
    assert {u for u, _ in flags} == {True, False} and {n for _, n in flags} == {True, False}
    n_formula_pairs = sum(
        1 for i, s in enumerate(current) for t in [*known, *current[:i]] if s.composition.reduced_formula == t.composition.reduced_formula
    )
    assert sun.n_fits < n_formula_pairs / 2  # the pre-filters skip most same-formula pairs


def test_filter_is_a_necessary_condition(structures):
    """Every pair StructureMatcher fits passes the key test the incremental matcher uses."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    rng = np.random.default_rng(3)
    settings = ScoreSettings()
    matcher = StructureMatcher(ltol=settings.ltol, stol=settings.stol, angle_tol=settings.angle_tol)
    fitted = 0
    for s in structures[:8]:
        for v in _variants(s, rng):
            if not matcher.fit(v, s):
                continue
            fitted += 1
            kv, ks = match_key(v), match_key(s)
            assert kv.n_sites == ks.n_sites
            assert all(a < (1 + settings.ltol) * b for a, b in zip(kv.minima, ks.lengths))
    assert fitted >= 8


def _cand(structure, cid, iteration, energy=-4.0, key=None):
    return Candidate(
        provenance=Provenance(candidate_id=cid, iteration=iteration, generator="seed"),
        structure=structure, status="relaxed", energy_per_atom=energy, energy=energy * len(structure),
        model="m", match_key=key,
    )


def test_score_stores_keys_and_reuses_them(lips_structures, cases):
    """Keys land on the scored candidates; the next iteration reads them instead of recomputing."""
    known, current = cases
    refs = [
        ReferenceEntry(entry_id=i, structure=lips_structures[i], energy_per_atom=e, model="m", source="test")
        for i, e in (("mp-135", -1.9), ("mp-157", -5.4), ("mp-96", -4.1))
    ]
    it1 = [_cand(s, f"a{i}", 1) for i, s in enumerate(known)]
    out1 = score_candidates(it1, refs, model="m")
    assert all(c.match_key is not None for c in out1.candidates)
    assert out1.n_match_keys == len(refs) + len(it1)
    it2 = [_cand(s, f"b{i}", 2) for i, s in enumerate(current)]
    out2 = score_candidates(it2, refs, [out1.candidates], model="m")
    assert out2.n_match_keys == len(refs) + len(it2)  # none for the earlier iteration's candidates
    reference = match_flags_all_pairs(current, [r.structure for r in refs] + list(known))
    assert [(c.is_unique, c.is_novel) for c in out2.candidates] == reference
    key = out2.candidates[0].match_key
    assert key.n_sites == len(reduced_structure(current[0]))
