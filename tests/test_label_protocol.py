"""The per-structure DFT protocol (paper Methods 4.2) as a jobflow Flow.

Default tests drive the protocol with the CHGNet teacher engine (real calculations, seconds);
the CP2K end-to-end run is marked slow.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from jobflow import JobStore, OutputReference, run_locally
from maggma.stores import MemoryStore

from cscflow.config import CP2KSettings, ForceFieldSettings, LabelSettings
from cscflow.label.protocol import keep_steps, protocol_flow, protocol_seeds
from cscflow.perturb import perturb_structure
from cscflow.schemas import Candidate, Provenance


def _cand(structure, cid="it1-li2s", iteration=1):
    return Candidate(provenance=Provenance(candidate_id=cid, iteration=iteration, generator="pyxtal",
                                           condition={"e_hull": 0.03}, seed=5),
                     structure=structure, status="relaxed")


def _store():
    return JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})


def _run(flow, store=None):
    responses = run_locally(flow, store=store or _store(), ensure_success=True, log=False)
    return responses[flow.output.uuid][max(responses[flow.output.uuid])].output


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40])
def test_keep_steps_first_last_and_count(n):
    rng = np.random.default_rng(0)
    for _ in range(20):
        kept = keep_steps(n, (1, 5), rng)
        assert kept == sorted(set(kept))
        assert kept[0] == 0 and kept[-1] == n - 1
        assert 1 <= len(kept) <= min(5, n)
        if n >= 2:
            assert len(kept) >= 2  # first and last are both kept


def test_keep_steps_rejects_bad_range():
    with pytest.raises(ValueError, match="relax_frames_kept"):
        keep_steps(5, (3, 2), np.random.default_rng(0))


def test_seeds_depend_on_candidate_not_order():
    s = LabelSettings()
    a = protocol_seeds("x", 2, 42, s)
    assert a == protocol_seeds("x", 2, 42, s)
    assert a != protocol_seeds("y", 2, 42, s)
    assert len(a["relax"]) == 3 and len(a["static"]) == 5


def test_protocol_flow_frames_provenance_and_seeds(lips_structures):
    s = lips_structures["mp-1153"]
    cand = _cand(s)
    settings = LabelSettings(backend="teacher", copies_per_structure=2, statics_per_structure=2,
                             relax_frames_kept=(3, 3))
    out = _run(protocol_flow([cand], 1, 7, settings))
    kinds = [f.kind for f in out.frames]
    assert out.failures == []
    assert kinds.count("static") == 2
    assert 2 * 2 <= kinds.count("relax_step") <= 2 * 3
    assert len({f.frame_id for f in out.frames}) == len(out.frames)
    for f in out.frames:
        assert f.provenance == cand.provenance
        assert np.asarray(f.forces).shape == (3, 3) and np.asarray(f.stress).shape == (3, 3)
        assert "stand-in for DFT" in f.labeller
    # the first ionic step of each relaxation is the perturbed copy rebuilt from its seed
    seeds = protocol_seeds(cand.id, 1, 7, settings)
    first = [f for f in out.frames if f.frame_id.endswith("-s000")]
    assert sorted(f.label_seed for f in first) == sorted(seeds["relax"])
    for f in first:
        rebuilt, _ = perturb_structure(s, np.random.default_rng(f.label_seed))
        np.testing.assert_allclose(f.structure.cart_coords, rebuilt.cart_coords, atol=1e-6)
    # relaxation lowers the energy: last step below first, for every copy
    for j in range(2):
        steps = sorted((f for f in out.frames if f"-relax{j}-" in f.frame_id), key=lambda f: f.frame_id)
        assert steps[-1].energy < steps[0].energy


def test_failed_candidate_is_recorded_and_others_complete(lips_structures):
    good = _cand(lips_structures["mp-1153"], "good")
    disordered = lips_structures["mp-1153"].copy()
    disordered.replace(0, {"Li": 0.5, "S": 0.5})  # cannot be perturbed: a real bad input
    bad = _cand(disordered, "bad")
    settings = LabelSettings(backend="teacher", copies_per_structure=1, statics_per_structure=1)
    out = _run(protocol_flow([bad, good], 0, 3, settings))
    assert {f.provenance.candidate_id for f in out.frames} == {"good"}
    assert {f["frame_id"] for f in out.failures} == {"bad-relax0", "bad-static0"}
    assert "disordered" in out.failures[0]["error"]
    assert "no relaxation" in out.failures[1]["error"]


def test_resume_reuses_finished_calculations(lips_structures, tmp_path):
    """Second run with a broken engine: every per-structure job comes from the store."""
    cand = _cand(lips_structures["mp-1153"])
    settings = LabelSettings(backend="teacher", copies_per_structure=1, statics_per_structure=1)
    store = _store()
    first = _run(protocol_flow([cand], 0, 1, settings, key_prefix="run/0/label"), store)
    junk = tmp_path / "broken.pth.tar"
    junk.write_text("not a model")  # names fine, fails when loaded
    broken = settings.model_copy(update={"teacher": ForceFieldSettings(model_path=junk)})
    again = _run(protocol_flow([cand], 0, 1, broken, key_prefix="run/0/label"), store)
    assert again.failures == []
    assert [f.energy for f in again.frames] == [f.energy for f in first.frames]
    fresh = _run(protocol_flow([cand], 0, 1, broken, key_prefix="run/0/other"), _store())
    assert list(fresh.frames) == [] and len(fresh.failures) == 2  # it would have failed if recomputed


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cp2k_shell") is None, reason="CP2K not installed")
def test_cp2k_protocol_end_to_end(lips_structures):
    """Real CP2K: one perturbed relaxation (few steps) and one static of Li2S via LabelMaker."""
    from cscflow.label import LabelMaker

    cand = _cand(lips_structures["mp-1153"])
    settings = LabelSettings(
        backend="cp2k", copies_per_structure=1, statics_per_structure=1, relax_frames_kept=(2, 2),
        cp2k=CP2KSettings(cutoff=200, kspacing=1.0, relax_steps=3, relax_fmax=0.2),
    )
    job = LabelMaker(settings=settings).make([cand], 1, 11)
    store = _store()
    responses = run_locally(job, store=store, ensure_success=True, log=False)
    out = responses[job.uuid][max(responses[job.uuid])].output
    out = out.resolve(store) if isinstance(out, OutputReference) else out  # replaced by the flow
    assert out.failures == []
    assert [f.kind for f in out.frames].count("static") == 1
    assert [f.kind for f in out.frames].count("relax_step") == 2
    assert all(f.labeller.startswith("cp2k:PBE/DZVP-MOLOPT-SR-GTH") for f in out.frames)
    for f in out.frames:
        assert f.energy / len(f.structure) == pytest.approx(-229.5, abs=1.5)
        assert np.abs(np.asarray(f.forces)).max() > 1e-3
