"""Same spec, same seed, same stored numbers (issue 18): straight through, resumed after
kill -9 at several stages, and run by a FireWorks worker; and a second `resume` started
while one runs is refused with one line naming the holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cscflow.runlock import holder
from cscflow.runner import format_status, load_run
from cscflow.stores import build_job_store
from test_dispatch import TINY  # the dispatch tests' two-iteration spec, same numbers

BIN = Path(sys.executable).parent


KILL_AT = ["select it1", "generate it2", "train it2"]  # after the first entropy stage, too


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MONGOMOCK_SERVERSTORE_FILE", "FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE", "NUMBA_NUM_THREADS")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _cscflow(*args, **kw):
    return subprocess.run([str(BIN / "cscflow"), *args], capture_output=True, text=True, env=_env(), timeout=600, **kw)


def _explore_killed_at(spec: Path, run_dir: Path, job_name: str) -> None:
    proc = subprocess.Popen([str(BIN / "cscflow"), "explore", str(spec), "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    lines, deadline = [], time.time() + 600
    for line in proc.stdout:
        lines.append(line)
        if f"Starting job - {job_name} " in line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines[-20:])


def stored_numbers(run_dir: Path) -> dict:
    """Every stored energy and metric of the run, by iteration, stage and id."""
    run_id, spec = load_run(run_dir)
    store = build_job_store(spec.store, run_dir)
    store.connect()
    numbers = {}
    try:
        for doc in store.query({"metadata.run_id": run_id, "output": {"$ne": None}}, load=True):
            meta, out = doc["metadata"], doc["output"]
            where = (meta.get("iteration"), meta.get("stage"))
            if not isinstance(out, dict):
                continue
            for key in ("energy_rmse", "force_rmse", "entropy_candidates", "entropy_training"):
                if out.get(key) is not None:
                    numbers[(*where, key)] = out[key]
        # candidates and frames: one document each in the run's collections
        from cscflow.structure_store import CANDIDATES, FRAMES, collection_for

        for name in (CANDIDATES, FRAMES):
            collection = collection_for(store, name)
            collection.connect()
            for doc in collection.query({"run_id": run_id}):
                where = (doc["iteration"], doc["stage"], doc["id"])
                numbers[where] = (doc.get("energy_per_atom"), doc.get("e_hull")) if name == CANDIDATES else doc["energy"]
            collection.close()
    finally:
        store.close()
    assert any(k[1] == "label" for k in numbers) and any(k[1] == "score" for k in numbers)
    return numbers


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_straight_resumed_and_fireworks_runs_store_the_same_numbers(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    straight = tmp_path / "straight"
    out = _cscflow("explore", str(spec), "--run-dir", str(straight))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reference = stored_numbers(straight)
    table = format_status(straight)
    assert "finished: max_iterations" in table and len(reference) > 20
    print(f"straight ({len(reference)} stored numbers):\n{table}")

    for i, job_name in enumerate(KILL_AT):
        run_dir = tmp_path / f"killed{i}"
        _explore_killed_at(spec, run_dir, job_name)
        resumed = subprocess.Popen([str(BIN / "cscflow"), "resume", str(run_dir)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=_env())
        if i == 0:  # a second resume while the first runs: refused, one line, the first unharmed
            deadline = time.time() + 120
            while (holder(run_dir) or {}).get("pid") != resumed.pid:  # the killed explore's record stays
                assert time.time() < deadline and resumed.poll() is None
                time.sleep(0.2)
            second = _cscflow("resume", str(run_dir))
            assert second.returncode == 2, second.stdout + second.stderr
            assert f"in use by pid {resumed.pid} on " in second.stderr and "cscflow resume" in second.stderr
            assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        log = resumed.communicate(timeout=600)[0]
        assert resumed.returncode == 0, log[-3000:]
        print(f"killed -9 at {job_name!r}, resumed:\n{format_status(run_dir)}")
        assert format_status(run_dir) == table, job_name
        assert stored_numbers(run_dir) == reference, job_name

    fw_dir = tmp_path / "fireworks"
    out = _cscflow("submit", str(spec), "--local", "--run-dir", str(fw_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    worker_env = dict(line.removeprefix("export ").split("=", 1)
                      for line in (fw_dir / "worker_env.sh").read_text().splitlines() if line.startswith("export "))
    # one worker for every category (an FWorker without a category takes any Firework)
    (fw_dir / "fireworks" / "fworker_all.yaml").write_text("name: laptop_all\ncategory: ''\nquery: '{}'\n")
    rlaunch = subprocess.run(
        [str(BIN / "rlaunch"), "-l", str(fw_dir / "fireworks" / "my_launchpad.yaml"), "-w",
         str(fw_dir / "fireworks" / "fworker_all.yaml"), "rapidfire", "--sleep", "1"],
        capture_output=True, text=True, env=_env(**worker_env), cwd=fw_dir / "jobs", timeout=900)
    assert rlaunch.returncode == 0, rlaunch.stdout[-3000:] + rlaunch.stderr[-3000:]
    print(f"FireWorks (submit --local, rlaunch rapidfire):\n{format_status(fw_dir)}")
    assert format_status(fw_dir) == table
    assert stored_numbers(fw_dir) == reference
