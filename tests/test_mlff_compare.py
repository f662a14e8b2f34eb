"""`cscflow compare-mlff` on a real tiny run: the offline-pretrained families (CHGNet,
SevenNet) trained on the same entropy-ranked prefixes, one fixed test set, Fig. 3a with
one curve per family, parity plots, a second call that reuses the stored trainings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cscflow.analysis.mlff_compare import load_training_overrides, run_compare
from cscflow.cli import main
from cscflow.runner import explore
from dbserver import require_server_executable
from test_dispatch import BIN, _env
from test_dispatch import TINY as DISPATCH_TINY
from test_loop import TINY


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmp")
    spec = base / "tiny.yaml"
    text = TINY.format(max_iterations=2, threshold=0.0, min_iterations=1)
    text = text.replace("training: {backend: deepmd,", "training: {backend: none,")
    spec.write_text(text)
    run_dir = base / "run"
    explore(spec, run_dir)
    return run_dir


@pytest.mark.slow  # ~3.5 min explore + ~4.5 min for four trainings on the loaded 2-core machine
def test_compare_mlff_draws_one_curve_per_backend(finished_run):
    result = run_compare(finished_run, backends=["chgnet", "sevenn"], n_train=[2, 4], train_iterations_max=1,
                         epochs=1)
    assert result["n_train"] == [2, 4]
    assert result["curves"] == {"chgnet": [2, 4], "sevenn": [2, 4]}
    assert Path(result["figure"]).stat().st_size > 10_000
    assert set(result["parity"]) == {"chgnet", "sevenn"}
    rows = result["rows"]
    assert {(r["backend"], r["n_train"]) for r in rows} == {(b, n) for b in ("chgnet", "sevenn") for n in (2, 4)}
    assert all(r["n_test"] == result["n_test"] > 0 for r in rows)  # one fixed test set
    assert all(r["energy_rmse"] is not None and r["force_rmse"] is not None for r in rows)
    assert {r["start_from"] for r in rows} == {"pretrained:0.3.0", "pretrained:7net-0"}
    assert all(Path(r["model_path"]).is_file() for r in rows)
    assert len(result["dh_dn"]) == 2
    saved = json.loads((finished_run / "mlff_compare" / "metrics.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))

    # the CLI: a second call reuses every stored training (no new model files are written)
    mtimes = {r["model_path"]: Path(r["model_path"]).stat().st_mtime_ns for r in rows}
    out = CliRunner().invoke(main, ["compare-mlff", str(finished_run), "--backends", "chgnet,sevenn",
                                    "--n-train", "2,4", "--train-iterations-max", "1", "--epochs", "1"])
    assert out.exit_code == 0, out.output
    assert "chgnet" in out.output and "sevenn" in out.output and "figure:" in out.output
    assert {p: Path(p).stat().st_mtime_ns for p in mtimes} == mtimes


def test_compare_mlff_bad_input_is_one_line(tmp_path):
    out = CliRunner().invoke(main, ["compare-mlff", str(tmp_path), "--n-train", "a,b"])
    assert out.exit_code == 2 and "--n-train" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(main, ["compare-mlff", str(tmp_path), "--backends", "nequip"])
    assert out.exit_code == 2 and "unknown backend" in out.output


# --------------------------------------------------------------------------- FireWorks (--submit)

ONE_ITERATION = DISPATCH_TINY.replace("max_iterations: 2", "max_iterations: 1").replace("backend: deepmd,", "backend: none,")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished one-iteration tiny Li-S run (no training in the loop): frames to compare on."""
    base = tmp_path_factory.mktemp("cmp_submit")
    spec = base / "tiny.yaml"
    spec.write_text(ONE_ITERATION)
    explore(spec, base / "run")
    return base / "run"


def test_submit_puts_one_firework_per_training_on_the_launchpad_and_a_worker_runs_one(small_run, mongo_server,
                                                                                     tmp_path):
    """--submit on the real server: loader (cpu) -> one training per (family, N_train) in the train
    stage's category -> report (cpu). An rlaunch worker runs the loader and one CHGNet training
    from the LaunchPad; a later local compare-mlff reuses that training from the run's store."""
    from fireworks import LaunchPad

    from cscflow.runner import load_run

    run_id, spec = load_run(small_run)
    lp_file = tmp_path / "my_launchpad.yaml"
    lp_file.write_text(yaml.safe_dump({"host": "127.0.0.1", "port": mongo_server.port, "name": f"cmp_{run_id}"}))
    lp = LaunchPad.from_file(str(lp_file))
    lp.reset("", require_password=False)
    args = ["compare-mlff", str(small_run), "--backends", "chgnet,sevenn", "--n-train", "2,4",
            "--train-iterations-max", "0", "--epochs", "1"]
    out = CliRunner().invoke(main, [*args, "--submit", "--launchpad", str(lp_file)])
    assert out.exit_code == 0, out.output
    assert "6 Fireworks" in out.output and "source" in out.output

    fws = {fw["name"]: fw for fw in lp.fireworks.find({})}
    trainings = {n: fw for n, fw in fws.items() if fw["spec"].get("stage") == "mlff_compare"}
    assert {(fw["spec"]["backend"], fw["spec"]["n_train"]) for fw in trainings.values()} == {
        (b, n) for b in ("chgnet", "sevenn") for n in (2, 4)}
    assert {fw["spec"]["_category"] for fw in trainings.values()} == {spec.dispatch.category("train")} == {"gpu"}
    assert fws["mlff_compare frames"]["spec"]["_category"] == fws["mlff_compare report"]["spec"]["_category"] == "cpu"
    assert [wf["metadata"]["cscflow_run_id"] for wf in lp.workflows.find({})] == [run_id]

    # a CPU worker reads the frames from the run, a GPU worker trains CHGNet on the top 2
    env = dict(line.removeprefix("export ").split("=", 1)
               for line in (small_run / "worker_env.sh").read_text().splitlines() if line.startswith("export "))
    assert env == {"JOBFLOW_CONFIG_FILE": str(small_run / "jobflow.yaml")}  # the run's embedded store
    target = trainings["mlff_compare chgnet n2"]
    for category, fw_id in (("cpu", fws["mlff_compare frames"]["fw_id"]), ("gpu", target["fw_id"])):
        worker = tmp_path / f"fworker_{category}.yaml"
        worker.write_text(yaml.safe_dump({"name": f"test_{category}", "category": category, "query": "{}"}))
        ran = subprocess.run([str(BIN / "rlaunch"), "-l", str(lp_file), "-w", str(worker), "singleshot",
                              "--fw_id", str(fw_id)], cwd=small_run / "jobs", env=_env(**env),
                             capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        state = lp.fireworks.find_one({"fw_id": fw_id})["state"]
        assert state == "COMPLETED", (category, ran.stdout[-3000:] + ran.stderr[-3000:])
    assert lp.launches.find_one({"fw_id": target["fw_id"]})["fworker"]["category"] == "gpu"
    worker_model = small_run / "mlff_compare" / "chgnet" / "n2" / "chgnet_model.pth.tar"
    trained_at = worker_model.stat().st_mtime_ns

    # the local command finds the worker's training in the run's store and trains only the rest
    result = run_compare(small_run, backends=["chgnet"], n_train=[2, 4], train_iterations_max=0, epochs=1)
    by_n = {r["n_train"]: r for r in result["rows"]}
    assert by_n[2]["model_path"] == str(worker_model) and worker_model.stat().st_mtime_ns == trained_at
    assert by_n[2]["start_from"] == "pretrained:0.3.0" and Path(by_n[4]["model_path"]).is_file()
    lp.connection.close()


def test_submit_options_need_submit(tmp_path):
    out = CliRunner().invoke(main, ["compare-mlff", str(tmp_path), "--local"])
    assert out.exit_code == 2 and "--submit" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(main, ["compare-mlff", str(tmp_path), "--training", str(tmp_path / "none.yaml")])
    assert out.exit_code == 2 and "--training" in out.output and "not found" in out.output


def test_training_overrides_merge_per_family_and_fail_in_one_line(small_run, tmp_path):
    model = tmp_path / "models" / "start.model"
    model.parent.mkdir()
    model.write_bytes(b"x")
    good = tmp_path / "tiny.yaml"
    good.write_text("mace: {num_channels: 8, foundation_model: models/start.model}\nchgnet: {epochs: 3}\n")
    over = load_training_overrides(good)
    assert over["mace"]["foundation_model"] == str(model.resolve())  # relative to the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("mace: {num_chanels: 8}\n")
    out = CliRunner().invoke(main, ["compare-mlff", str(small_run), "--backends", "mace", "--n-train", "2",
                                    "--train-iterations-max", "0", "--training", str(bad)])
    assert out.exit_code == 2 and "training.mace.num_chanels" in out.output and "Traceback" not in out.output


def test_submit_local_runs_the_whole_comparison_with_one_worker(small_run):
    """--submit --local: the LaunchPad on the run's own server; one rlaunch worker taking both
    categories runs loader -> CHGNet training -> report, which draws Fig. 3a into the run."""
    require_server_executable()
    out = CliRunner().invoke(main, ["compare-mlff", str(small_run), "--backends", "chgnet", "--n-train", "3",
                                    "--train-iterations-max", "0", "--epochs", "1", "--submit", "--local"])
    try:
        assert out.exit_code == 0, out.output
        assert "3 Fireworks" in out.output and "rlaunch -w" in out.output
        env = dict(line.removeprefix("export ").split("=", 1)
                   for line in (small_run / "worker_env.sh").read_text().splitlines() if line.startswith("export "))
        assert set(env) == {"FW_CONFIG_FILE", "JOBFLOW_CONFIG_FILE"}
        worker = small_run / "fireworks" / "test_both.yaml"
        worker.write_text(yaml.safe_dump({"name": "both", "category": ["cpu", "gpu"], "query": "{}"}))
        ran = subprocess.run([str(BIN / "rlaunch"), "-w", str(worker), "rapidfire", "--nlaunches", "3"],
                             cwd=small_run / "jobs", env=_env(**env), capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        lp = yaml.safe_load((small_run / "fireworks" / "my_launchpad.yaml").read_text())
        import pymongo

        db = pymongo.MongoClient(lp["host"], lp["port"], serverSelectionTimeoutMS=20000)[lp["name"]]
        states = {fw["name"]: fw["state"] for fw in db.fireworks.find({}, {"name": 1, "state": 1})}
        assert states == {"mlff_compare frames": "COMPLETED", "mlff_compare chgnet n3": "COMPLETED",
                          "mlff_compare report": "COMPLETED"}, ran.stdout[-3000:] + ran.stderr[-3000:]
        metrics = json.loads((small_run / "mlff_compare" / "metrics.json").read_text())
        assert metrics["curves"] == {"chgnet": [3]} and metrics["rows"][0]["energy_rmse"] is not None
        assert metrics["untuned"]["chgnet"]["model"] == "chgnet:0.3.0"
        assert Path(metrics["figure"]).stat().st_size > 10_000
    finally:
        CliRunner().invoke(main, ["server", "stop", str(small_run)])
