"""jobflow-remote as the second dispatcher, tested for configuration only (its queue needs a
real MongoDB): every job, including those a trigger adds at run time, gets the worker of
its category as jobflow-remote's own job-document code computes it; the project template
parses as a jobflow-remote Project; missing workers and bad projects are clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cscflow.config import load_spec
from test_dispatch import TINY as DISPATCH_TINY

pytest.importorskip("jobflow_remote")

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "fworker_configs" / "jobflow_remote" / "cscflow.yaml"
BIN = Path(sys.executable).parent

# the FireWorks tests' tiny exploration, with a worker per category
TINY = DISPATCH_TINY.replace("name: tiny\n", "name: tiny_remote\n") + """dispatch:
  remote_workers:
    gpu: {worker: gpu_worker, resources: {gpus_per_job: 1}}
    cpu: {worker: cpu_worker, exec_config: vasp}
"""

WANT = {"gpu": "gpu_worker", "cpu": "cpu_worker"}


@pytest.fixture
def remote_spec(tmp_path) -> Path:
    path = tmp_path / "tiny_remote.yaml"
    path.write_text(TINY)
    return path


def _queue_doc(job_, parent_worker: str) -> dict:
    """The queue document jobflow-remote writes for this job (its own code, no database)."""
    from jobflow_remote.jobs.data import get_initial_job_doc_dict

    return get_initial_job_doc_dict(job_, parents=[], db_id="1", worker=parent_worker, exec_config=None,
                                    resources=None, priority=0)


def test_every_job_goes_to_its_categorys_worker_also_after_a_trigger(remote_spec):
    from jobflow import JobStore
    from maggma.stores import MemoryStore

    from cscflow.loop import tag_trigger, exploration_flow, exploration_step
    from cscflow.remote import remote_flow
    from cscflow.schemas import LoopState

    spec = load_spec(remote_spec)
    flow = remote_flow(spec, "r1")
    assert [j.name for j, _ in flow.iterflow()] == [j.name for j, _ in exploration_flow(spec, "r1").iterflow()]
    for job_, _ in flow.iterflow():
        category = spec.dispatch.category(job_.metadata["stage"])
        doc = _queue_doc(job_, "project_default")
        assert doc["worker"] == WANT[category], (job_.name, doc["worker"])
        if category == "gpu":
            assert doc["resources"] == {"gpus_per_job": 1}
        else:
            assert doc["exec_config"] == "vasp"

    # What the runner does when the trigger finishes: children default to the trigger's worker.
    store = JobStore(MemoryStore())
    store.connect()
    state = LoopState(run_id="r1", spec=spec.model_dump(mode="json"), reference_uuid="ref",
                      labelled_uuids=["l0"], scored_uuids=[], iteration=0)
    trigger = exploration_step(state)
    tag_trigger(trigger, spec, "r1", 0)
    assert _queue_doc(trigger, "project_default")["worker"] == "cpu_worker"
    response = trigger.run(store)
    added = list(response.replace.iterflow())
    stages = {j.metadata["stage"] for j, _ in added}
    assert {"generate", "relax", "train", "label", "trigger"} <= stages
    for job_, _ in added:
        doc = _queue_doc(job_, "cpu_worker")
        assert doc["worker"] == WANT[spec.dispatch.category(job_.metadata["stage"])], (job_.name, doc["worker"])


def test_fireworks_specs_carry_no_remote_keys_unless_asked(remote_spec, tmp_path):
    from jobflow.managers.fireworks import flow_to_workflow

    from cscflow.loop import exploration_flow

    plain = load_spec(REPO / "workflows" / "lips_demo.yaml")
    assert plain.dispatch.remote_workers == {}
    wf = flow_to_workflow(exploration_flow(plain, "r2"))
    assert all("worker" not in fw.spec and "_category" in fw.spec for fw in wf.fws)


def test_project_template_is_a_valid_jobflow_remote_project(monkeypatch):
    from jobflow import JobStore
    from jobflow_remote.config.base import Project
    from maggma.stores import GridFSStore, MongoStore

    from cscflow.stores import expand_env

    for name in ("CSCFLOW_CLUSTER_HOST", "USER", "CSCFLOW_MONGO_HOST", "CSCFLOW_MONGO_DB", "CSCFLOW_MONGO_USER",
                 "CSCFLOW_MONGO_PASSWORD"):
        monkeypatch.setenv(name, name.lower())
    raw = expand_env(yaml.safe_load(TEMPLATE.read_text()), str(TEMPLATE))
    project = Project.model_validate(raw)
    assert set(project.workers) == set(WANT.values())
    assert project.workers["gpu_worker"].resources["gres"] == "gpu:1"
    assert str(project.workers["cpu_worker"].work_dir) == "/scratch/user/cscflow/cpu"
    assert "vasp" in project.exec_config
    jobstore = project.get_jobstore()  # no connection: configuration only
    assert isinstance(jobstore, JobStore) and isinstance(jobstore.docs_store, MongoStore)
    assert jobstore.docs_store.collection_name == "outputs"
    assert isinstance(jobstore.additional_stores["data"], GridFSStore)
    assert isinstance(project.get_queue_store(), MongoStore)


def test_missing_worker_for_a_category_is_a_clear_error(tmp_path):
    from cscflow.remote import RemoteDispatchError, remote_flow

    path = tmp_path / "half.yaml"
    path.write_text(TINY.replace("    cpu: {worker: cpu_worker, exec_config: vasp}\n", ""))
    with pytest.raises(RemoteDispatchError, match="no worker for category cpu"):
        remote_flow(load_spec(path), "r3")


def test_submit_to_an_unknown_project_fails_cleanly(remote_spec, tmp_path):
    env = {**os.environ, "JFREMOTE_PROJECTS_FOLDER": str(tmp_path / "projects"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "projects").mkdir()
    run_dir = tmp_path / "run"
    res = subprocess.run([str(BIN / "cscflow"), "submit", str(remote_spec), "--jobflow-remote", "nosuch",
                          "--run-dir", str(run_dir)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "jobflow-remote project nosuch" in res.stderr and "Traceback" not in res.stderr
    assert not (run_dir / "run.json").exists()  # nothing recorded for a submission that did not happen
    res = subprocess.run([str(BIN / "cscflow"), "submit", str(remote_spec), "--jobflow-remote", "p", "--local"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "excludes" in res.stderr
