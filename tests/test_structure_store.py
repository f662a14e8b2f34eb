"""One document per structure (cscflow.structure_store): stored by the running job, read back
by key, in order; inline only without a run store."""

from __future__ import annotations

import pytest
from jobflow import Flow, job, run_locally
from pymatgen.core import Lattice, Structure

from cscflow.config import StoreSettings
from cscflow.schemas import Candidate, Frame, Provenance
from cscflow.stores import build_job_store
from cscflow.structure_store import (
    CANDIDATES,
    FRAMES,
    CandidateSet,
    FrameSet,
    collection_for,
    load_candidates,
    load_frames,
    merge_sets,
    save_candidates,
    save_frames,
    shards,
)


def _cand(i: int, a: float = 4.0) -> Candidate:
    s = Structure(Lattice.cubic(a + 0.01 * i), ["Li", "S"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return Candidate(provenance=Provenance(candidate_id=f"c{i}", iteration=1, generator="test"), structure=s,
                     status="relaxed", energy_per_atom=-3.0 - i, model="m")


def _frame(c: Candidate, k: int) -> Frame:
    n = len(c.structure)
    return Frame(frame_id=f"{c.id}-s{k}", structure=c.structure, energy=-4.0 * n, forces=[[0.0, 0.0, 0.1 * k]] * n,
                 kind="static", labeller="test", provenance=c.provenance)


@job
def _write(n: int):
    cands = [_cand(i) for i in range(n)]
    return {"candidates": save_candidates(cands, "relax"), "frames": save_frames([_frame(cands[0], k) for k in range(3)])}


@job
def _read(sets):
    return [c.id for c in load_candidates(sets)]


def _exposed(j, stage="relax"):
    j.config.expose_store = True
    j.metadata.update({"run_id": "run1", "iteration": 1, "stage": stage})
    return j


def test_documents_are_stored_one_per_structure_and_read_back_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = build_job_store(StoreSettings(), tmp_path)
    first, second = _exposed(_write(4)), _exposed(_write(2))
    reader = _exposed(_read([second.output["candidates"], first.output["candidates"]]), "score")
    responses = run_locally(Flow([first, second, reader]), store=store, ensure_success=True, log=False)
    out = responses[first.uuid][1].output
    assert isinstance(out["candidates"], CandidateSet) and out["candidates"].items is None
    assert out["candidates"].ids == ["c0", "c1", "c2", "c3"]
    # a later job reads both sets, in the order given, from the store
    assert responses[reader.uuid][1].output == ["c0", "c1", "c0", "c1", "c2", "c3"]

    collection = collection_for(store, CANDIDATES)
    collection.connect()
    docs = list(collection.query({"run_id": "run1", "formula": "LiS"}))
    collection.close()
    assert len(docs) == 6 and {d["stage"] for d in docs} == {"relax"}
    assert {d["job_uuid"] for d in docs} == {first.uuid, second.uuid}
    frames = load_frames(out["frames"], store)
    assert [f.frame_id for f in frames] == ["c0-s0", "c0-s1", "c0-s2"]
    assert frames[2].forces[0][2] == pytest.approx(0.2)
    assert collection_for(store, FRAMES) is not None

    # a set that names documents the store does not hold is one clear error
    ghost = CandidateSet(keys=[f"{first.uuid}/nope"], ids=["nope"])
    with pytest.raises(LookupError, match="missing"):
        load_candidates(ghost, store)


def test_rerun_overwrites_its_own_documents(tmp_path, monkeypatch):
    """A stage that runs again (resume, rerun Firework) replaces its documents, never duplicates."""
    monkeypatch.chdir(tmp_path)
    store = build_job_store(StoreSettings(), tmp_path)
    j, again = _exposed(_write(3)), _exposed(_write(3))
    again.set_uuid(j.uuid)  # the same job run a second time
    run_locally(j, store=store, ensure_success=True, log=False)
    run_locally(again, store=store, ensure_success=True, log=False)
    collection = collection_for(store, CANDIDATES)
    collection.connect()
    assert collection.count({"job_uuid": j.uuid}) == 3
    collection.close()


def test_without_a_run_store_sets_are_inline():
    cands = [_cand(i) for i in range(3)]
    inline = save_candidates(cands)  # no running job: nothing to write to
    assert inline.items is not None and inline.keys == []
    assert [c.id for c in inline] == ["c0", "c1", "c2"] and len(inline) == 3
    merged = merge_sets([inline, [cands[0]]])
    assert merged.ids == ["c0", "c1", "c2", "c0"]
    assert [len(s) for s in shards(inline, 2)] == [2, 1]
    frames = FrameSet(ids=["x"], items=[_frame(cands[0], 0)])
    assert load_frames([frames, [_frame(cands[1], 1)]])[1].frame_id == "c1-s1"
    with pytest.raises(ValueError, match="stored and inline"):
        merge_sets([inline, CandidateSet(keys=["u/c9"], ids=["c9"])])
