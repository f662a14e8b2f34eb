"""Energies per (structure, model tag): computed once, stored in the run's store, reused."""

from __future__ import annotations

import pytest

from cscflow.config import ForceFieldSettings, StoreSettings
from cscflow.energies import EnergyCache, energies_with_model, energy_cache_for
from cscflow.forcefields import get_calculator, model_tag, single_points
from cscflow.schemas import Candidate, Provenance, ReferenceEntry
from cscflow.score import calculator_recompute, score_candidates
from cscflow.stores import build_job_store

LI, BLACK_P, ALPHA_S, LI2S, LI2S_HEX = "mp-135", "mp-157", "mp-96", "mp-1153", "mp-557142"
NEW, OLD = ForceFieldSettings(), ForceFieldSettings(chgnet_version="0.2.0")


class Counting:
    """The real single-point path, counting the structures it is asked to evaluate."""

    def __init__(self, settings):
        self.fn = calculator_recompute(get_calculator(settings))
        self.n = 0

    def __call__(self, structures):
        self.n += len(structures)
        return self.fn(structures)


@pytest.fixture(scope="module")
def old_entries(lips_structures):
    """References and an earlier candidate carrying CHGNet 0.2.0 energies."""
    tag = model_tag(OLD)
    ids = [LI, BLACK_P, ALPHA_S, LI2S]
    res = single_points([lips_structures[i] for i in ids], get_calculator(OLD))
    e = {i: r["energy"] / len(lips_structures[i]) for i, r in zip(ids, res)}
    refs = [
        ReferenceEntry(entry_id=i, structure=lips_structures[i], energy_per_atom=e[i], model=tag, source="test")
        for i in (LI, BLACK_P, ALPHA_S)
    ]
    prev = Candidate(
        provenance=Provenance(candidate_id="it1-0", iteration=1, generator="seed"),
        structure=lips_structures[LI2S], status="relaxed", energy_per_atom=e[LI2S], model=tag,
    )
    return refs, [prev]


def _current(lips_structures, tag):
    s = lips_structures[LI2S_HEX]
    return [Candidate(
        provenance=Provenance(candidate_id="it2-0", iteration=2, generator="seed"),
        structure=s, status="relaxed", energy_per_atom=-4.0, model=tag,
    )]


def test_second_scoring_reuses_energies(tmp_path, lips_structures, old_entries):
    refs, prev = old_entries
    cache = energy_cache_for(build_job_store(StoreSettings(), tmp_path))  # the run's MontyDB store
    assert cache is not None
    new_tag = model_tag(NEW)
    compute = Counting(NEW)
    cands = _current(lips_structures, new_tag)
    first = score_candidates(cands, refs, [prev], model=new_tag, recompute=compute, energy_cache=cache)
    assert compute.n == 4 and first.recomputed == {"references": 3, "previous": 1}
    assert cache.count(new_tag) == 4

    # another job (a later stage, a resumed job, the report) opens the same store
    cache2 = energy_cache_for(build_job_store(StoreSettings(), tmp_path))
    second = score_candidates(cands, refs, [prev], model=new_tag, recompute=compute, energy_cache=cache2)
    assert compute.n == 4  # zero new single points
    assert second.reused == {"references": 3, "previous": 1} and not second.recomputed
    assert second.candidates[0].e_hull == pytest.approx(first.candidates[0].e_hull, abs=1e-9)

    # without a calculator at all, the cached energies are enough
    third = score_candidates(cands, refs, [prev], model=new_tag, energy_cache=cache2)
    assert third.candidates[0].e_hull == pytest.approx(first.candidates[0].e_hull, abs=1e-9)

    # a new model tag is computed exactly once, then reused
    r2 = ForceFieldSettings(chgnet_version="r2scan")
    r2_tag, compute_r2 = model_tag(r2), Counting(r2)
    cands_r2 = _current(lips_structures, r2_tag)
    for _ in range(2):
        score_candidates(cands_r2, refs, [prev], model=r2_tag, recompute=compute_r2, energy_cache=cache2)
    assert compute_r2.n == 4
    assert cache2.count() == 8 and cache2.count(r2_tag) == 4
    # the cached energy is the model's single point, not a copy of another model's
    direct = compute_r2.fn([lips_structures[LI]])[0]
    assert cache2.get([LI], r2_tag)[LI] == pytest.approx(direct, abs=1e-6)
    assert abs(cache2.get([LI], r2_tag)[LI] - cache2.get([LI], new_tag)[LI]) > 1e-3


def test_changed_structure_is_a_miss(lips_structures):
    cache = EnergyCache()
    s = lips_structures[LI2S]
    cache.put(["x"], [s], [-4.2], "m")
    assert cache.get(["x"], "m", [s]) == {"x": -4.2}
    moved = s.copy()
    moved.translate_sites([0], [0.01, 0, 0])
    assert cache.get(["x"], "m", [moved]) == {}
    with pytest.raises(ValueError, match="no energy under 'm'"):
        energies_with_model(["x"], [moved], "m", None, cache)
    calls = []
    energies, n = energies_with_model(["x", "y"], [moved, s], "m", lambda ss: calls.append(len(ss)) or [-1.0] * len(ss), cache, batch_size=1)
    assert n == 2 and calls == [1, 1] and energies == [-1.0, -1.0]


def test_score_job_writes_to_the_run_store(tmp_path, lips_structures, old_entries):
    """A Score job (expose_store, as the loop sets it) fills the run's cache; a rerun reuses it."""
    from jobflow import run_locally

    from cscflow.score import ScoreMaker

    refs, prev = old_entries
    store = build_job_store(StoreSettings(), tmp_path)
    cands = _current(lips_structures, model_tag(NEW))
    outs = []
    for _ in range(2):
        job = ScoreMaker().make(cands, refs, [prev])
        job.config.expose_store = True
        responses = run_locally(job, store=store, ensure_success=True, log=False)
        outs.append(responses[job.uuid][1].output)
    assert outs[0].recomputed == {"references": 3, "previous": 1}
    assert outs[1].reused == {"references": 3, "previous": 1} and not outs[1].recomputed
    assert energy_cache_for(store).count(model_tag(NEW)) == 4
