"""Bad input and damaged or shared run directories (issue 18): checks before anything is
written, no credential in any file, prerequisites in `validate`, read-only and truncated
stores, one process per run directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cscflow.cli import main
from cscflow.config import SpecError, StoreSettings, load_spec
from cscflow.runlock import RunLocked, acquire, holder, release
from cscflow.runner import explore, format_status, record_run
from cscflow.stores import build_job_store

TINY = """
name: tiny
chemical_system: {elements: [Li, S], min_atoms: 2, max_atoms: 4}
seed: 3
generator: {backend: pyxtal, num_per_condition: 2, conditions: [0.06]}
relax: {fmax: 0.3, steps: 20}
labeller: {backend: teacher, copies_per_structure: 1}
training: {backend: none}
convergence: {max_iterations: 1}
"""

LI2S_POSCAR = """Li2S
1.0
0 2.855 2.855
2.855 0 2.855
2.855 2.855 0
S Li
1 2
direct
0 0 0 S
0.25 0.25 0.25 Li
0.75 0.75 0.75 Li
"""
NACL_POSCAR = LI2S_POSCAR.replace("S Li", "Cl Na").replace(" S\n", " Cl\n").replace(" Li\n", " Na\n")


def _spec(tmp_path: Path, extra: str = "", name="s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(TINY + extra)
    return path


def _validate(spec: Path):
    return CliRunner().invoke(main, ["validate", str(spec)])


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ nothing written, no credentials


def test_unreachable_store_writes_nothing_and_a_fixed_spec_then_runs_its_checks(tmp_path):
    run_dir = tmp_path / "run"
    bad = _spec(tmp_path, "store: {uri: 'mongodb://127.0.0.1:1/db', timeout_ms: 300}\n")
    with pytest.raises(SpecError, match="cannot reach MongoDB.*fix the spec and start again"):
        explore(bad, run_dir)
    assert not run_dir.exists()


def test_literal_credentials_are_never_written(tmp_path):
    run_dir = tmp_path / "run"
    spec = _spec(tmp_path, "store: {uri: 'mongodb://user:secret@127.0.0.1:1/db', timeout_ms: 300}\n")
    result = CliRunner().invoke(main, ["explore", str(spec), "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and "contains credentials" in result.output
    assert "secret" not in result.output
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != spec]
    assert not any("secret" in p.read_text(errors="ignore") for p in written), written
    assert not run_dir.exists()


# ------------------------------------------------------------------ prerequisites in validate


@pytest.mark.parametrize("extra, needle", [
    ("labeller: {backend: vasp}\n", "VASP"),
    ("labeller: {backend: cp2k, cp2k: {command: no-such-cp2k}}\n", "no-such-cp2k"),
    ("store: {uri: 'mongodb://127.0.0.1:1/db', timeout_ms: 300}\n", "cannot reach MongoDB"),
    ("seeds: [empty.cif]\n", "empty.cif"),
    ("seeds: [garbage.vasp]\n", "garbage.vasp"),
    ("seeds: [nacl.vasp]\nseed_errors: raise\n", "outside the chemical system"),
])
def test_validate_fails_on_each_missing_prerequisite(tmp_path, monkeypatch, extra, needle):
    monkeypatch.setenv("ATOMATE2_VASP_CMD", "no-such-vasp_std")
    (tmp_path / "empty.cif").write_text("")
    (tmp_path / "garbage.vasp").write_text("garbage\n")
    (tmp_path / "nacl.vasp").write_text(NACL_POSCAR)
    spec = tmp_path / "s.yaml"
    spec.write_text(TINY.replace("labeller: {backend: teacher, copies_per_structure: 1}\n", "") + extra)
    result = _validate(spec)
    assert result.exit_code == 2, result.output
    errors = _error_lines(result)
    assert len(errors) == 1 and needle in errors[0] and "fix the spec and start again" in errors[0], result.output
    assert "Traceback" not in result.output


def test_skipped_seeds_are_reported_once_with_the_right_advice(tmp_path):
    (tmp_path / "nacl.vasp").write_text(NACL_POSCAR)
    (tmp_path / "li2s.vasp").write_text(LI2S_POSCAR)
    ok = _validate(_spec(tmp_path, "seeds: [nacl.vasp, li2s.vasp]\n"))
    assert ok.exit_code == 0, ok.output
    warnings = [line for line in ok.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "nacl.vasp" in warnings[0] and "outside the chemical system" in warnings[0]
    alone = _validate(_spec(tmp_path, "seeds: [nacl.vasp]\nuse_prototypes: false\n"))
    assert alone.exit_code == 2
    assert "none of the 1 seed file(s) holds a usable structure" in alone.output
    assert "list seed files under seeds" not in alone.output


# ------------------------------------------------------------------ read-only and damaged stores


def _small_run(run_dir: Path, spec_path: Path) -> None:
    """A recorded run with one finished stage in its embedded store."""
    spec = load_spec(spec_path)
    record_run(run_dir, "r1", spec, spec_path, "local")
    store = build_job_store(spec.store, run_dir)
    store.connect()
    store.update({"uuid": "u1", "index": 1, "output": {"x": 1}, "completed_at": "2026",
                  "metadata": {"run_id": "r1", "iteration": 0, "stage": "references"}})
    store.close()


def _read_only(command: list[str], path: Path) -> subprocess.CompletedProcess:
    """Run `command` with `path` read-only: chmod for a normal user, a read-only bind mount for root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        try:
            return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: cannot make a read-only copy")
    script = f'mount --bind "{path}" "{path}" && mount -o remount,bind,ro "{path}" && touch "{path}/probe" 2>/dev/null && exit 99; exec "$@"'
    out = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                         env=env, timeout=300)
    if out.returncode == 99 or "mount:" in out.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {out.stderr[-200:]}")
    return out


def test_status_works_on_a_read_only_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    _small_run(run_dir, _spec(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    cscflow = str(Path(sys.executable).parent / "cscflow")
    out = _read_only([cscflow, "status", str(run_dir)], run_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(no finished iteration yet)" in out.stdout
    resume = _read_only([cscflow, "resume", str(run_dir)], run_dir)
    assert resume.returncode == 2 and "cannot write to the run directory" in resume.stderr, resume.stderr
    assert "Traceback" not in resume.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_report_on_a_read_only_run_directory_asks_for_out(tmp_path):
    run_dir = tmp_path / "run"
    _small_run(run_dir, _spec(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    cscflow = str(Path(sys.executable).parent / "cscflow")
    report = [cscflow, "report", str(run_dir), "--no-tsne", "--no-parity"]
    out = _read_only(report, run_dir)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == f"error: {run_dir} is read-only: pass --out DIR"
    elsewhere = tmp_path / "elsewhere"
    out = _read_only([*report, "--out", str(elsewhere)], run_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (elsewhere / "index.html").is_file() and "report:" in out.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_a_truncated_store_file_is_one_line_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    _small_run(run_dir, _spec(tmp_path))
    damaged = run_dir / "store" / "cscflow" / "outputs.collection"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)
    result = CliRunner().invoke(main, ["status", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert str(damaged) in result.output and "damaged" in result.output
    assert len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------ one process per run directory

HOLD = """
import sys, time
from cscflow.runlock import acquire
acquire(sys.argv[1], "test holder")
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_process_is_refused_and_a_killed_holders_lock_is_recovered(tmp_path):
    run_dir = tmp_path / "run"
    _small_run(run_dir, _spec(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        info = holder(run_dir)
        assert info["pid"] == proc.pid and info["command"] == "test holder"
        with pytest.raises(RunLocked, match=f"in use by pid {proc.pid} on .*started .*test holder"):
            acquire(run_dir)
        result = CliRunner().invoke(main, ["resume", str(run_dir)])
        assert result.exit_code == 2 and f"pid {proc.pid}" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert holder(run_dir) is None  # the kernel dropped the killed holder's lock
    acquire(run_dir, "second")
    try:
        assert holder(run_dir)["pid"] == os.getpid()
    finally:
        release(run_dir)
    assert (run_dir / "run.lock").read_text() == ""


def test_laptop_workers_store_takes_the_run_lock(tmp_path):
    run_dir = tmp_path / "run"
    store = build_job_store(StoreSettings(), run_dir, run_lock=True)
    store.connect()
    try:
        assert holder(run_dir)["pid"] == os.getpid()
        from monty.json import MontyDecoder

        copy = MontyDecoder().process_decoded(store.as_dict())  # as a worker reads jobflow.yaml
        assert copy.docs_store.run_lock and copy.docs_store.database_path == store.docs_store.database_path
    finally:
        store.close()
    assert holder(run_dir) is None


FILL = """
import sys
from pathlib import Path
from cscflow.config import StoreSettings
from cscflow.stores import StoreError, build_job_store
store = build_job_store(StoreSettings(), Path(sys.argv[1]) / "run")
store.connect()
store.update({"uuid": "u0", "index": 1, "output": 1})
try:
    with open(Path(sys.argv[1]) / "filler", "wb") as f:
        while True:
            f.write(bytes(4096))
            f.flush()
except OSError:
    pass
try:
    store.update([{"uuid": f"u{i}", "index": 1, "output": "x" * 10000} for i in range(1, 50)])
except StoreError as exc:
    print(exc)
"""


def test_a_full_disk_is_one_line_saying_so(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f'mount -t tmpfs -o size=512k tmpfs "{disk}" || exit 99; exec "$@"'
    out = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-c", FILL, str(disk)],
                         capture_output=True, text=True, timeout=120)
    if out.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == (f"the disk holding {disk}/run/store/cscflow/outputs.collection is full: "
                                  f"free space, then run cscflow resume {disk}/run"), out.stdout + out.stderr[-2000:]
