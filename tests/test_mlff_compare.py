"""`cscflow compare-mlff` on a real tiny run: the offline-pretrained families (CHGNet,
SevenNet) trained on the same entropy-ranked prefixes, one fixed test set, Fig. 3a with
one curve per family, parity plots, a second call that reuses the stored trainings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cscflow.analysis.mlff_compare import run_compare
from cscflow.cli import main
from cscflow.runner import explore
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
