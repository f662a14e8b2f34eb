"""FireWorks dispatch: categories across dynamic iterations, config files, `cscflow submit`,
and a two-iteration exploration run to completion by separate GPU-only and CPU-only `rlaunch`
processes on a mongomock LaunchPad, then browsed with `lpad webgui` on a copy."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
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
training: {backend: deepmd, numb_steps: 4, decay_steps: 2, n_train: 50, n_dim: 8, e_dim: 8, a_dim: 4, nlayers: 1}
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

    from cscflow.loop import _tag_trigger, exploration_step

    store = JobStore(MemoryStore())
    store.connect()
    trigger = exploration_step(state)
    _tag_trigger(trigger, spec, state.run_id, state.iteration)
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


# --------------------------------------------------------------------------- end to end


def _local_db(run_dir: Path) -> dict:
    """The mongomock LaunchPad as FireWorks persisted it: {collection: [documents]}."""
    from bson import json_util

    raw = json_util.loads((run_dir / "fireworks" / "launchpad.json").read_text())
    db = raw["cscflow_fireworks"]
    return {name: [doc for _, doc in coll["documents"]] for name, coll in db.items()}


def _rlaunch(run_dir: Path, worker: Path, env) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "rlaunch"), "-l", str(run_dir / "fireworks" / "my_launchpad.yaml"), "-w", str(worker),
           "rapidfire", "--max_loops", "1", "--sleep", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=run_dir / "jobs", timeout=600)


@pytest.mark.timeout(900)
def test_two_iterations_on_gpu_and_cpu_workers_then_webgui(tmp_path, tiny_spec):
    from cscflow.runner import format_status, load_run, rebuild_state
    from cscflow.stores import build_job_store

    run_dir = tmp_path / "run"
    out = _cli("submit", str(tiny_spec), "--local", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ONE rlaunch at a time" in out.stdout
    env_lines = (run_dir / "worker_env.sh").read_text().splitlines()
    worker_env = dict(line.removeprefix("export ").split("=", 1) for line in env_lines if line.startswith("export "))
    assert set(worker_env) == {"FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE"}
    env = _env(**worker_env)
    assert len(_local_db(run_dir)["fireworks"]) == 4

    # Alternate single GPU-only and CPU-only workers (the mongomock file is single-writer).
    workers = {"cscflow_gpu": CONFIGS / "gpu" / "my_fworker.yaml", "cscflow_cpu": CONFIGS / "cpu" / "my_fworker.yaml"}
    logs = []
    for _ in range(12):
        launched = 0
        for worker in workers.values():
            before = len(_local_db(run_dir).get("launches", []))
            result = _rlaunch(run_dir, worker, env)
            logs.append(result.stdout[-3000:] + result.stderr[-3000:])
            assert result.returncode == 0, logs[-1]
            launched += len(_local_db(run_dir).get("launches", [])) - before
        states = {fw["state"] for fw in _local_db(run_dir)["fireworks"]}
        if states == {"COMPLETED"}:
            break
        assert launched, f"no worker could run anything; states {states}\n" + "\n".join(logs[-2:])
    db = _local_db(run_dir)
    fws = db["fireworks"]
    assert {fw["state"] for fw in fws} == {"COMPLETED"}, "\n".join(logs[-2:])
    assert [wf["state"] for wf in db["workflows"]] == ["COMPLETED"]

    run_id, spec = load_run(run_dir)
    launch_worker = {launch["launch_id"]: launch["fworker"]["name"] for launch in db["launches"]}
    seen = set()
    for fw in fws:
        stage, k = fw["spec"]["stage"], fw["spec"]["iteration"]
        seen.add((k, stage))
        assert fw["spec"]["run_id"] == run_id
        want = spec.dispatch.category(stage) or spec.dispatch.category("trigger")
        assert fw["spec"].get("_category") == want, (fw["name"], fw["spec"].get("_category"))
        ran_on = {launch_worker[i] for i in fw["launches"]}
        assert ran_on == {f"cscflow_{want}"}, (fw["name"], ran_on)
    for stage in ("generate", "relax", "train"):
        assert (2, stage) in seen
    assert {(k, s) for k, s in seen if s == "trigger"} == {(0, "trigger"), (1, "trigger"), (2, "trigger")}

    # Results are in the run's embedded store and the usual tools read them.
    store = build_job_store(spec.store, run_dir)
    store.connect()
    try:
        state = rebuild_state(store, run_id, spec)
        assert state.converged and [d.iteration for d in state.history] == [1, 2]
        scored = store.query_one({"metadata.run_id": run_id, "metadata.stage": "score", "metadata.iteration": 2}, load=True)
        assert scored["output"]["candidates"] and all("e_hull" in c for c in scored["output"]["candidates"])
        train = store.query_one({"metadata.run_id": run_id, "metadata.stage": "train", "metadata.iteration": 2}, load=True)
        assert Path(train["output"]["model_path"]).is_file()
        _run_documented_queries(store, run_id)
    finally:
        store.close()
    assert "finished: max_iterations" in format_status(run_dir)

    # The web GUI, on a copy of the LaunchPad file, loopback only; stopped by the test.
    copy_dir = tmp_path / "gui"
    copy_dir.mkdir()
    shutil.copy(run_dir / "fireworks" / "launchpad.json", copy_dir / "launchpad.json")
    (copy_dir / "FW_config.yaml").write_text(yaml.safe_dump({"MONGOMOCK_SERVERSTORE_FILE": str(copy_dir / "launchpad.json")}))
    port = _free_port()
    gui = subprocess.Popen(
        [str(BIN / "lpad"), "-l", str(run_dir / "fireworks" / "my_launchpad.yaml"), "webgui", "-s",
         "--host", "127.0.0.1", "--port", str(port), "--nworkers", "1"],
        env=_env(FW_CONFIG_FILE=str(copy_dir / "FW_config.yaml")), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wf_id = min(fw["fw_id"] for fw in fws)
        url = f"http://127.0.0.1:{port}/wf/{wf_id}"
        deadline, status, body = time.time() + 90, None, ""
        while time.time() < deadline and status is None:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    status, body = resp.status, resp.read().decode()
            except OSError:
                assert gui.poll() is None, gui.stdout.read().decode()[-2000:]
                time.sleep(1)
        assert status == 200
        assert f"cscflow tiny {run_id}" in body
    finally:
        gui.terminate()
        gui.wait(timeout=30)
    assert gui.returncode is not None


def test_literal_store_credentials_are_refused_but_variables_pass(tmp_path):
    from cscflow.config import load_spec
    from cscflow.stores import StoreError, check_no_credentials

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(TINY + "store: {uri: 'mongodb://alice:pw@db.example.org/cscflow'}\n")
    with pytest.raises(StoreError, match="contains credentials"):
        check_no_credentials(load_spec(spec_file).store)
    spec_file.write_text(TINY + "store: {uri: 'mongodb://${U}:${P}@db.example.org/cscflow?authSource=admin'}\n")
    check_no_credentials(load_spec(spec_file).store)


def _run_documented_queries(store, run_id):
    """The ready-to-paste queries of docs/cluster.md, run on this finished exploration.

    pymongo blocks get a mongomock collection holding the same job documents.
    """
    import contextlib
    import io
    import re

    import mongomock

    text = (REPO / "docs" / "cluster.md").read_text()
    section = text.split("<!-- queries:begin -->", 1)[1].split("<!-- queries:end -->", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 4
    docs = mongomock.MongoClient()["cscflow"]["outputs"]
    docs.insert_many([{k: v for k, v in d.items() if k != "_id"} for d in store.docs_store.query({})])
    namespace = {"store": store, "docs": docs, "run_id": run_id}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, "docs/cluster.md", "exec"), namespace)
    out = printed.getvalue()
    assert namespace["doc"]["metadata"]["iteration"] == 2
    assert all(c["e_hull"] < 0.03 and c["is_stable"] for c in namespace["sun"])
    assert namespace["training_set"] and len(namespace["training_set"]) == len(namespace["train_ids"])
    assert sorted(namespace["history"]) == [1, 2]
    assert "finished: max_iterations" in out
    assert "DFT frames from" in out
    assert namespace["latest"]["provenance"]["candidate_id"] == namespace["cid"]
    assert namespace["latest"]["provenance"]["iteration"] == 2
