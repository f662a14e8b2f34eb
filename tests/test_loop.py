"""The closed loop end to end with tiny counts: both stop conditions, provenance, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cscflow.runner import explore, format_status, load_run, rebuild_state, status_rows
from cscflow.stores import build_job_store
from cscflow.structure_store import CANDIDATES, FRAMES, collection_for, load_candidates, load_frames

TINY = """
name: tiny
chemical_system: {{elements: [Li, S], min_atoms: 2, max_atoms: 6}}
seed: 3
generator: {{backend: pyxtal, num_per_condition: 2, conditions: [0.0, 0.06]}}
relax: {{fmax: 0.2, steps: 40}}
# One wide bin so that tiny random runs always select something to label.
selection: {{only_sun: false, bins: [{{high: 0.0, quota: 1}}, {{low: 0.0, high: 10.0, quota: 2}}]}}
labeller: {{backend: teacher, copies_per_structure: 1, statics_per_structure: 1, relax_steps: 5}}
training: {{backend: deepmd, numb_steps: 10, decay_steps: 5, n_train: 200, n_train_per_iteration: 10,
            n_dim: 8, e_dim: 8, a_dim: 4, nlayers: 1}}
convergence: {{max_iterations: {max_iterations}, dh_dn_threshold: {threshold}, min_iterations: {min_iterations}}}
"""


def tiny_spec(tmp_path: Path, max_iterations=2, threshold=0.0, min_iterations=1) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(max_iterations=max_iterations, threshold=threshold, min_iterations=min_iterations))
    return path


def _collection_docs(store, name, **criteria):
    collection = collection_for(store, name)
    collection.connect()
    try:
        return list(collection.query(criteria))
    finally:
        collection.close()


def _store_docs(run_dir):
    run_id, spec = load_run(run_dir)
    store = build_job_store(spec.store, run_dir)
    store.connect()
    return run_id, spec, store


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny two-iteration run shared by the tests that only read it."""
    tmp_path = tmp_path_factory.mktemp("loop")
    run_dir = tmp_path / "run"
    final = explore(tiny_spec(tmp_path, max_iterations=2), run_dir)
    return run_dir, final


def test_loop_stops_at_max_iterations_and_keeps_provenance(finished_run):
    run_dir, final = finished_run
    assert final.converged and final.stop_reason.startswith("max_iterations")
    assert [doc.iteration for doc in final.history] == [1, 2]
    assert (run_dir / "final_state.json").is_file()

    history, done, _ = status_rows(run_dir)
    assert [d.iteration for d in history] == [1, 2]
    assert done is not None
    table = format_status(run_dir)
    assert "dH/dN" in table and "finished: max_iterations" in table

    # Provenance: every training frame traces back to a generated candidate of its iteration.
    run_id, spec, store = _store_docs(run_dir)
    state = rebuild_state(store, run_id, spec)
    # one document per candidate, found by run and stage in the run's candidates collection
    generated = {d["id"]: d["provenance"] for d in _collection_docs(store, CANDIDATES, run_id=run_id, stage="generate")}
    assert len(generated) == 2 * 2 * 2  # 2 per condition, 2 conditions, 2 iterations
    frames = load_frames([store.get_output(uuid, load=True)["frames"] for uuid in state.labelled_uuids[1:]], store)
    assert frames, "the loop labelled nothing"
    stored_frames = {d["id"] for d in _collection_docs(store, FRAMES, run_id=run_id, stage="label")}
    assert {f.frame_id for f in frames} <= stored_frames
    for frame in frames:
        prov = frame.provenance
        assert prov.candidate_id in generated
        assert generated[prov.candidate_id]["condition"] == prov.condition
        assert prov.iteration in (1, 2)
    # stage outputs carry keys, not structures
    for doc in store.query({"metadata.run_id": run_id, "metadata.stage": {"$in": ["generate", "relax", "score"]}}):
        assert "structure" not in json.dumps(doc["output"], default=str)
    train = [d for d in store.query({"metadata.run_id": run_id, "metadata.stage": "train"}, load=True)]
    assert len(train) == 2
    assert all(Path(d["output"]["model_path"]).is_file() for d in train)
    frame_ids = {f.frame_id for f in frames}
    assert set(train[-1]["output"]["train_frame_ids"]) - frame_ids, "iteration-0 frames are trained on too"
    # N_train grows by training.n_train_per_iteration, and the training sets are nested:
    # iteration 2 ranks iteration 1's training frames first (TrainMaker previous_train_ids).
    by_it = {d["metadata"]["iteration"]: d["output"] for d in train}
    assert [by_it[1]["n_train"], by_it[2]["n_train"]] == [10, 20]
    assert by_it[2]["train_frame_ids"][:10] == by_it[1]["train_frame_ids"]
    assert state.train_uuid == next(d["uuid"] for d in train if d["metadata"]["iteration"] == 2)  # resume keeps it

    # Closed loop (paper 4.1): iteration 2 relaxes and scores with the model trained in
    # iteration 1, and the reference hull is recomputed with that same model.
    from cscflow.forcefields import model_tag

    model_1 = next(d for d in train if d["metadata"]["iteration"] == 1)["output"]["model_path"]
    tag_1 = model_tag(spec.forcefield, model_1)
    assert tag_1.startswith("deepmd:")

    def stage(name, k):
        from jobflow.core.reference import find_and_resolve_references

        doc = store.query_one(
            {"metadata.run_id": run_id, "metadata.stage": name, "metadata.iteration": k},
            load=True, sort={"index": -1},  # a stage that fanned out: its last index refers to the output
        )
        out = find_and_resolve_references(doc["output"], store)
        return out.model_dump() if hasattr(out, "model_dump") else out

    relaxed = [c for c in load_candidates(stage("relax", 2)["candidates"], store) if c.status == "relaxed"]
    scored = stage("score", 2)
    assert relaxed and {c.model for c in relaxed} == {tag_1}
    assert scored["model"] == tag_1
    assert {c.model for c in load_candidates(scored["candidates"], store) if c.status == "relaxed"} == {tag_1}
    # the re-evaluation ran as its own (sharded) stage before Score; Score read its energies
    reevaluated = stage("reevaluate", 2)
    assert reevaluated["computed"] > 0 and reevaluated["shards"] >= 2  # references + earlier candidates
    assert scored["reused"]["references"] > 0 and not scored["recomputed"].get("references")
    assert stage("score", 1)["model"] == model_tag(spec.forcefield)  # the starting force field
    store.close()


def test_find_reports_the_closest_candidate(finished_run, tmp_path):
    """`cscflow find`: a known phase (strained copy of a candidate) is found with its iteration,
    condition and E_hull; a structure of another formula is not."""
    from click.testing import CliRunner
    from pymatgen.core import Lattice, Structure

    from cscflow.cli import main
    from cscflow.find import find_in_run

    run_dir, _ = finished_run
    run_id, spec, store = _store_docs(run_dir)
    doc = store.query_one({"metadata.run_id": run_id, "metadata.stage": "score", "metadata.iteration": 2}, load=True)
    cand = next(c for c in load_candidates(doc["output"]["candidates"], store) if c.status == "relaxed")
    store.close()
    target = cand.structure.copy()
    target.apply_strain(0.01)
    target.make_supercell([2, 1, 1])  # another cell of the same crystal
    target.to(filename=str(tmp_path / "known.cif"))
    Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(tmp_path / "nacl.cif"))

    found, missing = find_in_run(run_dir, [tmp_path / "known.cif", tmp_path / "nacl.cif"])
    assert found.iteration in (1, 2) and found.candidate_id is not None and found.rms is not None
    if found.candidate_id == cand.id:
        assert found.e_hull == pytest.approx(cand.e_hull) and found.condition == cand.provenance.condition
    assert missing.candidate_id is None and missing.n_same_formula == 0
    result = CliRunner().invoke(main, ["find", str(run_dir), str(tmp_path / "known.cif"), str(tmp_path / "nacl.cif")])
    assert result.exit_code == 0, result.output
    assert found.candidate_id in result.output and "not found" in result.output
    bad = CliRunner().invoke(main, ["find", str(run_dir), str(tmp_path / "none.cif")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_model_errors_on_one_fixed_test_set(finished_run):
    """Every model of the run (untuned force field, then each iteration's) on the same frames."""
    from cscflow.model_errors import fixed_test_errors, format_errors

    run_dir, _ = finished_run
    rows = fixed_test_errors(run_dir)
    assert [r.iteration for r in rows] == [None, 1, 2] and rows[0].model == "untuned chgnet-0.3.0"
    assert len({r.n_test for r in rows}) == 1 and rows[0].n_test > 0
    assert all(r.energy_rmse is not None and r.energy_rmse >= 0 and r.force_rmse >= 0 for r in rows)
    # nested training sets: no model ever saw the last split's test frames
    assert rows[1].n_trained_on_test == 0 and rows[2].n_trained_on_test == 0
    assert "untuned chgnet-0.3.0" in format_errors(rows)
    from click.testing import CliRunner

    from cscflow.cli import main

    result = CliRunner().invoke(main, ["model-errors", str(run_dir)])
    assert result.exit_code == 0 and "untuned chgnet-0.3.0" in result.output and "chgnet it2" not in result.output
    assert result.output.count("deepmd it") == 2


def test_loop_stops_when_entropy_saturates(tmp_path):
    # Any finite dH/dN is below this threshold: the loop must stop as soon as dH/dN exists.
    final = explore(tiny_spec(tmp_path, max_iterations=5, threshold=1e9), tmp_path / "run")
    assert final.stop_reason.startswith("entropy saturated"), final.stop_reason
    assert len(final.history) < 5
    assert final.history[-1].dh_dn is not None


def _count(lines, needle):
    return sum(needle in line for line in lines)


@pytest.mark.timeout(900)
def test_resume_after_kill_recomputes_nothing(tmp_path):
    spec = tiny_spec(tmp_path, max_iterations=1)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cscflow.cli", "explore", str(spec), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first: list[str] = []
    deadline = time.time() + 600
    for line in proc.stdout:
        first.append(line)
        if "Starting job - label it1" in line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "explore never reached label it1"
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(first[-20:])
    finished_before = [s for s in ("generate", "relax", "score", "select") if _count(first, f"/1/{s}: computing")]
    assert finished_before == ["generate", "relax", "score", "select"]

    run_id, spec_obj, store = _store_docs(run_dir)
    before = {d["metadata"]["stage"] for d in store.query({"metadata.run_id": run_id, "metadata.iteration": 1, "output": {"$ne": None}})}
    store.close()
    assert {"generate", "relax", "score", "select"} <= before and "train" not in before

    resumed = subprocess.run(
        [sys.executable, "-m", "cscflow.cli", "resume", str(run_dir)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    out = (resumed.stdout + resumed.stderr).splitlines()
    assert resumed.returncode == 0, "\n".join(out[-30:])
    for stage in ("generate", "relax", "score", "select"):
        assert _count(out, f"/1/{stage} already finished: reusing") == 1, stage
        assert _count(out, f"/1/{stage}: computing") == 0, stage
    for stage in ("references", "label"):
        assert _count(out, f"/0/{stage}: computing") == 0
    assert _count(out, "/1/label: computing") == 1
    assert _count(out, "/1/train: computing") == 1
    history, final, _ = status_rows(run_dir)
    assert [d.iteration for d in history] == [1] and final is not None
    assert history[0].n_generated == 4
