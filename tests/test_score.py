"""E_hull and S.U.N. on real MP structures with CHGNet single-point energies."""

from __future__ import annotations

import pytest

from cscflow.config import ForceFieldSettings, ScoreSettings
from cscflow.forcefields import get_calculator, model_tag, single_points
from cscflow.schemas import Candidate, Provenance, ReferenceEntry
from cscflow.score import MissingReferenceError, ScoreMaker, calculator_recompute, score_candidates

LI, BLACK_P, ALPHA_S = "mp-135", "mp-157", "mp-96"
LI2S, LI2S_HEX, LI3PS4_A, LI3PS4_B = "mp-1153", "mp-557142", "mp-985583", "mp-1097036"
FF = ForceFieldSettings()


@pytest.fixture(scope="module")
def tag():
    return model_tag(FF)


@pytest.fixture(scope="module")
def epa(lips_structures):
    """CHGNet 0.3.0 energy per atom of each structure used here (computed, not invented)."""
    ids = [LI, BLACK_P, ALPHA_S, LI2S, LI2S_HEX, LI3PS4_A, LI3PS4_B]
    results = single_points([lips_structures[i] for i in ids], get_calculator(FF))
    return {i: r["energy"] / len(lips_structures[i]) for i, r in zip(ids, results)}


def _ref(structures, epa, mp_id, model):
    return ReferenceEntry(
        entry_id=mp_id, structure=structures[mp_id], energy_per_atom=epa[mp_id], model=model, source="test"
    )


def _cand(structure, e_per_atom, cid, model, iteration=1, status="relaxed"):
    return Candidate(
        provenance=Provenance(candidate_id=cid, iteration=iteration, generator="seed"),
        structure=structure,
        status=status,
        energy_per_atom=e_per_atom if status == "relaxed" else None,
        energy=e_per_atom * len(structure) if status == "relaxed" else None,
        model=model,
        reject_reason=None if status == "relaxed" else "min distance: 0.3 < 0.6",
    )


@pytest.fixture(scope="module")
def elements_refs(lips_structures, epa, tag):
    return [_ref(lips_structures, epa, i, tag) for i in (LI, BLACK_P, ALPHA_S)]


def test_hull_sun_flags(lips_structures, epa, tag, elements_refs):
    s = lips_structures
    refs = [*elements_refs, _ref(s, epa, LI2S, tag), _ref(s, epa, LI3PS4_A, tag)]
    li2s_super = s[LI2S].copy()
    li2s_super.make_supercell([1, 1, 2])
    cands = [
        _cand(s[LI2S_HEX], epa[LI2S_HEX], "hex", tag),
        _cand(li2s_super, epa[LI2S], "li2s-super", tag),  # the known stable phase again
        _cand(s[LI3PS4_B], epa[LI3PS4_B], "b1", tag),
        _cand(s[LI3PS4_B].copy(), epa[LI3PS4_B], "b2", tag),  # duplicate within the iteration
        _cand(s[LI3PS4_B], 0.0, "bad", tag, status="rejected"),
    ]
    out = score_candidates(cands, refs, settings=ScoreSettings(), model=tag)
    by_id = {c.id: c for c in out.candidates}
    # the stable antifluorite phase sits on the hull
    assert by_id["li2s-super"].e_hull == pytest.approx(0.0, abs=1e-4)
    assert by_id["li2s-super"].is_novel is False and by_id["li2s-super"].is_stable
    assert by_id["hex"].e_hull == pytest.approx(epa[LI2S_HEX] - epa[LI2S], abs=1e-6)
    assert by_id["hex"].is_novel and by_id["hex"].is_unique
    assert by_id["b1"].is_unique and not by_id["b2"].is_unique
    assert by_id["b1"].e_hull == pytest.approx(by_id["b2"].e_hull)
    assert by_id["bad"].status == "rejected" and by_id["bad"].e_hull is None
    assert out.n_relaxed == 4 and out.n_rejected == 1 and out.n_unique == 3
    assert out.n_sun == sum(c.is_sun for c in out.candidates)
    assert cands[0].e_hull is None  # inputs are not modified


def test_below_known_hull_is_negative(lips_structures, epa, tag, elements_refs):
    s = lips_structures
    out = score_candidates([_cand(s[LI2S], epa[LI2S], "c", tag)], elements_refs, model=tag)
    # against the elements only, E_hull is the formation energy per atom
    formation = epa[LI2S] - (2 * epa[LI] + epa[ALPHA_S]) / 3
    assert formation < -0.5
    assert out.candidates[0].e_hull == pytest.approx(formation, abs=1e-6)
    assert out.candidates[0].is_stable and out.candidates[0].is_sun


def test_previous_iterations_join_hull_and_novelty(lips_structures, epa, tag, elements_refs):
    s = lips_structures
    previous = [[_cand(s[LI2S], epa[LI2S], "it1-li2s", tag), _cand(s[LI2S], 0.0, "it1-x", tag, status="rejected")]]
    cands = [_cand(s[LI2S].copy(), epa[LI2S], "it2-li2s", tag, 2), _cand(s[LI2S_HEX], epa[LI2S_HEX], "hex", tag, 2)]
    out = score_candidates(cands, elements_refs, previous, model=tag)
    li2s, hex_ = out.candidates
    assert li2s.is_unique and not li2s.is_novel
    assert li2s.e_hull == pytest.approx(0.0, abs=1e-6)
    assert hex_.e_hull == pytest.approx(epa[LI2S_HEX] - epa[LI2S], abs=1e-6)
    assert out.n_hull_entries == 4


def test_missing_elements_named(lips_structures, epa, tag, elements_refs):
    refs = [r for r in elements_refs if r.entry_id != BLACK_P]
    cand = _cand(lips_structures[LI3PS4_A], epa[LI3PS4_A], "c", tag)
    with pytest.raises(MissingReferenceError, match=r"elemental entry for P\b"):
        score_candidates([cand], refs, model=tag)


def test_other_model_energies_are_recomputed(lips_structures, epa, tag, elements_refs):
    s = lips_structures
    old = ForceFieldSettings(chgnet_version="0.2.0")
    old_tag = model_tag(old)
    old_e = single_points([r.structure for r in elements_refs], get_calculator(old))
    stale = [
        r.model_copy(update={"energy_per_atom": e["energy"] / len(r.structure), "model": old_tag})
        for r, e in zip(elements_refs, old_e)
    ]
    assert any(abs(a.energy_per_atom - b.energy_per_atom) > 1e-3 for a, b in zip(stale, elements_refs))
    cand = _cand(s[LI2S], epa[LI2S], "c", tag)
    with pytest.raises(ValueError, match="no calculator"):
        score_candidates([cand], stale, model=tag)
    out = score_candidates([cand], stale, model=tag, recompute=calculator_recompute(get_calculator(FF)))
    expected = score_candidates([cand], elements_refs, model=tag).candidates[0].e_hull
    assert out.recomputed == {"references": 3} and out.recomputed_from == [old_tag]
    assert out.candidates[0].e_hull == pytest.approx(expected, abs=1e-4)


def test_score_maker_runs_in_jobflow(lips_structures, epa, tag, elements_refs):
    from jobflow import run_locally

    cand = _cand(lips_structures[LI2S], epa[LI2S], "c", tag)
    job = ScoreMaker().make([cand], elements_refs)
    responses = run_locally(job, ensure_success=True, log=False)
    out = responses[job.uuid][1].output
    assert out.n_sun == 1 and out.model == tag
    assert out.candidates[0].e_hull < -0.5
