"""`cscflow report RUN_DIR` for a CHGGen run: the figures of paper 002 from the stored report.

Reads the newest ``chggen_report`` output in the run's store (``RUN_DIR/chggen_report.json``
when the store has none, e.g. a copied folder) and draws: symmetry success rate by atom
count, unconditional vs inpainting (Fig. 6); ΔE, RMSD and E_d distributions (Fig. 4a–c);
partial RDFs and coordination numbers of generated vs reference structures (Fig. 2); the
funnel, the wall time per stage and every relaxed structure ranked by E_d.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cscflow.analysis.plotting import pyplot, save_figure
from cscflow.analysis.report_html import ReportOutput, Section, add_figure, render_page, report_dir, table
from cscflow.chggen.settings import is_chggen_spec, read_spec_mapping

__all__ = ["is_chggen_run", "load_chggen_report", "write_chggen_report"]

MODES = ("unconditional", "inpainting")
_COLORS = {"unconditional": "tab:blue", "inpainting": "tab:orange", "reference": "black"}


def is_chggen_run(run_dir: str | Path) -> bool:
    """A `cscflow chggen` run directory: its spec.yaml has a ``chggen:`` block."""
    return is_chggen_spec(Path(run_dir) / "spec.yaml")


def load_chggen_report(run_dir: str | Path):
    """The run's ChgGenReport: newest stored flow output, else RUN_DIR/chggen_report.json."""
    from cscflow.chggen.flow import ChgGenReport
    from cscflow.config import StoreSettings
    from cscflow.runner import RunError
    from cscflow.stores import build_job_store

    run_dir = Path(run_dir).resolve()
    raw = read_spec_mapping(run_dir / "spec.yaml")
    if raw is None or "chggen" not in raw:
        raise RunError(f"{run_dir}: not a CHGGen run directory (no spec.yaml with a chggen: block)")
    # Only the store block is needed: the generator checkpoint may be gone by the time one reports.
    store = build_job_store(StoreSettings.model_validate(raw.get("store") or {}), run_dir)
    store.connect()
    try:
        docs = list(store.query({"name": "chggen_report", "output": {"$ne": None}},
                                properties=["output", "completed_at"], load=True,
                                sort={"completed_at": -1}, limit=1))
    finally:
        store.close()
    if docs:
        out = docs[0]["output"]
        return ChgGenReport.model_validate({k: v for k, v in out.items() if not k.startswith("@")})
    path = run_dir / "chggen_report.json"
    if path.is_file():
        return ChgGenReport.model_validate(json.loads(path.read_text()))
    raise RunError(f"{run_dir}: the CHGGen flow has not reached its report yet (no chggen_report in the store)")


def plot_success_by_atoms(report, path: Path) -> Path:
    """Fig. 6: symmetry success rate per atom count, unconditional vs inpainting."""
    rates = {m: getattr(report, f"success_{m}") or {} for m in MODES}
    atoms = sorted({int(n) for m in MODES for n in (rates[m].get("by_atoms") or {})})
    if not atoms:
        raise ValueError("no relaxed structure in either mode")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(atoms))
    for i, m in enumerate(MODES):
        by = {int(k): v for k, v in (rates[m].get("by_atoms") or {}).items()}
        overall = rates[m].get("rate")
        label = f"{m} (overall {overall:.2f}, n={rates[m].get('n', 0)})" if overall is not None else f"{m} (none)"
        ax.bar(x + (i - 0.5) * 0.4, [by.get(n, np.nan) for n in atoms], 0.4, color=_COLORS[m], label=label)
    ax.set_xticks(x, [str(n) for n in atoms])
    ax.set_xlabel("atoms per cell")
    ax.set_ylabel("symmetry success rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_distributions(report, path: Path) -> Path:
    """Fig. 4a–c: ΔE, RMSD and E_d of the relaxed structures per mode."""
    rows = report.structures
    if not rows:
        raise ValueError("no relaxed structure to plot")
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    for ax, key, label in zip(axes, ("delta_e", "rmsd", "e_d"),
                              ("ΔE generated − relaxed (eV/atom)", "RMSD (Å)", "E_d (eV/atom)")):
        values = {m: [r[key] for r in rows if r["mode"] == m and r[key] is not None] for m in MODES}
        every = [v for vs in values.values() for v in vs]
        if not every:
            ax.set_title(f"{label}: none")
            continue
        bins = np.histogram_bin_edges(every, bins=min(20, max(5, len(every) // 2)))
        for m in MODES:
            if values[m]:
                ax.hist(values[m], bins=bins, alpha=0.6, color=_COLORS[m], label=f"{m} (n={len(values[m])})")
        ax.set_xlabel(label)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("structures")
    return save_figure(fig, path)


def plot_rdfs(report, path: Path) -> Path:
    """Fig. 2: mean partial RDF per element pair, generated vs reference structures."""
    rdf = report.rdf or {}
    r = np.asarray(rdf.get("r") or [])
    pairs = sorted({p for k, v in rdf.items() if k != "r" for p in v})
    if r.size == 0 or not pairs:
        raise ValueError("no radial distribution functions in the report")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.0), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for key in ("reference", *MODES):
            g = (rdf.get(key) or {}).get(pair)
            if g is not None:
                ax.plot(r, g, color=_COLORS[key], label=key, lw=1.5 if key == "reference" else 1.0)
        ax.set_title(pair)
        ax.set_xlabel("r (Å)")
    axes[0][0].set_ylabel("g(r)")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_coordination(report, path: Path) -> Path:
    """Fig. 2e–f: coordination-number histograms per element (fractions of sites)."""
    coord = report.coordination or {}
    elements = sorted({el for v in coord.values() for el in v})
    if not elements:
        raise ValueError("no coordination statistics in the report")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(elements), figsize=(3.6 * len(elements), 3.0), squeeze=False)
    sets = [k for k in ("reference", *MODES) if k in coord]
    width = 0.8 / len(sets)
    for ax, el in zip(axes[0], elements):
        cns = sorted({int(cn) for k in sets for cn in (coord[k].get(el, {}).get("histogram") or {})})
        for i, key in enumerate(sets):
            hist = {int(a): b for a, b in (coord[key].get(el, {}).get("histogram") or {}).items()}
            total = sum(hist.values())
            if total:
                ax.bar(np.arange(len(cns)) + (i - (len(sets) - 1) / 2) * width,
                       [hist.get(cn, 0) / total for cn in cns], width, color=_COLORS[key], label=key)
        ax.set_xticks(np.arange(len(cns)), [str(c) for c in cns])
        ax.set_title(f"{el} ({report.coordination_method})")
        ax.set_xlabel("coordination number")
    axes[0][0].set_ylabel("fraction of sites")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def write_chggen_report(run_dir: str | Path, out_dir: str | Path | None = None) -> ReportOutput:
    """Write `out_dir` (default RUN_DIR/report)/index.html for a CHGGen run."""
    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    report = load_chggen_report(run_dir)
    out = report_dir(run_dir, out_dir)

    summary = Section("overview", "CHGGen: symmetry success and funnel")
    rows = []
    for m in MODES:
        f, rate = report.funnel.get(m, {}), getattr(report, f"success_{m}") or {}
        rows.append([m, f.get("requested"), f.get("generated"), json.dumps(f.get("generation_failures") or {}),
                     f.get("relaxed"), json.dumps(f.get("rejected") or {}), rate.get("n_symmetric"), rate.get("rate"),
                     (report.delta_e.get(m) or {}).get("median"), (report.rmsd.get(m) or {}).get("median"),
                     (report.e_d.get(m) or {}).get("median")])
    summary.body = table(["mode", "requested", "generated", "generation failures", "relaxed", "rejected",
                           "symmetric", "success rate", "median ΔE (eV/atom)", "median RMSD (Å)",
                           "median E_d (eV/atom)"], rows)
    fw = report.framework_success
    summary.body += (f"<p>Frameworks symmetrized: {'–' if fw is None else f'{fw:.2f}'}; "
                     f"structures passed on to DFT (E_d below threshold): {report.n_to_dft}.</p>")
    summary.body += "<h3>Wall time per stage (s)</h3>" + table(
        ["stage", "seconds"], [[k, v] for k, v in report.wall_seconds.items()])
    add_figure(summary, out, "chggen_success.png", "symmetry success rate by atom count (paper 002, Fig. 6)",
            lambda p: plot_success_by_atoms(report, p))

    dist = Section("distributions", "Relaxation changes and decomposition energies (Fig. 4a–c)")
    add_figure(dist, out, "chggen_distributions.png", "ΔE, RMSD and E_d of the relaxed structures",
            lambda p: plot_distributions(report, p))

    local = Section("locality", "Local environments: partial RDFs and coordination numbers (Fig. 2)")
    add_figure(local, out, "chggen_rdf.png", "mean partial RDFs, generated vs reference", lambda p: plot_rdfs(report, p))
    add_figure(local, out, "chggen_cn.png", f"coordination numbers ({report.coordination_method})",
            lambda p: plot_coordination(report, p))
    if report.rdf_difference:
        local.body = table(["mode", "pair", "mean |g_gen − g_ref|"],
                            [[m, pair, v] for m, d in report.rdf_difference.items() for pair, v in d.items()])

    ranked = Section("structures", "Relaxed structures ranked by E_d")
    ranked.body = table(["id", "mode", "formula", "atoms", "space group", "ΔE (eV/atom)", "RMSD (Å)",
                          "E_d (eV/atom)", "to DFT", "parent"],
                         [[r["id"], r["mode"], r["formula"], r["n_atoms"], r["space_group"], r["delta_e"], r["rmsd"],
                           r["e_d"], r["to_dft"], r["parent"]] for r in report.structures])
    if not report.structures:
        ranked.missing.append("no relaxed structure")

    sections = [summary, dist, local, ranked]
    seconds = time.perf_counter() - start
    index = out / "index.html"
    title = f"{run_dir.name} (CHGGen)"
    index.write_text(render_page(title, run_dir, sections, seconds), encoding="utf-8")
    return ReportOutput(index_html=str(index), figures=[src for s in sections for src, _ in s.figures],
                        missing={s.key: s.missing for s in sections if s.missing}, finished=True, seconds=seconds)
