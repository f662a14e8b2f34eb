"""FireWorks laptop mode on a real MongoDB-wire server (secantusd-py, its own process).

`cscflow submit --local` starts the run's server; these tests then run the tiny two-iteration
exploration with concurrent `rlaunch` processes (two GPU, one CPU) and check launch counts,
workers, the results store (MongoStore + GridFS), `cscflow status` against `cscflow explore`,
the documented queries with pymongo, and the web GUI. The recovery tests kill -9 a worker
mid-job (then `lpad detect_lostruns --rerun`) and kill -9 the server mid-run (restart on
the same directory): the workflow completes and only the killed job ran twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dbserver import require_server_executable
from test_dispatch import TINY, _env, _free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# one iteration (it0 + it1) is enough to kill things in the middle of
ONE_ITERATION = TINY.replace("max_iterations: 2", "max_iterations: 1")
SCREENSHOTS = REPO / "docs" / "images"  # webgui_workflow.png (graph), webgui_fireworks.png (names, states)


class LocalRun:
    """A `cscflow submit --local` run: its LaunchPad database, workers, and the CLI on it."""

    def __init__(self, run_dir: Path, spec_text: str):
        self.run_dir = run_dir
        spec = run_dir.parent / f"{run_dir.name}.yaml"
        spec.write_text(spec_text)
        self.spec = spec
        out = self.cli("submit", str(spec), "--local", "--run-dir", str(run_dir))
        assert out.returncode == 0, out.stdout + out.stderr
        self.submit_output = out.stdout
        lines = (run_dir / "worker_env.sh").read_text().splitlines()
        self.worker_env = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
        self.lp_file = run_dir / "fireworks" / "my_launchpad.yaml"
        self.workers: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()

    def cli(self, *args, timeout=300):
        return subprocess.run([str(BIN / "cscflow"), *args], capture_output=True, text=True, env=_env(),
                              cwd=self.run_dir.parent, timeout=timeout)

    def db(self):
        import pymongo

        lp = yaml.safe_load(self.lp_file.read_text())
        client = pymongo.MongoClient(lp["host"], lp["port"], serverSelectionTimeoutMS=20000, **lp["mongoclient_kwargs"])
        return client[lp["name"]]

    def start_worker(self, name: str, category: str) -> subprocess.Popen:
        """One `rlaunch rapidfire` process as `cscflow submit` prints it, under its own worker name."""
        fworker = self.run_dir / "fireworks" / f"fworker_{category}.yaml"
        own = self.run_dir / "fireworks" / f"test_{name}.yaml"
        own.write_text(yaml.safe_dump({**yaml.safe_load(fworker.read_text()), "name": name}))
        log = open(self.run_dir / f"{name}.log", "a")
        proc = subprocess.Popen(
            [str(BIN / "rlaunch"), "-w", str(own), "rapidfire", "--nlaunches", "infinite", "--sleep", "1"],
            cwd=self.run_dir / "jobs", env=_env(**self.worker_env), stdout=log, stderr=subprocess.STDOUT,
        )
        self.workers[name] = proc
        return proc

    def states(self) -> dict[str, str]:
        return {fw["name"]: fw["state"] for fw in self.db().fireworks.find({}, {"name": 1, "state": 1})}

    def wait(self, condition, timeout=600, what="the workflow to finish"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.states()
            if condition(states):
                return states
            for name, proc in self.workers.items():
                assert proc.poll() is None or name in self.killed, f"worker {name} exited: {self.tail(name)}"
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}: {self.states()}")

    def wait_completed(self, timeout=600):
        return self.wait(lambda s: s and set(s.values()) == {"COMPLETED"}, timeout)

    def tail(self, name: str) -> str:
        return (self.run_dir / f"{name}.log").read_text()[-3000:]

    def stop_workers(self):
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def launches(self) -> dict[str, list[dict]]:
        """Firework name -> every launch it had (current and archived by a rerun)."""
        db = self.db()
        by_id = {launch["launch_id"]: launch for launch in db.launches.find({})}
        return {fw["name"]: [by_id[i] for i in fw.get("archived_launches", []) + fw["launches"]]
                for fw in db.fireworks.find({})}

    def close(self):
        self.stop_workers()
        self.cli("server", "stop", str(self.run_dir))


@pytest.fixture(scope="module")
def explored(tmp_path_factory):
    """The tiny two-iteration exploration, finished by three concurrent workers (gpu, gpu, cpu)."""
    require_server_executable()
    base = tmp_path_factory.mktemp("server_e2e")
    run = LocalRun(base / "run", TINY)
    try:
        start = time.time()
        for name, category in (("gpu_a", "gpu"), ("gpu_b", "gpu"), ("cpu_a", "cpu")):
            run.start_worker(name, category)
        run.wait_completed()
        run.seconds = time.time() - start
        run.stop_workers()
        yield run
    finally:
        run.close()


def test_submit_local_prints_one_worker_command_per_category(explored):
    out = explored.submit_output
    assert "ONE" not in out and "mongomock" not in out
    assert out.count("rlaunch -w") == 2 and "fworker_gpu.yaml" in out and "fworker_cpu.yaml" in out
    assert f"cscflow server stop {explored.run_dir}" in out
    run = json.loads((explored.run_dir / "run.json").read_text())
    assert run["dispatch"] == "fireworks-local" and run["spec"]["store"]["uri"].startswith("mongodb://127.0.0.1:")
    lp = yaml.safe_load(explored.lp_file.read_text())
    assert lp["mongoclient_kwargs"]["journal"] is True
    store_cfg = yaml.safe_load((explored.run_dir / "jobflow.yaml").read_text())["JOB_STORE"]
    assert store_cfg["docs_store"]["@class"] == "MongoStore" and store_cfg["additional_stores"]["data"]["@class"] == "GridFSStore"
    assert store_cfg["docs_store"]["mongoclient_kwargs"]["journal"] is True


def test_three_concurrent_workers_run_every_job_once_on_its_category(explored):
    from cscflow.runner import load_run
    from cscflow.stores import build_job_store

    run_id, spec = load_run(explored.run_dir)
    launches = explored.launches()
    db = explored.db()
    fws = list(db.fireworks.find({}))
    assert [wf["state"] for wf in db.workflows.find({})] == ["COMPLETED"]
    assert {(fw["spec"]["iteration"], fw["spec"]["stage"]) for fw in fws} >= {(2, "train"), (2, "trigger"), (1, "label")}
    workers_used = set()
    for fw in fws:
        ran = launches[fw["name"]]
        assert len(ran) == 1, (fw["name"], [launch["fworker"]["name"] for launch in ran])  # exactly once
        want = spec.dispatch.category(fw["spec"]["stage"])
        worker = ran[0]["fworker"]
        assert worker["category"] == want and worker["name"].startswith(want), (fw["name"], worker)
        workers_used.add(worker["name"])
    assert db.launches.count_documents({}) == len(fws)
    assert {"cpu_a"} < workers_used <= {"gpu_a", "gpu_b", "cpu_a"}
    print(f"\n{len(fws)} Fireworks, 3 workers, {explored.seconds:.0f} s")
    for name in sorted(launches):
        print(f"  {name}: {len(launches[name])} launch on {launches[name][0]['fworker']['name']}")

    # every job's output is in the MongoStore (references in GridFS), candidates one document each
    store = build_job_store(spec.store, explored.run_dir)
    store.connect()
    try:
        assert type(store.docs_store).__name__ == "MongoStore" and type(store.additional_stores["data"]).__name__ == "GridFSStore"
        for fw in fws:
            job_ = fw["spec"]["_tasks"][0]["job"]
            doc = store.query_one({"uuid": job_["uuid"], "index": job_["index"]}, load=True)
            assert doc is not None, fw["name"]
            # a trigger that adds the next iteration, and a stage that fans out (generate, relax,
            # label), replace themselves: the output is at the next index of the same uuid
            replaced = store.query_one({"uuid": job_["uuid"], "index": job_["index"] + 1}) is not None
            assert doc["output"] is not None or fw["spec"]["stage"] == "trigger" or replaced, fw["name"]
        scored = store.query_one({"metadata.run_id": run_id, "metadata.stage": "score", "metadata.iteration": 2}, load=True)
        from cscflow.structure_store import load_candidates  # one document per candidate, on the server

        cands = load_candidates(scored["output"]["candidates"], store)
        assert cands and all(c.e_hull is not None for c in cands if c.status == "relaxed")
        assert store.additional_stores["data"].count() > 0
    finally:
        store.close()

    # `cscflow status` of the FireWorks run equals that of `cscflow explore` on the same spec
    status = explored.cli("status", str(explored.run_dir))
    assert status.returncode == 0, status.stderr
    local = explored.cli("explore", str(explored.spec), "--run-dir", str(explored.run_dir.parent / "explored"))
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    want = explored.cli("status", str(explored.run_dir.parent / "explored")).stdout
    assert status.stdout == want and "finished: max_iterations" in want


def test_documented_queries_run_against_the_server(explored):
    """The docs/cluster.md query blocks, with maggma on the run's store and pymongo on the server."""
    import pymongo

    from cscflow.runner import load_run
    from cscflow.stores import build_job_store

    run_id, spec = load_run(explored.run_dir)
    store = build_job_store(spec.store, explored.run_dir)
    store.connect()
    client = pymongo.MongoClient(spec.store.uri)
    try:
        _run_documented_queries(store, run_id, docs=client[spec.store.database][spec.store.docs_collection])
    finally:
        store.close()
        client.close()


def _serve_dir(directory: Path) -> tuple[ThreadingHTTPServer, int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


def test_webgui_on_the_server_shows_the_workflow(explored, tmp_path):
    """`lpad webgui` against the live server; headless Chromium screenshots the workflow page.

    The page loads jQuery from code.jquery.com: offline the workflow graph stays blank. The test
    maps that host to a local copy of Debian's jQuery (Chromium --host-resolver-rules) if present.
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed")
    from cscflow.runner import load_run

    run_id, _ = load_run(explored.run_dir)
    db = explored.db()
    wf = db.workflows.find_one({})
    port = _free_port()
    gui = subprocess.Popen(
        [str(BIN / "lpad"), "webgui", "-s", "--host", "127.0.0.1", "--port", str(port), "--nworkers", "1"],
        env=_env(**explored.worker_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    httpd = None
    try:
        url = f"http://127.0.0.1:{port}/wf/{wf['nodes'][0]}"
        deadline, body = time.time() + 90, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    body = resp.read().decode()
            except OSError:
                assert gui.poll() is None, gui.stdout.read().decode()[-2000:]
                time.sleep(1)
        assert body is not None and f"cscflow tiny {run_id}" in body
        for name in ("train it2", "label it1", "explore after it2"):
            assert name in body
        assert "COMPLETED" in body
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--window-size=1400,1000", "--virtual-time-budget=8000"]
        jquery = Path("/usr/share/javascript/jquery/jquery.min.js")
        if jquery.is_file():
            (tmp_path / "js").mkdir()
            shutil.copy(jquery, tmp_path / "js" / "jquery.min.js")
            httpd, js_port = _serve_dir(tmp_path / "js")
            args.append(f"--host-resolver-rules=MAP code.jquery.com 127.0.0.1:{js_port}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fw/COMPLETED/", timeout=30) as resp:
            listing = resp.read().decode()
        names = {fw["name"] for fw in explored.db().fireworks.find({}, {"name": 1})}
        assert f"{len(wf['nodes'])} completed Fireworks" in listing  # 20 per page: any of them is listed
        assert any(f">{name}<" in listing or name in listing for name in names)
        pages = {"webgui_workflow.png": url, "webgui_fireworks.png": f"http://127.0.0.1:{port}/fw/COMPLETED/"}
        for name, page in pages.items():
            res = subprocess.run([*args, f"--screenshot={tmp_path / name}", page], capture_output=True, text=True,
                                 timeout=120, env={**os.environ, "HOME": str(tmp_path)})
            png = tmp_path / name
            assert png.is_file() and png.stat().st_size > 20_000, res.stderr[-2000:]
            if os.environ.get("CSCFLOW_UPDATE_SCREENSHOT"):
                SCREENSHOTS.mkdir(exist_ok=True)
                shutil.copy(png, SCREENSHOTS / name)
    finally:
        gui.terminate()
        gui.wait(timeout=30)
        if httpd is not None:
            httpd.shutdown()


def _recovery_run(tmp_path) -> LocalRun:
    require_server_executable()
    return LocalRun(tmp_path / "run", ONE_ITERATION)


def _assert_once_except(run: LocalRun, twice: set[str]) -> dict[str, list[str]]:
    """Every job ran once (the ones in `twice`: twice), the workflow completed, every output is stored."""
    from cscflow.runner import load_run
    from cscflow.stores import build_job_store

    db = run.db()
    assert [wf["state"] for wf in db.workflows.find({})] == ["COMPLETED"]
    ran_on = {name: [launch["fworker"]["name"] for launch in ls] for name, ls in run.launches().items()}
    for name, workers in ran_on.items():
        assert len(workers) == (2 if name in twice else 1), (name, workers)
    run_id, spec = load_run(run.run_dir)
    store = build_job_store(spec.store, run.run_dir)
    store.connect()
    try:
        for fw in db.fireworks.find({}):
            job_ = fw["spec"]["_tasks"][0]["job"]
            docs = list(store.query({"uuid": job_["uuid"], "index": job_["index"]}))
            assert len(docs) == 1, (fw["name"], len(docs))
    finally:
        store.close()
    status = run.cli("status", str(run.run_dir))
    assert "finished: max_iterations (1) reached" in status.stdout, status.stdout + status.stderr
    return ran_on


@pytest.mark.slow  # ~3 min here (loaded machine): waits 40 s for the lost run to expire
@pytest.mark.timeout(900)
def test_worker_killed_mid_job_is_rerun_by_detect_lostruns(tmp_path):
    """kill -9 of the GPU worker during `train it1`; `lpad detect_lostruns --rerun` as in docs/cluster.md."""
    run = _recovery_run(tmp_path)
    timeline = []
    t0 = time.time()
    try:
        run.start_worker("cpu_a", "cpu")
        victim = run.start_worker("gpu_a", "gpu")
        run.wait(lambda s: s.get("train it1") == "RUNNING", timeout=400, what="train it1 to start")
        time.sleep(3)  # DPA-3 training of the tiny model takes ~10 s: kill it in the middle
        assert run.states()["train it1"] == "RUNNING"
        victim.kill()
        victim.wait()
        run.killed.add("gpu_a")
        timeline.append((time.time() - t0, "kill -9 gpu_a during train it1"))
        # FireWorks still shows it RUNNING; once it has missed its pings it is a lost run
        lpad = [str(BIN / "lpad"), "detect_lostruns", "--rerun"]
        deadline = time.time() + 120
        while True:
            out = subprocess.run(lpad, capture_output=True, text=True, env=_env(**run.worker_env), timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            if run.states()["train it1"] != "RUNNING" or time.time() > deadline:
                break
            time.sleep(5)
        timeline.append((time.time() - t0, f"lpad detect_lostruns --rerun: train it1 {run.states()['train it1']}"))
        assert run.states()["train it1"] == "READY"
        run.start_worker("gpu_b", "gpu")
        run.wait_completed()
        timeline.append((time.time() - t0, "workflow COMPLETED"))
        run.stop_workers()
        ran_on = _assert_once_except(run, twice={"train it1"})
        assert ran_on["train it1"] == ["gpu_a", "gpu_b"]
        print("\n" + "\n".join(f"  {t:6.1f} s  {what}" for t, what in timeline))
        print("  launches: " + ", ".join(f"{k}: {'+'.join(v)}" for k, v in sorted(ran_on.items())))
    finally:
        run.close()


@pytest.mark.slow  # ~2 min here
@pytest.mark.timeout(900)
def test_server_killed_mid_run_restarts_on_its_directory_and_nothing_is_lost(tmp_path):
    """kill -9 of the database server while workers run; restart on the same data directory and port."""
    from cscflow.localserver import LocalServer

    run = _recovery_run(tmp_path)
    timeline = []
    t0 = time.time()
    try:
        run.start_worker("gpu_a", "gpu")
        run.start_worker("cpu_a", "cpu")
        before = run.wait(lambda s: s.get("label it1") == "COMPLETED", timeout=400, what="label it1")
        server = LocalServer(run.run_dir / "db")
        port = server.port
        n_done = sum(v == "COMPLETED" for v in before.values())
        server.kill()
        timeline.append((time.time() - t0, f"kill -9 server ({n_done} Fireworks COMPLETED, train it1 {before.get('train it1')})"))
        time.sleep(2)
        server = LocalServer(run.run_dir / "db").start()
        assert server.port == port
        timeline.append((time.time() - t0, f"server restarted on {run.run_dir / 'db'} (same port)"))
        after = run.states()
        assert {k for k, v in before.items() if v == "COMPLETED"} <= {k for k, v in after.items() if v == "COMPLETED"}
        run.wait_completed()
        timeline.append((time.time() - t0, "workflow COMPLETED"))
        run.stop_workers()
        ran_on = _assert_once_except(run, twice=set())
        print("\n" + "\n".join(f"  {t:6.1f} s  {what}" for t, what in timeline))
        print("  launches: " + ", ".join(f"{k}: {'+'.join(v)}" for k, v in sorted(ran_on.items())))
    finally:
        run.close()


def _run_documented_queries(store, run_id, docs):
    """The ready-to-paste queries of docs/cluster.md, run on this finished exploration
    (`store`: maggma JobStore, `docs`: the pymongo collection of job documents)."""
    import contextlib
    import io
    import re

    text = (REPO / "docs" / "cluster.md").read_text()
    section = text.split("<!-- queries:begin -->", 1)[1].split("<!-- queries:end -->", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 4
    namespace = {"store": store, "docs": docs, "run_id": run_id}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, "docs/cluster.md", "exec"), namespace)
    out = printed.getvalue()
    assert all(c["e_hull"] < 0.03 and c["is_stable"] and c["iteration"] == 2 for c in namespace["sun"])
    assert namespace["training_set"] and len(namespace["training_set"]) == len(namespace["train_ids"])
    assert sorted(namespace["history"]) == [1, 2]
    assert "finished: max_iterations" in out
    assert "DFT frames from" in out
    # the candidate's document of every stage it went through, from the collection
    cid = namespace["cid"]
    stages = [line.split()[0] for line in out.splitlines() if line.split()[:1] and line.split()[0] in
              ("generate", "relax", "score", "select")]
    assert {"generate", "relax", "score"} <= set(stages), out
    assert cid.startswith("it")
