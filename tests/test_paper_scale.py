"""A paper-size iteration's stage data (10^4 candidates, 600 selected) through the real
Score and Select jobs, stored in the run's embedded store: no stored document may exceed
MongoDB's 16 MB limit (stand-in energies; the bookkeeping is what is under test).

Stage inputs built here are not stored (run_locally keeps outputs only); in the loop they
arrive as the previous stage's set of keys."""

from __future__ import annotations

import json
import warnings

import bson
import numpy as np
import pytest

from cscflow.config import ForceFieldSettings, ScoreSettings, SelectionSettings, StoreSettings
from cscflow.forcefields import model_tag
from cscflow.schemas import Candidate, Frame, Provenance, ReferenceEntry
from cscflow.score import ScoreMaker
from cscflow.select import SelectMaker
from cscflow.stores import build_job_store
from cscflow.structure_store import CANDIDATES, FRAMES, collection_for

N = 10_000
LIMIT = 16 * 1024 * 1024
# the stand-in energies carry the tag of Score's force field, so nothing is recomputed
MODEL = model_tag(ForceFieldSettings())
MU = {"Li": -1.90892, "P": -5.41330, "S": -4.13645}  # MP elemental references, eV/atom


def _energy(structure, rng):
    comp = structure.composition.fractional_composition
    x = {el.symbol: comp[el] for el in comp.elements}
    return sum(MU[e] * f for e, f in x.items()) - 0.6 * (1 - max(x.values())) + float(rng.normal(0, 0.03))


@pytest.mark.slow
def test_paper_size_iteration_documents_fit(tmp_path, lips_structures, monkeypatch):
    from jobflow import Flow, run_locally

    monkeypatch.chdir(tmp_path)

    rng = np.random.default_rng(0)
    pool = [(i, s) for i, s in sorted(lips_structures.items()) if len(s) <= 40]
    refs = [ReferenceEntry(entry_id=i, structure=s, energy_per_atom=_energy(s, rng), model=MODEL,
                           source="materials_project") for i, s in pool]
    cands = []
    for k in range(N):
        mp_id, s = pool[int(rng.integers(len(pool)))]
        t = s.copy()
        t.perturb(float(rng.uniform(0.02, 0.4)), seed=int(rng.integers(2**31)))
        e = _energy(t, rng)
        cands.append(Candidate(
            provenance=Provenance(candidate_id=f"it1-{k:05d}", iteration=1, generator="stand-in", parent=mp_id),
            structure=t, status="relaxed", energy_per_atom=e, energy=e * len(t), model=MODEL))
    frames = [Frame(frame_id=f"f{i}", structure=s, energy=-4.0 * len(s), forces=[[0.0] * 3] * len(s), kind="static",
                    labeller="stand-in", provenance=Provenance(candidate_id=i, iteration=0, generator="seed"))
              for i, s in pool]
    # paper quotas (100/200/300), every scored candidate eligible so that 600 are selected
    score = ScoreMaker(settings=ScoreSettings()).make(cands, refs)
    select = SelectMaker(settings=SelectionSettings(only_sun=False)).make(score.output.candidates, frames, seed=1)
    for stage, job_ in (("score", score), ("select", select)):  # as the loop tags its stages
        job_.config.expose_store = True
        job_.metadata.update({"run_id": "paper", "iteration": 1, "stage": stage})
    store = build_job_store(StoreSettings(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        responses = run_locally(Flow([score, select]), store=store, ensure_success=True, log=False)
    assert len(responses[select.uuid][1].output.selected) == 600

    sizes = {}
    store.connect()
    parts = [("docs", store.docs_store), *store.additional_stores.items()]
    parts += [(name, collection_for(store, name)) for name in (CANDIDATES, FRAMES)]
    for name, s in parts:
        s.connect()
        for doc in s.query({}):
            doc.pop("_id", None)
            key = doc.get("key") or doc.get("uuid") or doc.get("blob_uuid")
            sizes[f"{name}:{key}"] = len(bson.encode(json.loads(json.dumps(doc, default=str))))
    big = {k: round(v / 2**20, 1) for k, v in sizes.items() if v > LIMIT}
    assert not big, f"documents over 16 MB (MB): {big}"
    # one document per candidate: 10^4 scored + 600 selected, each far below the limit
    assert sum(k.startswith("candidates:") for k in sizes) == N + 600
    largest_output = max(v for k, v in sizes.items() if k.startswith("docs:"))
    assert largest_output < 2 * 2**20, f"a stage output of {largest_output / 2**20:.1f} MB: ids, not structures"
