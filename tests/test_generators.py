"""pyxtal generator and GenerateMaker: validity, reproducibility, provenance."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from cscflow.config import ChemicalSystem, GeneratorSettings
from cscflow.generators import GenerateMaker, generate_candidates, get_generator
from cscflow.generators.pyxtal_random import compatible_space_groups, sample_composition

LIPS = ChemicalSystem(elements=["Li", "P", "S"], min_atoms=2, max_atoms=12)


@pytest.fixture(scope="module")
def generated():
    settings = GeneratorSettings(num_per_condition=8, conditions=[0.0, 0.03])
    cands, failures = generate_candidates(LIPS, settings, iteration=1, seed=11)
    return settings, cands, failures


def test_valid_structures_inside_system(generated):
    settings, cands, _ = generated
    assert len(cands) == 16
    for c in cands:
        s = c.structure
        assert set(map(str, s.composition.elements)) <= {"Li", "P", "S"}
        assert LIPS.min_atoms <= len(s) <= LIPS.max_atoms
        d = s.distance_matrix + np.diag([np.inf] * len(s))
        assert d.min() > 0.5
        assert 3 < s.volume / len(s) < 80
        assert c.status == "generated"
        sg = SpacegroupAnalyzer(s, symprec=0.01).get_space_group_number()
        assert settings.min_space_group <= sg <= 230


def test_provenance_and_unique_ids(generated):
    _, cands, _ = generated
    ids = [c.id for c in cands]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "it1-pyxtal-e0.00-00000"
    assert ids[8] == "it1-pyxtal-e0.03-00008"
    for i, c in enumerate(cands):
        p = c.provenance
        assert (p.iteration, p.generator, p.sample_index) == (1, "pyxtal", i)
        assert p.condition == {"e_hull": 0.0 if i < 8 else 0.03}
        assert isinstance(p.seed, int)


def test_reproducible_for_seed(generated):
    settings, cands, _ = generated
    again, _ = generate_candidates(LIPS, settings, iteration=1, seed=11)
    assert [c.structure for c in again] == [c.structure for c in cands]
    other, _ = generate_candidates(LIPS, settings, iteration=1, seed=12)
    assert [c.structure for c in other] != [c.structure for c in cands]
    # the per-structure seed alone rebuilds the structure
    gen = get_generator(settings)
    rebuilt, reason, _ = gen.draw(LIPS, cands[3].provenance.seed)
    assert reason is None and rebuilt == cands[3].structure


def test_composition_sampling_favours_ternaries():
    rng = np.random.default_rng(0)
    arity = Counter()
    for _ in range(3000):
        species, counts = sample_composition(["Li", "P", "S"], 2, 16, rng)
        assert sorted(species) == species and len(species) == len(counts)
        assert all(n >= 1 for n in counts) and 2 <= sum(counts) <= 16
        arity[len(species)] += 1
    assert arity[3] / 3000 == pytest.approx(0.5, abs=0.04)
    assert arity[1] / 3000 == pytest.approx(1 / 6, abs=0.03)


def test_space_group_range_respected():
    settings = GeneratorSettings(num_per_condition=4, conditions=[0.0], min_space_group=195,
                                 max_space_group=230)
    cands, failures = generate_candidates(LIPS, settings, iteration=2, seed=0)
    assert cands, failures
    for c in cands:
        assert SpacegroupAnalyzer(c.structure, symprec=0.01).get_space_group_number() >= 195
    # Li3PS4 in one cubic P23 cell: Li 3c, P 1a, S 3d + 1b; Im-3m / Ia-3d need even counts
    assert 195 in compatible_space_groups((3, 1, 4), 195, 230)
    assert compatible_space_groups((3, 1, 4), 229, 230) == ()


def test_failures_counted_not_raised():
    """7 atoms in Im-3m / Ia-3d (only even multiplicities): every draw fails, nothing raises."""
    system = ChemicalSystem(elements=["Li"], min_atoms=7, max_atoms=7)
    settings = GeneratorSettings(num_per_condition=2, conditions=[0.0], min_space_group=229,
                                 max_space_group=230, max_attempts_per_structure=3)
    cands, failures = generate_candidates(system, settings, iteration=1, seed=0)
    assert cands == []
    assert failures["no_compatible_space_group"] == 6
    assert failures["max_attempts_exceeded"] == 2


def test_generate_maker_run_locally():
    from jobflow import run_locally

    settings = GeneratorSettings(num_per_condition=3, conditions=[0.0, 0.06])
    job = GenerateMaker(chemical_system=LIPS, settings=settings).make(iteration=1, seed=5)
    out = run_locally(job, ensure_success=True, log=False)[job.uuid][1].output
    assert out.n_requested == 6 and out.n_failed == 0 and len(out.candidates) == 6
    assert out.candidates[-1].id == "it1-pyxtal-e0.06-00005"
    direct, _ = generate_candidates(LIPS, settings, iteration=1, seed=5)
    assert [c.structure for c in direct] == [c.structure for c in out.candidates]


def test_generation_fans_out_per_condition_and_batch():
    """One job per (condition, batch of per_job) and a collect: every structure once, global ids;
    one job per condition (per_job unset) gives exactly what one Generate job gives."""
    from jobflow import JobStore, run_locally
    from maggma.stores import MemoryStore

    from cscflow.generators import GenerateFanOutMaker, GenerateOutput, generation_batches

    def _plain(out):
        return out.model_dump() if hasattr(out, "model_dump") else {k: v for k, v in out.items() if not k.startswith("@")}

    settings = GeneratorSettings(num_per_condition=3, conditions=[0.0, 0.06], per_job=2)
    assert generation_batches(settings) == [(0, 0, 2), (0, 2, 1), (1, 0, 2), (1, 2, 1)]
    fan = GenerateFanOutMaker(generate_maker=GenerateMaker(chemical_system=LIPS, settings=settings))
    job = fan.make(iteration=1, seed=5)
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    responses = run_locally(job, store=store, ensure_success=True, log=False)
    batch_jobs = [r[1] for u, r in responses.items() if u != job.uuid and getattr(r[1].output, "n_requested", 0) < 6]
    assert len(batch_jobs) == 4
    out = GenerateOutput.model_validate(_plain(store.get_output(job.uuid, which="last", load=True)))
    ids = [c.id for c in out.candidates]
    assert out.n_requested == 6 and out.n_generated == 6 == len(set(ids))
    assert sorted(ids) == [f"it1-pyxtal-e{e}-{i:05d}" for e, i in
                           [("0.00", 0), ("0.00", 1), ("0.00", 2), ("0.06", 3), ("0.06", 4), ("0.06", 5)]]

    whole = GeneratorSettings(num_per_condition=3, conditions=[0.0, 0.06])
    job = GenerateFanOutMaker(generate_maker=GenerateMaker(chemical_system=LIPS, settings=whole)).make(iteration=1, seed=5)
    run_locally(job, store=store, ensure_success=True, log=False)
    out = GenerateOutput.model_validate(_plain(store.get_output(job.uuid, which="last", load=True)))
    direct, _ = generate_candidates(LIPS, whole, iteration=1, seed=5)
    assert [c.structure for c in direct] == [c.structure for c in out.candidates]
