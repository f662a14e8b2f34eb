"""Batch relaxation: CHGNet on real MP structures, reject gates, and the RelaxMaker job."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.lj import LennardJones
from pymatgen.core import Lattice, Structure

from cscflow.config import ForceFieldSettings, RelaxSettings
from cscflow.forcefields import get_calculator, single_points
from cscflow.relax import (
    RelaxMaker,
    RelaxOutput,
    RelaxShardMaker,
    check_structure,
    min_interatomic_distance,
    relax_candidates,
    shard_candidates,
)
from cscflow.schemas import Candidate, Provenance

MODEL = "chgnet-0.3.0"


@pytest.fixture(scope="module")
def chgnet():
    return get_calculator(ForceFieldSettings())


def _candidate(structure: Structure, cid: str) -> Candidate:
    prov = Provenance(candidate_id=cid, iteration=1, generator="pyxtal",
                      condition={"e_hull": 0.03}, sample_index=7, seed=42)
    return Candidate(provenance=prov, structure=structure)


@pytest.fixture(scope="module")
def rattled_li2s(lips_structures) -> Structure:
    """Li2S (mp-1153) 2x1x1 supercell, rattled by 0.1 Å and strained by 3 %."""
    rng = np.random.default_rng(7)
    s = lips_structures["mp-1153"].copy()
    s.make_supercell([2, 1, 1])
    s.apply_strain(0.03)
    coords = s.cart_coords + rng.normal(0.0, 0.1, (len(s), 3))
    return Structure(s.lattice, s.species, coords, coords_are_cartesian=True)


def _overlapping() -> Structure:
    return Structure(Lattice.cubic(5.0), ["Li", "S", "Li"],
                     [[0, 0, 0], [0.05, 0, 0], [0.5, 0.5, 0.5]])


def _exploded() -> Structure:
    return Structure(Lattice.cubic(12.0), ["Li", "S"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_gates_on_plain_structures(lips_structures):
    settings = RelaxSettings()
    li2s = lips_structures["mp-1153"]
    assert check_structure(li2s, settings) is None
    assert min_interatomic_distance(li2s) == pytest.approx(2.455, abs=0.02)  # Li-S in antifluorite
    assert min_interatomic_distance(_overlapping()) == pytest.approx(0.25, abs=1e-6)
    assert check_structure(_overlapping(), settings) == "overlap"
    assert check_structure(_exploded(), settings) == "exploded"  # 864 Å^3/atom
    # an atom too close to its own periodic image is an overlap too
    tiny = Structure(Lattice.tetragonal(0.5, 20.0), ["Li"], [[0, 0, 0]])
    assert check_structure(tiny, RelaxSettings(max_volume_per_atom=1000)) == "overlap"


def test_chgnet_relax_converges_and_lowers_energy(chgnet, rattled_li2s):
    cand = _candidate(rattled_li2s, "c-0")
    e0 = single_points([rattled_li2s], chgnet)[0]["energy"]
    settings = RelaxSettings(fmax=0.05, steps=300)
    (out,) = relax_candidates([cand], chgnet, settings, MODEL, progress=False)

    assert out.status == "relaxed" and out.reject_reason is None
    assert out.converged is True
    assert 0 < out.relax_steps <= 300
    assert out.energy < e0 - 0.01  # the rattle cost energy; relaxation gives it back
    assert out.energy_per_atom == pytest.approx(out.energy / len(rattled_li2s))
    assert out.max_force <= settings.fmax + 1e-6
    assert np.abs(np.array(out.stress)).max() < 1.0  # GPa: the cell relaxed too
    assert out.model == MODEL
    assert out.provenance == cand.provenance  # copied untouched
    assert out.structure is not cand.structure
    assert cand.status == "generated" and cand.energy is None  # input not modified
    # the relaxed energy is the calculator's energy of the stored structure
    assert single_points([out.structure], chgnet)[0]["energy"] == pytest.approx(out.energy, abs=1e-3)
    # the 3 % strain was undone: volume back near the relaxed Li2S cell
    ref = single_points([out.structure], chgnet)[0]
    assert abs(np.trace(ref["stress"])) / 3 < 0.5


def test_bad_structures_are_rejected_not_raised(chgnet, lips_structures):
    good = lips_structures["mp-1153"]
    og = Structure(Lattice.cubic(4.0), ["Og", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    already = _candidate(good, "c-done").model_copy(update={"status": "rejected",
                                                            "reject_reason": "overlap"})
    cands = [_candidate(_overlapping(), "c-overlap"), _candidate(good, "c-good"),
             _candidate(_exploded(), "c-exploded"), _candidate(og, "c-og"), already]
    out = relax_candidates(cands, chgnet, RelaxSettings(steps=50), MODEL, progress=False)

    assert [c.id for c in out] == [c.id for c in cands]  # order kept, nothing dropped
    status = {c.id: (c.status, c.reject_reason) for c in out}
    assert status["c-overlap"] == ("rejected", "overlap")
    assert status["c-exploded"] == ("rejected", "exploded")
    assert status["c-good"] == ("relaxed", None)
    assert status["c-og"][0] == "rejected"
    assert status["c-og"][1].startswith("calculator_error: ")
    assert out[4] is already  # an upstream rejection passes through
    for c, orig in zip(out, cands):
        assert c.provenance == orig.provenance
        if c.status == "rejected" and c is not already:
            assert c.structure == orig.structure and c.energy is None and c.model == MODEL


def test_energy_and_nan_gates(chgnet, lips_structures):
    li2s = lips_structures["mp-1153"]
    # CHGNet Li2S is ~ -4.1 eV/atom: a 1 eV/atom bound rejects it
    (out,) = relax_candidates([_candidate(li2s, "c-e")], chgnet,
                              RelaxSettings(max_abs_energy_per_atom=1.0), MODEL, progress=False)
    assert (out.status, out.reject_reason) == ("rejected", "energy_out_of_range")
    # a real calculator that yields NaN energies (Lennard-Jones with a NaN well depth)
    nan_lj = LennardJones(sigma=2.0, epsilon=float("nan"), rc=5.0)
    (out,) = relax_candidates([_candidate(li2s, "c-nan")], nan_lj, RelaxSettings(), "lj",
                              progress=False)
    assert (out.status, out.reject_reason) == ("rejected", "nan_energy")


def test_cell_expanding_during_relaxation_is_stopped(lips_structures):
    """A potential whose minimum lies far out blows the cell up; the step guard stops it."""
    li2s = lips_structures["mp-1153"]  # 15.2 Å^3/atom, Li-S 2.46 Å
    # LJ minimum at 2^(1/6) sigma = 3.6 Å: the cell wants ~47 Å^3/atom
    repulsive = LennardJones(sigma=3.2, epsilon=0.01, rc=8.0)
    settings = RelaxSettings(max_volume_per_atom=25.0, steps=300)
    (out,) = relax_candidates([_candidate(li2s, "c-boom")], repulsive, settings, "lj",
                              progress=False)
    assert (out.status, out.reject_reason) == ("rejected", "exploded")
    assert out.relax_steps is not None and out.relax_steps < 300  # stopped early


@pytest.mark.parametrize("optimizer,cell_filter", [("BFGS", "exp"), ("LBFGS", "none")])
def test_optimizer_and_filter_choices(chgnet, rattled_li2s, optimizer, cell_filter):
    settings = RelaxSettings(optimizer=optimizer, cell_filter=cell_filter, steps=8, fmax=1e-4)
    (out,) = relax_candidates([_candidate(rattled_li2s, "c-opt")], chgnet, settings, MODEL,
                              progress=False)
    assert out.status == "relaxed"
    assert out.relax_steps == 8 and out.converged is False  # step limit honoured
    if cell_filter == "none":  # positions only: the cell is untouched
        np.testing.assert_allclose(out.structure.lattice.matrix, rattled_li2s.lattice.matrix)
    else:
        assert not np.allclose(out.structure.lattice.matrix, rattled_li2s.lattice.matrix)


def test_relax_maker_run_locally(lips_structures, tmp_path, monkeypatch):
    from jobflow import run_locally

    from cscflow.config import StoreSettings
    from cscflow.stores import build_job_store
    from cscflow.structure_store import CANDIDATES, collection_for, load_candidates

    monkeypatch.chdir(tmp_path)
    cands = [_candidate(lips_structures["mp-1153"], "m-0"), _candidate(_overlapping(), "m-1")]
    maker = RelaxMaker(settings=RelaxSettings(steps=50), progress=False)
    job = maker.make(cands)
    job.config.expose_store = True  # as the loop's stages: candidates go to the run's collection
    job.metadata.update({"run_id": "r1", "stage": "relax"})
    assert job.name == "relax"
    store = build_job_store(StoreSettings(), tmp_path)
    responses = run_locally(job, store=store, ensure_success=True)
    output = responses[job.uuid][1].output
    assert isinstance(output, RelaxOutput)
    assert (output.n_relaxed, output.n_rejected) == (1, 1)
    assert output.rejection_reasons == {"overlap": 1}
    assert output.model == MODEL and output.seconds > 0
    # the output holds keys, not structures; one document per candidate in the collection
    assert output.candidates.items is None and output.candidates.ids == ["m-0", "m-1"]
    assert output.candidates.keys == [f"{job.uuid}/m-0", f"{job.uuid}/m-1"]
    collection = collection_for(store, CANDIDATES)
    collection.connect()
    docs = {d["id"]: d for d in collection.query({"run_id": "r1"})}
    collection.close()
    assert sorted(docs) == ["m-0", "m-1"]
    assert docs["m-0"]["status"] == "relaxed" and docs["m-1"]["status"] == "rejected"
    assert docs["m-0"]["stage"] == "relax" and docs["m-0"]["formula"] == "Li2S"
    # what a downstream job reads back
    with store as s:
        stored = s.get_output(job.uuid, load=True)
    back = load_candidates(stored["candidates"], store)
    relaxed = back[0]
    assert isinstance(relaxed, Candidate) and isinstance(relaxed.structure, Structure)
    assert relaxed.status == "relaxed" and -5.0 < relaxed.energy_per_atom < -3.5
    assert relaxed.provenance == cands[0].provenance
    assert back[1].reject_reason == "overlap"


def test_shard_candidates():
    items = list(range(7))
    assert shard_candidates(items, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert shard_candidates(items, 7) == [items] and shard_candidates([], 4) == []
    with pytest.raises(ValueError, match="shard_size"):
        shard_candidates(items, 0)
    # a stored set is cut into sets of keys: nothing is read from the store
    from cscflow.structure_store import CandidateSet

    stored = CandidateSet(keys=[f"u/{i}" for i in range(5)], ids=[str(i) for i in range(5)])
    shards = shard_candidates(stored, 2)
    assert [s.ids for s in shards] == [["0", "1"], ["2", "3"], ["4"]]
    assert all(isinstance(s, CandidateSet) and s.items is None for s in shards)


def test_relaxing_in_shards_gives_the_same_candidates(lips_structures, rattled_li2s, tmp_path,
                                                      monkeypatch):
    """3 shard jobs + a collect (shard_size 2) give what one relax job gives, in order."""
    from jobflow import Flow, JobStore, run_locally
    from maggma.stores import MemoryStore

    monkeypatch.chdir(tmp_path)
    structures = [rattled_li2s, lips_structures["mp-1153"], _overlapping(),
                  lips_structures["mp-736"], _exploded()]
    cands = [_candidate(s, f"s-{i}") for i, s in enumerate(structures)]
    settings = RelaxSettings(steps=10, shard_size=2)
    one = RelaxMaker(settings=settings, progress=False).make(cands)
    sharded = RelaxShardMaker(relax_maker=RelaxMaker(settings=settings, progress=False)).make(cands)
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    responses = run_locally(Flow([one, sharded]), store=store, ensure_success=True)
    with store as s:
        a = RelaxOutput.model_validate(s.get_output(one.uuid, load=True))
        b = RelaxOutput.model_validate(s.get_output(sharded.uuid, load=True))
    shard_jobs = [r[1].output for r in responses.values()
                  if isinstance(r[1].output, RelaxOutput) and len(r[1].output.candidates) <= 2]
    assert len(shard_jobs) == 3  # 2 + 2 + 1
    assert [c.id for c in b.candidates] == [c.id for c in cands]
    assert (b.n_relaxed, b.n_rejected, b.rejection_reasons) == (a.n_relaxed, a.n_rejected,
                                                                a.rejection_reasons)
    assert (a.n_relaxed, a.rejection_reasons) == (3, {"overlap": 1, "exploded": 1})
    assert b.model == a.model == MODEL
    for x, y in zip(a.candidates, b.candidates):
        assert (x.status, x.reject_reason, x.relax_steps) == (y.status, y.reject_reason, y.relax_steps)
        assert x.provenance == y.provenance
        if x.status == "relaxed":
            assert y.energy == pytest.approx(x.energy, abs=1e-6)
            np.testing.assert_allclose(y.structure.cart_coords, x.structure.cart_coords, atol=1e-6)
