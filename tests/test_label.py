"""Teacher labeller (a pretrained force field standing in for DFT) and the LabelMaker dispatch.

The teacher runs the paper's protocol (Methods 4.2) through cscflow.label.protocol, the same
code as CP2K: these tests check the frame kinds and counts it produces.
"""

from __future__ import annotations

import numpy as np
import pytest

from cscflow.config import CP2KSettings, ForceFieldSettings, LabelSettings
from cscflow.label import LABELLERS, LabelMaker, LabelOutput, get_labeller, label_candidates
from cscflow.label.protocol import perturbed_copy, protocol_seeds
from cscflow.schemas import Candidate, Provenance

# Short relaxations keep the default suite quick; the protocol is the paper's otherwise.
FAST = CP2KSettings(relax_steps=15, relax_fmax=0.1)


def _candidates(structures: dict, ids: list[str]) -> list[Candidate]:
    return [
        Candidate(
            provenance=Provenance(candidate_id=f"it0-seed-{i:04d}-{mp}", iteration=0,
                                  generator="seed", parent=mp, sample_index=i),
            structure=structures[mp],
            status="relaxed",
        )
        for i, mp in enumerate(ids)
    ]


@pytest.fixture(scope="module")
def labelled(lips_structures):
    cands = _candidates(lips_structures, ["mp-1153", "mp-157"])  # Li2S, black P
    settings = LabelSettings(cp2k=FAST)  # paper defaults: 3 relaxed copies, 1-5 steps, 5 statics
    return cands, settings, label_candidates(cands, 0, 42, settings)


def test_teacher_runs_the_protocol_frame_kinds_and_counts(labelled):
    cands, settings, out = labelled
    assert isinstance(out, LabelOutput)
    assert out.failures == []
    assert out.labeller == "teacher:chgnet-0.3.0 (stand-in for DFT)"
    for cand in cands:
        mine = [f for f in out.frames if f.provenance == cand.provenance]
        assert {f.kind for f in mine} == {"relax_step", "static"}
        assert sum(f.kind == "static" for f in mine) == 5
        seeds = protocol_seeds(cand.id, 0, 42, settings)
        for j, seed in enumerate(seeds["relax"]):
            steps = sorted((f for f in mine if f"-relax{j}-" in f.frame_id), key=lambda f: f.frame_id)
            assert 1 <= len(steps) <= 5 and steps[0].frame_id.endswith("-s000")
            assert all(f.label_seed == seed for f in steps)
            # first kept step = the perturbed copy (lattice strained 3-5 %), rebuilt from its seed
            rebuilt, _ = perturbed_copy(cand.structure, seed, settings)
            np.testing.assert_allclose(steps[0].structure.cart_coords, rebuilt.cart_coords, atol=1e-6)
            strain = np.abs(np.array(steps[0].structure.lattice.abc) / cand.structure.lattice.abc - 1)
            assert ((strain > 0.029) & (strain < 0.051)).all()
            if len(steps) > 1:  # the last kept step is the relaxation's end: lower energy
                assert steps[-1].energy < steps[0].energy
        # statics: perturbations of the lowest-energy relaxed copy (its last step)
        lasts = [max((f for f in mine if f"-relax{j}-" in f.frame_id), key=lambda f: f.frame_id)
                 for j in range(3)]
        statics = [f for f in mine if f.kind == "static"]
        assert [f.label_seed for f in statics] == seeds["static"]
        for f in statics:
            assert any(np.allclose(perturbed_copy(last.structure, f.label_seed, settings)[0].cart_coords,
                                   f.structure.cart_coords, atol=1e-6) for last in lasts)
    for f in out.frames:
        n = len(f.structure)
        assert np.asarray(f.forces).shape == (n, 3) and np.asarray(f.stress).shape == (3, 3)
        assert np.isfinite(f.energy) and -10 < f.energy_per_atom < 0
    assert len({f.frame_id for f in out.frames}) == len(out.frames)


def test_teacher_energy_is_the_force_field_single_point(labelled):
    from cscflow.forcefields import get_calculator, single_points

    cands, settings, out = labelled
    static = next(f for f in out.frames if f.kind == "static")
    direct = single_points([static.structure], get_calculator(ForceFieldSettings()))[0]
    assert static.energy == pytest.approx(direct["energy"], abs=2e-4 * len(static.structure))
    np.testing.assert_allclose(static.forces, direct["forces"], atol=2e-3)
    assert np.abs(static.forces).max() > 0.1  # a perturbed copy feels forces


def test_teacher_engine_is_configurable(lips_structures):
    cands = _candidates(lips_structures, ["mp-1153"])
    settings = LabelSettings(teacher=ForceFieldSettings(chgnet_version="0.2.0"), copies_per_structure=1,
                             statics_per_structure=1, cp2k=FAST)
    out = label_candidates(cands, 0, 42, settings)
    assert out.failures == [] and out.labeller == "teacher:chgnet-0.2.0 (stand-in for DFT)"
    default = label_candidates(cands, 0, 42, settings.model_copy(update={"teacher": ForceFieldSettings()}))
    assert out.frames[0].energy != pytest.approx(default.frames[0].energy, abs=1e-3)
    # older specs name only the CHGNet version
    assert LabelSettings(teacher_chgnet_version="0.2.0").teacher.chgnet_version == "0.2.0"


def test_failures_are_recorded_not_raised(lips_structures):
    good = _candidates(lips_structures, ["mp-1153"])[0]
    disordered = good.structure.copy()
    disordered.replace(0, {"Li": 0.5, "S": 0.5})  # cannot be perturbed: a real bad input
    bad = good.model_copy(update={"structure": disordered, "provenance": good.provenance.model_copy(
        update={"candidate_id": "it0-seed-0001-bad"})})
    settings = LabelSettings(copies_per_structure=1, statics_per_structure=1, cp2k=FAST)
    out = label_candidates([bad, good], 0, 0, settings)
    assert {f.provenance.candidate_id for f in out.frames} == {good.id}
    assert {f["frame_id"] for f in out.failures} == {f"{bad.id}-relax0", f"{bad.id}-static0"}


def test_registry_and_missing_backends():
    assert LABELLERS["teacher"] is LABELLERS["cp2k"]  # one protocol, two engines
    with pytest.raises(NotImplementedError, match="not available yet"):
        get_labeller("no_such_labeller")


def test_empty_selection_needs_no_model():
    out = label_candidates([], 1, 0, LabelSettings())
    assert list(out.frames) == [] and out.failures == [] and "stand-in for DFT" in out.labeller


def test_label_maker_run_locally(lips_structures):
    from jobflow import run_locally

    cands = _candidates(lips_structures, ["mp-1153"])
    settings = LabelSettings(copies_per_structure=1, statics_per_structure=1, cp2k=FAST)
    job = LabelMaker(settings=settings).make(cands, iteration=0, seed=3)
    responses = run_locally(job, ensure_success=True, log=False)
    out = responses[job.uuid][1].output
    assert {f.kind for f in out.frames} == {"relax_step", "static"}
    assert out.frames[0].provenance.candidate_id == "it0-seed-0000-mp-1153"
    direct = label_candidates(cands, 0, 3, settings)
    assert [f.energy for f in direct.frames] == pytest.approx([f.energy for f in out.frames])


def test_label_fans_out_one_job_per_structure(lips_structures, tmp_path, monkeypatch):
    """The DFT fan-out (label_fanout_flow, teacher engine here): each structure's job gets one
    store key, not a structure; the collector's frames are the whole-list protocol's."""
    import json

    from jobflow import job, run_locally

    from cscflow.config import StoreSettings
    from cscflow.label import label_fanout_flow
    from cscflow.stores import build_job_store
    from cscflow.structure_store import load_frames, save_candidates

    monkeypatch.chdir(tmp_path)
    cands = _candidates(lips_structures, ["mp-1153", "mp-157"])
    settings = LabelSettings(copies_per_structure=1, statics_per_structure=1, cp2k=FAST)

    @job
    def selected():
        return save_candidates(cands, "select")

    store = build_job_store(StoreSettings(), tmp_path)
    sel = selected()
    sel.config.expose_store = True
    run_locally(sel, store=store, ensure_success=True, log=False)
    with store as s:
        stored_set = s.get_output(sel.uuid, load=True)
    flow = label_fanout_flow(stored_set, 0, 42, settings)
    per_structure = flow.jobs[:-1]
    assert len(per_structure) == 2 and [j.metadata["candidate_id"] for j in per_structure] == [c.id for c in cands]
    assert all("structure" not in json.dumps(j.function_args[0].model_dump(), default=str) for j in per_structure)
    run_locally(flow, store=store, ensure_success=True, log=False)
    with store as s:
        out = s.get_output(flow.jobs[-1].uuid, load=True)
    fanned = load_frames(out["frames"] if isinstance(out, dict) else out.frames, store)
    direct = label_candidates(cands, 0, 42, settings)
    assert [f.frame_id for f in fanned] == [f.frame_id for f in direct.frames]
    assert [f.energy for f in fanned] == pytest.approx([f.energy for f in direct.frames])
