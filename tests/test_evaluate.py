"""Per-iteration metrics and the stopping rule."""

from __future__ import annotations

import pytest

from quests.entropy import entropy as quests_entropy

from cscflow.config import ConvergenceSettings, SelectionSettings, TrainingSettings
from cscflow.datasets import split_frames
from cscflow.entropy import stack_descriptors, structure_descriptors
from cscflow.evaluate import EvaluateMaker, condition_key, evaluate_iteration, should_stop
from cscflow.schemas import Candidate, Frame, IterationDocument, Provenance
from cscflow.train import TrainOutput


@pytest.fixture(scope="module")
def frames(lips_structures):
    """Teacher-labelled frames (CHGNet single points) of three real structures."""
    from cscflow.config import ForceFieldSettings
    from cscflow.forcefields import get_calculator, single_points

    ids = [("mp-1153", 0), ("mp-985583", 0), ("mp-96", 1)]
    structures = [lips_structures[i] for i, _ in ids]
    labels = single_points(structures, get_calculator(ForceFieldSettings()))
    return [
        Frame(
            frame_id=f"{i}-f",
            structure=s,
            energy=r["energy"],
            forces=r["forces"].tolist(),
            kind="unperturbed",
            labeller="teacher:chgnet-0.3.0 (stand-in for DFT)",
            provenance=Provenance(candidate_id=i, iteration=it, generator="seed"),
        )
        for (i, it), s, r in zip(ids, structures, labels)
    ]


def _cand(structure, cid, cond, e_hull=None, flags=(True, True, True), status="relaxed", reason=None):
    st, un, no = flags
    return Candidate(
        provenance=Provenance(candidate_id=cid, iteration=1, generator="pyxtal", condition=cond),
        structure=structure,
        status=status,
        reject_reason=reason,
        e_hull=e_hull,
        is_stable=st if status == "relaxed" else None,
        is_unique=un if status == "relaxed" else None,
        is_novel=no if status == "relaxed" else None,
    )


def test_iteration_document(lips_structures, frames):
    s = lips_structures
    scored = [
        _cand(s["mp-1153"], "a", {"e_hull": 0.0}, -0.01),
        _cand(s["mp-557142"], "b", {"e_hull": 0.0}, 0.02, flags=(True, True, False)),
        _cand(s["mp-96"], "c", {"e_hull": 0.03}, 0.2, flags=(False, True, True)),
        _cand(s["mp-157"], "d", {"e_hull": 0.03}, status="rejected", reason="min distance: 0.41 < 0.6"),
        _cand(s["mp-157"], "e", {"e_hull": 0.06}, status="rejected", reason="min distance: 0.2 < 0.6"),
    ]
    train = TrainOutput(model_path="/m.pth", energy_rmse=0.01, force_rmse=0.1, n_train=2,
                        train_frame_ids=[frames[0].frame_id, frames[2].frame_id])
    prev = IterationDocument(iteration=0, n_train_total=1, entropy_training=0.6365141682953884)
    doc = evaluate_iteration(1, scored, scored[:1], [frames[:2], frames[2:]], train, [prev])
    assert (doc.n_generated, doc.n_relaxed, doc.n_rejected) == (5, 3, 2)
    assert (doc.n_stable, doc.n_unique, doc.n_novel, doc.n_sun) == (2, 3, 2, 1)
    assert doc.n_selected == 1 and doc.n_labelled == 1 and doc.n_train_total == 3
    assert doc.rejection_reasons == {"min distance": 2}
    assert doc.e_hull_by_condition == {"0.0": [-0.01, 0.02], "0.03": [0.2]}
    assert doc.sun_ratio == pytest.approx(1 / 5) and doc.stable_ratio == pytest.approx(2 / 5)
    assert doc.energy_rmse == 0.01 and doc.model_path == "/m.pth"
    # H of the training set the train stage used, in its ranking order, all environments
    f0, f2 = (stack_descriptors(structure_descriptors([f.structure])) for f in (frames[0], frames[2]))
    h1, h2 = float(quests_entropy(f0)), float(quests_entropy(stack_descriptors([f0, f2])))
    assert doc.n_train == 2 and doc.entropy_training == pytest.approx(h2, rel=1e-9)
    assert doc.dh_dn == pytest.approx(h2 - h1, rel=1e-9)
    assert [p[0] for p in doc.dh_dn_curve] == [1, 2] and doc.dh_dn_curve[0][2] is None
    assert doc.entropy_gain == pytest.approx(doc.entropy_training - prev.entropy_training)
    assert doc.entropy_candidates is not None and doc.entropy_candidates > 0


def test_dh_dn_along_the_delta_h_ranking(lips_structures, frames, tmp_path):
    """Without a train output, evaluate ranks the pool itself: dH/dN is the increase of H
    (eq. 1, quests) per added frame along the greedy δH ranking, vs N_train (Fig. 3a)."""
    cands = [_cand(lips_structures["mp-1153"], "a", {"e_hull": 0.0}, 0.0)]
    training = TrainingSettings(n_train=3, train_iterations_max=1, test_fraction=0.0)
    conv = ConvergenceSettings(dh_dn_window=1)
    doc = evaluate_iteration(1, cands, [], [frames], None, [], training=training, convergence=conv)
    split = split_frames(frames, n_train=3, train_iterations_max=1, test_fraction=0.0, device="cpu")
    desc = [stack_descriptors(structure_descriptors([f.structure])) for f in split.train]
    h = [float(quests_entropy(stack_descriptors(desc[: n + 1]))) for n in range(3)]
    assert [p[0] for p in doc.dh_dn_curve] == [1, 2, 3]
    assert [p[1] for p in doc.dh_dn_curve] == pytest.approx(h, rel=1e-9, abs=1e-12)
    assert [p[2] for p in doc.dh_dn_curve[1:]] == pytest.approx([h[1] - h[0], h[2] - h[1]], rel=1e-9)
    assert doc.dh_dn == pytest.approx(h[2] - h[1], rel=1e-9) and doc.n_train == 3
    # Fig. 3a's upper panel is drawn from the stored curve
    from cscflow.analysis.figures import plot_dh_dn_vs_ntrain

    assert plot_dh_dn_vs_ntrain({1: doc.dh_dn_curve}, tmp_path / "dhdn.png").stat().st_size > 1000
    # a window averages the last frames: (H_3 - H_1) / 2
    wide = evaluate_iteration(1, cands, [], [frames], None, [], training=training,
                              convergence=ConvergenceSettings(dh_dn_window=5))
    assert wide.dh_dn == pytest.approx((h[2] - h[0]) / 2, rel=1e-9)


def test_evaluate_maker_in_jobflow(lips_structures, frames):
    from jobflow import run_locally

    cands = [_cand(lips_structures["mp-1153"], "a", {}, 0.0)]
    job = EvaluateMaker(selection=SelectionSettings()).make(4, cands, cands, frames, None, [])
    doc = run_locally(job, ensure_success=True, log=False)[job.uuid][1].output
    assert doc.iteration == 4 and doc.n_train_total == 3 and doc.e_hull_by_condition == {"none": [0.0]}


def test_condition_key():
    assert condition_key({"e_hull": 0.03}) == "0.03"
    assert condition_key({}) == "none"
    assert condition_key({"e_hull": 0.0, "x": 1}) == "e_hull=0.0,x=1"


def _doc(it, dh_dn=None, gain=None):
    return IterationDocument(iteration=it, dh_dn=dh_dn, entropy_gain=gain)


def test_should_stop():
    conv = ConvergenceSettings(max_iterations=5, dh_dn_threshold=1e-3, entropy_gain_epsilon=0.01, min_iterations=2)
    assert should_stop([], conv) is None
    # saturated, but min_iterations not reached yet
    assert should_stop([_doc(1, 1e-5, 0.001)], conv) is None
    reason = should_stop([_doc(1), _doc(2, 5e-4, 0.5)], conv)
    assert reason.startswith("entropy saturated: dH/dN=0.0005 < 0.001")
    reason = should_stop([_doc(1), _doc(2, 0.1, 0.005)], conv)
    assert reason.startswith("entropy gain 0.005 < epsilon 0.01")
    assert should_stop([_doc(1), _doc(2, 0.1, 0.5)], conv) is None
    assert should_stop([_doc(4), _doc(5, 0.1, 0.5)], conv) == "max_iterations (5) reached"
    # a negative dH/dN (entropy fell) is saturation too
    assert "saturated" in should_stop([_doc(1), _doc(2, -1e-3, -0.2)], conv)


def test_paper_thresholds():
    """1e-3 for pre-screening, 1e-4 for accurate models (the default)."""
    history = [_doc(1, 5e-4, 0.5)]
    assert ConvergenceSettings().threshold == 1e-4
    assert should_stop(history, ConvergenceSettings(max_iterations=9)) is None
    screening = ConvergenceSettings(max_iterations=9, target="pre-screening")
    assert screening.threshold == 1e-3 and "(pre-screening)" in should_stop(history, screening)
    assert "saturated" in should_stop([_doc(1, 5e-5, 0.5)], ConvergenceSettings(max_iterations=9))
