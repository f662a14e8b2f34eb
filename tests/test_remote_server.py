"""jobflow-remote with its queue on a real MongoDB-wire server (the session `mongo_server`):
`cscflow submit --jobflow-remote`, then a runner (`jf runner run`, foreground) and two local
workers, one per category as in fworker_configs/jobflow_remote/, execute the tiny exploration;
every job ran once on its category's worker and `cscflow status` reads the results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_dispatch import TINY

pytest.importorskip("jobflow_remote")

BIN = Path(sys.executable).parent
WORKERS = {"gpu": "gpu_worker", "cpu": "cpu_worker"}  # the names of fworker_configs/jobflow_remote/cscflow.yaml


def _project(tmp_path: Path, port: int, db: str) -> dict:
    mongo = {"host": "127.0.0.1", "port": port, "database": db, "mongoclient_kwargs": {"journal": True}}
    env = f"export OMP_NUM_THREADS=1 PATH={BIN}:$PATH PYTHONPATH={os.environ.get('PYTHONPATH', '')}"
    return {
        "name": "cscflow_test",
        "workers": {
            name: {"type": "local", "scheduler_type": "shell", "work_dir": str(tmp_path / name), "pre_run": env,
                   "timeout_execute": 120}
            for name in WORKERS.values()
        },
        "queue": {"store": {"type": "MongoStore", "collection_name": "jf_jobs", **mongo}},
        "jobstore": {
            "docs_store": {"type": "MongoStore", "collection_name": "outputs", **mongo},
            "additional_stores": {"data": {"type": "GridFSStore", "collection_name": "outputs_data", **mongo}},
        },
        "runner": {"delay_checkout": 1, "delay_check_run_status": 1, "delay_advance_status": 1},
    }


@pytest.mark.slow  # 930 s here (2 cores at load 12): jobflow-remote starts one Python process per job
@pytest.mark.timeout(1800)
def test_jobflow_remote_queue_on_the_server_runs_the_exploration(mongo_server, tmp_path):
    import pymongo

    db_name = "cscflow_jfr"
    projects = tmp_path / "projects"
    projects.mkdir()
    (projects / "cscflow_test.yaml").write_text(yaml.safe_dump(_project(tmp_path, mongo_server.port, db_name)))
    env = {**os.environ, "JFREMOTE_PROJECTS_FOLDER": str(projects), "JFREMOTE_PROJECT": "cscflow_test",
           "OMP_NUM_THREADS": "1"}
    spec = tmp_path / "tiny_jfr.yaml"
    spec.write_text(TINY.replace("name: tiny\n", "name: tiny_jfr\n") + f"""store: {{uri: "{mongo_server.uri}", database: {db_name}}}
dispatch:
  remote_workers:
    gpu: {{worker: gpu_worker}}
    cpu: {{worker: cpu_worker}}
""")
    jf = str(BIN / "jf")
    out = subprocess.run([jf, "admin", "reset", "--yes"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "run"
    out = subprocess.run([str(BIN / "cscflow"), "submit", str(spec), "--jobflow-remote", "cscflow_test",
                          "--run-dir", str(run_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

    client = pymongo.MongoClient(mongo_server.uri)
    jobs = client[db_name]["jf_jobs"]
    log = open(tmp_path / "runner.log", "w")
    runner = subprocess.Popen([jf, "runner", "run"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    start = time.time()
    try:
        deadline = time.time() + 1600
        while time.time() < deadline:
            states = {d["job"]["name"]: d["state"] for d in jobs.find({}, {"job.name": 1, "state": 1})}
            assert not {"FAILED", "REMOTE_ERROR"} & set(states.values()), states
            trigger_done = [n for n, s in states.items() if n == "explore after it2" and s == "COMPLETED"]
            if trigger_done and set(states.values()) == {"COMPLETED"}:
                break
            assert runner.poll() is None, (tmp_path / "runner.log").read_text()[-3000:]
            time.sleep(2)
        else:
            raise AssertionError(f"timed out: {states}")
    finally:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            runner.kill()
    seconds = time.time() - start

    from cscflow.runner import load_run

    _, resolved = load_run(run_dir)
    docs = list(jobs.find({}))
    print(f"\n{len(docs)} jobs in {seconds:.0f} s")
    for d in sorted(docs, key=lambda d: d["job"]["name"]):
        want = WORKERS[resolved.dispatch.category(d["job"]["metadata"]["stage"])]
        assert d["worker"] == want, (d["job"]["name"], d["worker"])
        print(f"  {d['job']['name']}: {d['worker']}")
    assert len({(d["uuid"], d["index"]) for d in docs}) == len(docs)  # each job once in the queue
    outputs = client[db_name]["outputs"]
    for d in docs:
        assert outputs.count_documents({"uuid": d["uuid"], "index": d["index"]}) == 1, d["job"]["name"]
    status = subprocess.run([str(BIN / "cscflow"), "status", str(run_dir)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "finished: max_iterations (2) reached" in status.stdout, status.stdout + status.stderr
    client.close()
