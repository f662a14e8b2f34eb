"""`cscflow report`: a real tiny run, its page, every image loading in headless Chromium,
and the same page for runs cut short (in progress) at two points."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cscflow.analysis import figures
from cscflow.analysis.report import write_report
from cscflow.analysis.run_data import load_run_data
from cscflow.runner import explore, load_run
from cscflow.stores import build_job_store

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import tiny_spec  # noqa: E402  (the loop's own tiny spec: Li–S, 2 structures per condition)

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

_CHECK_JS = (
    '<script>window.addEventListener("load",function(){var r=[];for(const i of document.images){'
    'r.push({src:i.getAttribute("src"),ok:i.complete&&i.naturalWidth>0,w:i.naturalWidth});}'
    'var p=document.createElement("pre");p.id="imgcheck";p.textContent=JSON.stringify(r);'
    "document.body.appendChild(p);});</script>"
)


def image_status(index_html: Path) -> list[dict]:
    """Load the page in headless Chromium (file://) and return each <img>'s load status."""
    check = index_html.with_name("_imgcheck.html")
    check.write_text(index_html.read_text(encoding="utf-8").replace("</body>", _CHECK_JS + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", "--dump-dom", check.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    check.unlink()
    start = proc.stdout.find('<pre id="imgcheck">')
    assert start >= 0, f"the check script did not run: {proc.stderr[-2000:]}"
    body = proc.stdout[start + len('<pre id="imgcheck">'):proc.stdout.find("</pre>", start)]
    return json.loads(body.replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real one-iteration Li–S run: generate, relax, score, select, label (teacher), train (DPA-3), evaluate."""
    base = tmp_path_factory.mktemp("report_run")
    run_dir = base / "run"
    explore(tiny_spec(base, max_iterations=1), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def full_report(finished_run):
    return write_report(finished_run)


def _cut_run(src: Path, dst: Path, drop: dict) -> Path:
    """Copy of a run whose store lacks some stage documents: what an interrupted run looks like."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report"))
    run_id, spec = load_run(dst)
    store = build_job_store(spec.store, dst)
    store.connect()
    store.docs_store.remove_docs({"metadata.run_id": run_id, **drop})
    store.close()
    return dst


EXPECTED_FIGURES = {
    "figures/ehull_density.png", "figures/phase_diagrams.png", "figures/sun_ratios.png",
    "figures/entropy_frames.png", "figures/rmse_vs_ntrain.png", "figures/parity.png",
    "figures/tsne.png", "figures/tsne_overlap.png",
}


def test_report_of_a_finished_run_has_every_figure(finished_run, full_report):
    out = finished_run / "report"
    assert Path(full_report.index_html) == out / "index.html"
    assert EXPECTED_FIGURES <= set(full_report.figures)
    assert full_report.finished and full_report.n_iterations == 1
    # Only the downstream section (no QHA/conductivity in this run) may be missing.
    assert set(full_report.missing) == {"downstream"}, full_report.missing
    page = (out / "index.html").read_text(encoding="utf-8")
    # every model on the last split's test frames, the untuned force field first (cscflow model-errors)
    assert "Every model on one fixed test set" in page and "untuned chgnet-0.3.0" in page
    for fig in full_report.figures:
        assert f'src="{fig}"' in page
        assert (out / fig).stat().st_size > 5000
    data = load_run_data(finished_run)
    # Top-candidates table: the lowest-E_hull scored candidate comes first, with its provenance.
    scored = [c for cs in data.scored().values() for c in cs if c.status != "rejected" and c.e_hull is not None]
    best = min(scored, key=lambda c: (c.e_hull, c.id))
    top_html = page[page.index('id="top"'):]
    assert top_html.index(best.id) < min(top_html.index(c.id) for c in scored if c.id != best.id)
    assert best.provenance.generator in top_html
    assert (out / "structures").is_dir() and list((out / "structures").glob("001_*.cif"))
    # Motif table and its JSON agree.
    motifs = json.loads((out / "motifs.json").read_text())
    assert motifs["n_structures"] == len([c for c in data.candidates(1)[0] if c.status != "rejected"])
    for rec in motifs["records"]:
        assert rec["hash"][:10] in page
    # Fingerprints cached per candidate; parity predictions cached against the model tag.
    cache = json.loads((out / "fingerprints.json").read_text())
    ids = {c.id for k in (0, 1) for c in data.candidates(k)[0] if c.status != "rejected"}
    assert {key.split("|")[0] for key in cache} == ids
    parity = json.loads((out / "parity.json").read_text())
    train = data.output(1, "train")
    assert parity["frame_ids"] == train.test_frame_ids
    e_rmse = float(np.sqrt(np.mean((np.array(parity["energy_pred"]) - parity["energy_ref"]) ** 2)))
    assert e_rmse == pytest.approx(train.energy_rmse, rel=0.05, abs=1e-3), "parity disagrees with the train stage"


def test_second_report_reuses_caches(finished_run, full_report):
    out = finished_run / "report"
    before = (out / "fingerprints.json").read_text()
    again = write_report(finished_run)
    assert (out / "fingerprints.json").read_text() == before
    assert set(again.figures) == set(full_report.figures)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_every_image_loads_in_headless_chromium(finished_run, full_report):
    status = image_status(Path(full_report.index_html))
    assert {s["src"] for s in status} == set(full_report.figures)
    assert all(s["ok"] and s["w"] > 0 for s in status), status
    # The check itself can fail: a page with a broken image is reported as not loaded.
    broken = Path(full_report.index_html).with_name("broken.html")
    broken.write_text('<!DOCTYPE html><html><body><img src="figures/nope.png"><img src="figures/parity.png"></body></html>')
    status = image_status(broken)
    assert [s["ok"] for s in status] == [False, True]


def test_report_of_a_run_in_progress(finished_run, tmp_path):
    # Iteration 1 stopped after Label: no Train, Evaluate or trigger yet.
    run = _cut_run(finished_run, tmp_path / "cut", {"metadata.iteration": 1,
                                                    "metadata.stage": {"$in": ["train", "evaluate", "trigger"]}})
    result = write_report(run, tsne=False)
    assert not result.finished
    assert "figures/ehull_density.png" in result.figures and "figures/phase_diagrams.png" in result.figures
    assert "figures/sun_ratios.png" in result.figures  # ratios come from the Score stage
    assert "figures/parity.png" not in result.figures and "figures/rmse_vs_ntrain.png" not in result.figures
    assert any("no Train stage" in m for m in result.missing["rmse"])
    assert any("no Evaluate yet" in m for m in result.missing["overview"])
    page = Path(result.index_html).read_text(encoding="utf-8")
    assert "What is missing" in page and "in progress" in page


def test_report_with_only_iteration_zero_and_downstream_files(finished_run, tmp_path):
    run = _cut_run(finished_run, tmp_path / "zero", {"metadata.iteration": {"$gte": 1}})
    (run / "downstream").mkdir()
    shutil.copy(finished_run / "report" / "figures" / "phase_diagrams.png", run / "downstream" / "gibbs_hull.png")
    (run / "downstream" / "conductors.md").write_text("| Name | σ |\n| --- | --- |\n| x | 1 |\n")
    result = write_report(run, tsne=False)
    assert result.n_iterations == 0
    assert result.figures == ["figures/phase_diagrams.png", "downstream/gibbs_hull.png"]
    assert "downstream" not in result.missing
    assert (run / "report" / "downstream" / "gibbs_hull.png").is_file()
    assert any("no loop iteration" in m for m in result.missing["overview"])
    assert any("no candidates" in m for m in result.missing["motifs"])
    assert "| x | 1 |" in Path(result.index_html).read_text(encoding="utf-8")


def test_cli_report(finished_run, tmp_path):
    from cscflow.cli import main

    res = CliRunner().invoke(main, ["report", str(finished_run), "--out", str(tmp_path / "r"), "--no-tsne",
                                    "--no-parity", "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "missing [parity]: parity plots turned off" in res.output
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert page.count('href="structures/') == 3
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code != 0 and "not a cscflow run directory" in res.output


# ------------------------------------------------------------------ figures on their own
def test_figures_refuse_empty_input(tmp_path):
    with pytest.raises(ValueError, match="no E_hull"):
        figures.plot_ehull_density({1: {"0.0": []}}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="S.U.N."):
        figures.plot_sun_ratios([{"iteration": 1}], tmp_path / "b.png")
    with pytest.raises(ValueError, match="RMSE"):
        figures.plot_rmse_vs_ntrain([{"iteration": 1, "n_train": 0}], tmp_path / "c.png")
    with pytest.raises(ValueError, match="shapes differ"):
        figures.plot_parity([1.0], [1.0, 2.0], [0.0], [0.0], tmp_path / "d.png")
    assert not list(tmp_path.iterdir())


def test_parity_statistics(tmp_path):
    rng = np.random.default_rng(0)
    e = rng.normal(-4, 0.2, 20)
    f = rng.normal(0, 1, 60)
    path, stats = figures.plot_parity(e, e + 0.01, f, f * 1.1, tmp_path / "p.png")
    assert path.stat().st_size > 5000
    assert stats["energy_rmse"] == pytest.approx(0.01)
    assert stats["force_rmse"] == pytest.approx(np.sqrt(np.mean((0.1 * f) ** 2)))


def test_downstream_screens_on_a_finished_run_reach_the_report(finished_run, tmp_path):
    """`cscflow downstream`: QHA hulls and MD screening with the run's force field, stored and reported."""
    from cscflow.downstream.on_run import run_downstream

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("report"))
    kwargs = dict(
        quick=True, max_structures=1,
        qha_overrides={"relax_steps": 100, "conditions": [(300.0, 0.0)], "pressures": [0.0, 1.0]},
        # Li-S has no P: drop the x_P filter and the E_hull gate so one candidate is simulated.
        conductivity_overrides={"min_fraction": {"Li": 0.15}, "e_hull_max": None, "nvt_ps": 0.2, "analysis_ps": 0.1},
    )
    out = run_downstream(run, **kwargs)
    qha, md = out["qha"], out["conductivity"]
    by_formula = {r.formula: r for r in qha.results}
    assert by_formula["Li"].status == "done" and by_formula["Li2S"].status == "done"
    assert by_formula["Li2S"].supercell is not None
    assert list(qha.hulls) == ["T=300K,p=0GPa"]
    assert md.n_input == 1 and md.n_simulated + sum(r.status == "failed" for r in md.results) == md.n_passed_filters

    run_id, spec = load_run(run)
    store = build_job_store(spec.store, run)
    store.connect()
    n_docs = store.docs_store.count({"metadata.run_id": run_id, "metadata.stage": {"$in": ["qha", "conductivity"]}})
    store.close()
    assert n_docs == 2
    again = run_downstream(run, **kwargs)  # reused from the store, not recomputed
    assert again["qha"].seconds == qha.seconds
    store.connect()
    assert store.docs_store.count({"metadata.run_id": run_id, "metadata.stage": {"$in": ["qha", "conductivity"]}}) == 2
    store.close()

    result = write_report(run)
    assert "downstream" not in result.missing
    assert any(f.startswith("qha/") for f in result.figures), result.figures
