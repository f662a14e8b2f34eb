"""FireWorks dispatch: categories across dynamic iterations, config files, journaled write
concern, `cscflow submit` errors. The end-to-end runs on a real server (concurrent workers,
killed workers, a killed server, the web GUI) are in tests/test_server_e2e.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cscflow.config import load_spec

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "fworker_configs"
BIN = Path(sys.executable).parent

TINY = """
name: tiny
chemical_system: {elements: [Li, S], min_atoms: 2, max_atoms: 4}
seed: 3
generator: {backend: pyxtal, num_per_condition: 2, conditions: [0.06]}
relax: {fmax: 0.3, steps: 20}
selection: {only_sun: false, bins: [{high: 0.0, quota: 1}, {low: 0.0, high: 10.0, quota: 1}]}
labeller: {backend: teacher, copies_per_structure: 1}
training: {backend: deepmd, numb_steps: 4, decay_steps: 2, n_train: 50, n_train_per_iteration: 20, n_dim: 8, e_dim: 8, a_dim: 4, nlayers: 1}
convergence: {max_iterations: 2, dh_dn_threshold: 0.0, min_iterations: 1}
"""


@pytest.fixture
def tiny_spec(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGOMOCK_SERVERSTORE_FILE", "FW_CONFIG_FILE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(*args, env=None, cwd=None, timeout=120):
    return subprocess.run(
        [str(BIN / "cscflow"), *args], capture_output=True, text=True, env=env or _env(), cwd=cwd, timeout=timeout
    )


# --------------------------------------------------------------------------- categories (fast)


def _run_trigger(spec, state):
    """Run one trigger job like a FireWorks worker would and convert its replacement."""
    from jobflow import JobStore
    from jobflow.managers.fireworks import flow_to_workflow
    from maggma.stores import MemoryStore

    from cscflow.loop import tag_trigger, exploration_step

    store = JobStore(MemoryStore())
    store.connect()
    trigger = exploration_step(state)
    tag_trigger(trigger, spec, state.run_id, state.iteration)
    response = trigger.run(store)
    # jobflow's JobFiretask does exactly this; it raises on references to jobs outside the flow.
    return flow_to_workflow(response.replace, None)


def test_categories_hold_in_dynamically_added_iterations(tiny_spec):
    from fireworks import Firework
    from jobflow.managers.fireworks import flow_to_workflow
    from pydantic import BaseModel

    from cscflow.dispatch import missing_categories
    from cscflow.loop import exploration_flow
    from cscflow.schemas import LoopState

    spec = load_spec(tiny_spec)
    wf = flow_to_workflow(exploration_flow(spec, "r1"))
    by_name = {fw.name: fw for fw in wf.fws}
    assert by_name["relax it0"].spec["_category"] == "gpu"
    assert by_name["label it0"].spec["_category"] == "cpu"
    assert missing_categories(wf, spec) == []
    # the first trigger waits for iteration 0 instead of starting at once
    trigger = by_name["explore after it0"]
    parents = [fw.name for fw in wf.fws if trigger.fw_id in wf.links[fw.fw_id]]
    assert parents == ["label it0"]

    for it, scored in ((0, []), (1, ["s1"])):
        labelled = ["l0", "l1"][: it + 1]
        state = LoopState(
            run_id="r1", spec=spec.model_dump(mode="json"), reference_uuid="ref",
            labelled_uuids=labelled, scored_uuids=scored, iteration=it,
        )
        added = _run_trigger(spec, state)
        cats = {fw.spec["stage"]: fw.spec.get("_category") for fw in added.fws}
        k = it + 1
        assert {fw.spec["iteration"] for fw in added.fws} == {k}
        for stage in ("generate", "relax", "train"):
            assert cats[stage] == "gpu", (k, stage, cats)
        for stage in ("score", "select", "label", "evaluate", "trigger", "link"):
            assert cats[stage] == "cpu", (k, stage, cats)
        assert all(fw.spec.get("_category") for fw in added.fws)
        assert missing_categories(added, spec) == []
        # Workers rebuild each job from its stored Firework: Maker settings must survive that.
        for fw in added.fws:
            job_ = Firework.from_dict(json.loads(json.dumps(fw.to_dict()))).tasks[0]["job"]
            maker = getattr(job_.function, "__self__", None)
            for value in vars(maker).values() if maker is not None else ():
                assert not isinstance(value, str) or value == maker.name, (fw.name, value)
            for attr in ("settings", "forcefield"):
                if maker is not None and hasattr(maker, attr):
                    assert isinstance(getattr(maker, attr), BaseModel), (fw.name, attr)


def test_stage_replacement_and_store_inputs_keep_the_stage_category(tiny_spec):
    """A DFT label stage that replaces itself (per-structure jobs + collector) stays on CPU workers."""
    from jobflow import Flow, JobStore, Response, job
    from jobflow.managers.fireworks import flow_to_workflow
    from maggma.stores import MemoryStore

    from cscflow.loop import tag_stage

    @job
    def one(x):
        return x + 1

    @job
    def fan_out(n):
        jobs = [one(i) for i in range(n)]
        return Response(replace=Flow(jobs, output=[j.output for j in jobs]))

    spec = load_spec(tiny_spec)
    stage = tag_stage(fan_out(3), spec, "r1", 1, "label")
    store = JobStore(MemoryStore())
    store.connect()
    response = stage.run(store)
    wf = flow_to_workflow(response.replace, None)
    names = [fw.name for fw in wf.fws]
    assert "store_inputs" in names and len(names) == 4
    assert {fw.spec.get("_category") for fw in wf.fws} == {"cpu"}


def test_dispatch_categories_are_configurable(tmp_path):
    from jobflow.managers.fireworks import flow_to_workflow

    from cscflow.loop import exploration_flow

    path = tmp_path / "s.yaml"
    path.write_text(TINY + "dispatch: {categories: {relax: bigmem, references: cpu, label: dft, trigger: cpu}}\n")
    spec = load_spec(path)
    cats = {fw.spec["stage"]: fw.spec.get("_category") for fw in flow_to_workflow(exploration_flow(spec, "r")).fws}
    assert cats == {"relax": "bigmem", "references": "cpu", "label": "dft", "trigger": "cpu"}
    from cscflow.dispatch import fworker_categories

    assert fworker_categories(spec) == ["bigmem", "cpu", "dft", None]


# --------------------------------------------------------------------------- config files (fast)


def test_fworker_and_queue_configs_load_with_fireworks():
    from fireworks import FWorker
    from fireworks.user_objects.queue_adapters.common_adapter import CommonAdapter

    def load_object_from_file(path):
        # qlaunch uses fw_serializers.load_object_from_file; under pytest its module scan trips
        # over FireWorks' own test markers, so read the same file with the class it names.
        assert yaml.safe_load(Path(path).read_text())["_fw_name"] == "CommonAdapter"
        return CommonAdapter.from_file(path)

    assert FWorker.from_file(str(CONFIGS / "gpu" / "my_fworker.yaml")).category == "gpu"
    assert FWorker.from_file(str(CONFIGS / "cpu" / "my_fworker.yaml")).category == "cpu"
    gpu = load_object_from_file(str(CONFIGS / "gpu" / "my_qadapter.yaml")).get_script_str("/scratch/x")
    assert "#SBATCH --gres=gpu:1" in gpu and "rlaunch -c $CSCFLOW_FWORKER_DIR/gpu rapidfire" in gpu
    assert "JOBFLOW_CONFIG_FILE" in gpu and "#SBATCH --partition=gpu" in gpu
    cpu = load_object_from_file(str(CONFIGS / "cpu" / "my_qadapter.yaml")).get_script_str("/scratch/x")
    assert "--gres" not in cpu and "/cpu rapidfire" in cpu
    pbs = load_object_from_file(str(CONFIGS / "pbs" / "my_qadapter.yaml")).get_script_str("/scratch/x")
    assert "#PBS -l walltime=48:00:00" in pbs


def test_store_and_launchpad_templates_render(monkeypatch):
    from fireworks import LaunchPad
    from jobflow import JobStore
    from maggma.stores import GridFSStore, MongoStore, S3Store

    from cscflow.dispatch import read_launchpad_file
    from cscflow.stores import expand_env

    for name in ("FW_MONGO_HOST", "FW_MONGO_DB", "FW_MONGO_USER", "CSCFLOW_MONGO_DB", "CSCFLOW_MONGO_HOST",
                 "CSCFLOW_MONGO_USER", "CSCFLOW_S3_BUCKET", "CSCFLOW_S3_ENDPOINT"):
        monkeypatch.setenv(name, name.lower())
    monkeypatch.setenv("FW_MONGO_PASSWORD", "pw-1")
    monkeypatch.setenv("CSCFLOW_MONGO_PASSWORD", "pw-2")
    lp_config = read_launchpad_file(CONFIGS / "my_launchpad.yaml")
    assert lp_config["password"] == "pw-1" and lp_config["mongoclient_kwargs"]["tls"] is True
    lp = LaunchPad.from_dict(lp_config)  # pymongo connects lazily: configuration only
    assert lp.name == "fw_mongo_db"
    mongo = JobStore.from_dict_spec(expand_env(yaml.safe_load((CONFIGS / "jobflow_mongo.yaml").read_text())["JOB_STORE"], "t"))
    assert isinstance(mongo.docs_store, MongoStore) and isinstance(mongo.additional_stores["data"], GridFSStore)
    assert mongo.docs_store.password == "pw-2"
    s3 = JobStore.from_dict_spec(expand_env(yaml.safe_load((CONFIGS / "jobflow_s3.yaml").read_text())["JOB_STORE"], "t"))
    assert isinstance(s3.additional_stores["data"], S3Store)


# --------------------------------------------------------------------------- errors (fast-ish)


def test_bad_launchpad_files_fail_fast_without_leaking_credentials(tmp_path, tiny_spec):
    secret = "s3cr3t-Pa55"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("host: [unclosed\n")
    no_host = tmp_path / "nohost.yaml"
    no_host.write_text("port: 27017\n")
    unset = tmp_path / "unset.yaml"
    unset.write_text("host: localhost\npassword: ${H9_NOT_SET_ANYWHERE}\n")
    free_port = _free_port()
    down = tmp_path / "down.yaml"
    down.write_text(f"host: 127.0.0.1\nport: {free_port}\nname: fw\nusername: alice\npassword: ${{H9_PW}}\n")
    uri = tmp_path / "uri.yaml"
    uri.write_text(f"host: mongodb://alice:{secret}@127.0.0.1:{free_port}/fw\nuri_mode: true\nname: fw\n")
    cases = {
        tmp_path / "missing.yaml": "LaunchPad file not found",
        bad_yaml: "not valid YAML",
        no_host: "no `host`",
        unset: "H9_NOT_SET_ANYWHERE is not set",
        down: f"cannot use the LaunchPad MongoDB at 127.0.0.1:{free_port}/fw",
        uri: f"mongodb://***@127.0.0.1:{free_port}/fw",
    }
    spec_fast = tmp_path / "fast.yaml"
    spec_fast.write_text(TINY + "store: {timeout_ms: 1000}\n")
    for i, (path, message) in enumerate(cases.items()):
        start = time.time()
        out = _cli("submit", str(spec_fast), "--launchpad", str(path), "--run-dir", str(tmp_path / f"r{i}"),
                   env=_env(H9_PW=secret))
        text = out.stdout + out.stderr
        assert out.returncode == 2, text
        assert message in text, text
        assert "Traceback" not in text and secret not in text
        assert time.time() - start < 30
        assert not (tmp_path / f"r{i}" / "run.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_literal_store_credentials_are_refused_but_variables_pass(tmp_path):
    from cscflow.config import load_spec
    from cscflow.stores import StoreError, check_no_credentials

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(TINY + "store: {uri: 'mongodb://alice:pw@db.example.org/cscflow'}\n")
    with pytest.raises(StoreError, match="contains credentials"):
        check_no_credentials(load_spec(spec_file).store)
    spec_file.write_text(TINY + "store: {uri: 'mongodb://${U}:${P}@db.example.org/cscflow?authSource=admin'}\n")
    check_no_credentials(load_spec(spec_file).store)


def test_stores_and_launchpads_write_journaled(mongo_server, tmp_path):
    """A write is acknowledged only once journaled (j=True), unless the URI chooses its own concern."""
    from cscflow.config import StoreSettings
    from cscflow.dispatch import connect_launchpad
    from cscflow.stores import build_job_store, journaled_kwargs

    store = build_job_store(StoreSettings(uri=mongo_server.uri, database="t_journal"))
    store.connect()
    try:
        assert store.docs_store._collection.write_concern.document == {"j": True}
        assert store.additional_stores["data"]._chunks_collection.write_concern.document == {"j": True}
    finally:
        store.close()
    assert journaled_kwargs("mongodb://h/?w=1") == {} and journaled_kwargs("mongodb://h/db") == {"journal": True}
    lp_file = tmp_path / "lp.yaml"
    lp_file.write_text(f"host: 127.0.0.1\nport: {mongo_server.port}\nname: t_journal_fw\n")
    lp = connect_launchpad(lp_file)
    assert lp.db.write_concern.document == {"j": True}
    for template in ("my_launchpad.yaml", "jobflow_mongo.yaml", "jobflow_remote/cscflow.yaml"):
        assert "journal: true" in (CONFIGS / template).read_text(), template
