"""The run report: one HTML page with every figure of the paper for one run (``ReportMaker``).

Reads only the run's store (newest document per iteration and stage, as `cscflow resume`
does), so it works on a run that is still going: each section shows what exists and says
what is missing and why. Figures are PNGs under ``report/figures``; structure
fingerprints are cached in ``report/fingerprints.json`` and parity predictions in
``report/parity.json`` so a second report only computes what is new.

Sections: run overview, E_hull density per condition and iteration (Fig. 2a), phase
diagrams (2b–c), S.U.N. ratios (2d), entropy and labelled frames (2e), RMSE vs N_train
(3a), parity of the last trained model on its test frames (3b–c), joint t-SNE maps
(Fig. 4a), the anion-motif catalogue, the top candidates with provenance, and downstream
results (QHA, conductivity) when the run has them.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobflow import Maker, job

from cscflow.analysis.parity import parity_predictions
from cscflow.analysis.report_html import HtmlCell, ReportOutput, Section, add_figure, render_page, report_dir, table
from cscflow.analysis.run_data import DOWNSTREAM_STAGES, RunData, load_run_data
from cscflow.schemas import Candidate, field_of

__all__ = ["ReportMaker", "write_report"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- sections
def _condition_label(candidate: Candidate) -> str:
    from cscflow.evaluate import condition_key

    return condition_key(candidate.provenance.condition)


def _iteration_rows(data: RunData) -> list[dict[str, Any]]:
    """One row of IterationDocument fields per iteration; iterations without an Evaluate are
    filled from their Score stage (same definitions as cscflow.evaluate) and flagged."""
    rows = []
    for k in data.iterations:
        doc = data.evaluation(k)
        if doc is not None:
            rows.append({**doc.model_dump(), "in_progress": False})
            continue
        cands, stage = data.candidates(k)
        row: dict[str, Any] = {"iteration": k, "in_progress": True, "n_generated": len(cands)}
        if stage == "score" and cands:
            relaxed = [c for c in cands if c.status == "relaxed"]
            n = len(cands)
            row.update({
                "n_relaxed": len(relaxed),
                "stable_ratio": sum(bool(c.is_stable) for c in relaxed) / n,
                "unique_ratio": sum(bool(c.is_unique) for c in relaxed) / n,
                "novel_ratio": sum(bool(c.is_novel) for c in relaxed) / n,
                "sun_ratio": sum(c.is_sun for c in relaxed) / n,
                "n_sun": sum(c.is_sun for c in relaxed),
            })
        rows.append(row)
    return rows


def _overview(data: RunData, rows: list[dict]) -> Section:
    sec = Section("overview", "Run overview")
    final = data.final_state()
    spec = data.spec
    status = f"finished: {final.stop_reason}" if final else "in progress (or interrupted)"
    lines = [
        f"<p>Run <code>{html.escape(data.run_id)}</code> · spec <b>{html.escape(spec.name)}</b> · "
        f"elements {html.escape('–'.join(spec.chemical_system.elements))} · generator "
        f"<code>{html.escape(spec.generator.backend)}</code> · labeller <code>{html.escape(spec.labeller.backend)}</code>"
        f" · force field <code>{html.escape(spec.forcefield.backend)}</code> · <b>{html.escape(status)}</b></p>",
    ]
    cols = [("iter", "iteration"), ("generated", "n_generated"), ("relaxed", "n_relaxed"), ("rejected", "n_rejected"),
            ("S.U.N.", "n_sun"), ("selected", "n_selected"), ("labelled", "n_labelled"),
            ("frames total", "n_train_total"), ("H_train", "entropy_training"), ("dH/dN", "dh_dn"),
            ("E RMSE (eV/atom)", "energy_rmse"), ("F RMSE (eV/Å)", "force_rmse")]
    if rows:
        table_rows = [[r.get(a) for _, a in cols] + [", ".join(data.stages(r["iteration"]))] for r in rows]
        lines.append(table([c for c, _ in cols] + ["stages done"], table_rows))
    else:
        sec.missing.append("no loop iteration has started yet (only iteration 0 stages: "
                           f"{', '.join(data.stages(0)) or 'none'})")
    for r in rows:
        if r.get("in_progress"):
            sec.missing.append(f"iteration {r['iteration']} has no Evaluate yet: its row is partial "
                               f"(done: {', '.join(data.stages(r['iteration']))})")
    sec.body = "\n".join(lines)
    return sec


def _ehull_section(data: RunData, out: Path) -> Section:
    from cscflow.analysis.figures import plot_ehull_density

    sec = Section("ehull", "E_hull density per condition and iteration (Fig. 2a)")
    by_it: dict[int, dict[str, list[float]]] = {}
    for k, cands in data.scored().items():
        for c in cands:
            if c.e_hull is not None and c.status != "rejected":
                by_it.setdefault(k, {}).setdefault(_condition_label(c), []).append(float(c.e_hull))
    for k in data.iterations:
        if k not in by_it:
            doc = data.evaluation(k)
            if doc is not None and doc.e_hull_by_condition:
                by_it[k] = {c: list(v) for c, v in doc.e_hull_by_condition.items()}
            else:
                sec.missing.append(f"iteration {k}: not scored yet")
    n_beyond = sum(v > 0.5 for conds in by_it.values() for vals in conds.values() for v in vals)
    add_figure(sec, out, "ehull_density.png", "E_hull density per generator condition (axis cut at 0.5 eV/atom)",
            lambda p: plot_ehull_density(by_it, p))
    if n_beyond:
        sec.body = f"<p>{n_beyond} structures lie beyond 0.5 eV/atom (counted in the legends, not drawn).</p>"
    return sec


def _ratio_sections(rows: list[dict], out: Path) -> list[Section]:
    from cscflow.analysis.figures import plot_entropy_and_frames, plot_sun_ratios

    sun = Section("sun", "S.U.N. ratios vs iteration (Fig. 2d)")
    add_figure(sun, out, "sun_ratios.png", "stable / unique / novel / S.U.N. fraction of generated structures",
            lambda p: plot_sun_ratios(rows, p))
    ent = Section("entropy", "Entropy and labelled frames vs iteration (Fig. 2e)")
    done = [r for r in rows if not r.get("in_progress")]
    add_figure(ent, out, "entropy_frames.png", "QUESTS H of each iteration's candidates and of the training set (top N_train by δH); bars: cumulative labelled frames, not DFT runs",
            lambda p: plot_entropy_and_frames(done, p))
    return [sun, ent]


def _train_rows(data: RunData) -> list[dict]:
    rows = []
    for k in sorted(k for k, s in data.outputs if s == "train"):
        t = data.output(k, "train")
        rows.append({"iteration": k, **{a: field_of(t, a) for a in (
            "n_train", "n_test", "energy_rmse", "force_rmse", "model_path", "test_frame_ids", "start_from")}})
    return rows


def _rmse_section(data: RunData, out: Path, train_rows: list[dict], fixed_test: bool = True) -> Section:
    from cscflow.analysis.figures import plot_rmse_vs_ntrain

    sec = Section("rmse", "Energy and force RMSE vs N_train (Fig. 3a)")
    if not train_rows:
        sec.missing.append("no Train stage has finished yet")
        return sec
    add_figure(sec, out, "rmse_vs_ntrain.png", "held-out RMSE of each iteration's model vs its training-set size",
            lambda p: plot_rmse_vs_ntrain(train_rows, p))
    sec.body = table(["iteration", "N_train", "N_test", "E RMSE (eV/atom)", "F RMSE (eV/Å)", "start from"],
                      [[r["iteration"], r["n_train"], r["n_test"], r["energy_rmse"], r["force_rmse"], r["start_from"]]
                       for r in train_rows])
    if fixed_test:
        sec.body += _fixed_test_table(data, sec)
    return sec


def _fixed_test_table(data: RunData, sec: Section) -> str:
    """Every model of the run on ONE test set (``cscflow model-errors``): the rows above are
    each iteration's own, growing test split, so only these numbers compare across iterations."""
    from cscflow.model_errors import fixed_test_errors

    try:
        rows = fixed_test_errors(data)
    except Exception as exc:
        sec.missing.append(f"fixed-test-set errors not computed: {type(exc).__name__}: {exc}")
        return ""
    return (f"<p>Every model on one fixed test set: the {rows[0].n_test} test frames of the last Train "
            "(the untuned starting force field first; <code>cscflow model-errors RUN</code>).</p>"
            + table(["model", "E RMSE (meV/atom)", "F RMSE (eV/Å)", "test frames", "trained on"],
                    [[r.model, None if r.energy_rmse is None else round(1000 * r.energy_rmse, 1),
                      None if r.force_rmse is None else round(r.force_rmse, 3), r.n_test, r.n_trained_on_test]
                     for r in rows]))


def _parity_section(data: RunData, out: Path, train_rows: list[dict], enabled: bool) -> Section:
    from cscflow.analysis.figures import plot_parity

    sec = Section("parity", "Parity of the last trained model on its test frames (Figs. 3b–c)")
    if not enabled:
        sec.missing.append("parity plots turned off (--no-parity)")
        return sec
    usable = [r for r in train_rows if r.get("model_path")]
    if not usable:
        sec.missing.append("no Train stage with a frozen model yet")
        return sec
    train = usable[-1]
    if not Path(train["model_path"]).is_file():
        sec.missing.append(f"model of iteration {train['iteration']} not found at {train['model_path']}")
        return sec
    if not train.get("test_frame_ids"):
        sec.missing.append(f"the train stage of iteration {train['iteration']} kept no test frames")
        return sec
    try:
        pred = parity_predictions(data, out, train)
    except Exception as exc:
        sec.missing.append(f"predictions of the iteration-{train['iteration']} model failed: {type(exc).__name__}: {exc}")
        return sec
    result = add_figure(sec, out, "parity.png",
                     f"model of iteration {train['iteration']} ({pred['model']}) on {len(pred['energy_ref'])} test frames",
                     lambda p: plot_parity(pred["energy_ref"], pred["energy_pred"], pred["forces_ref"],
                                           pred["forces_pred"], p, title=f"iteration {train['iteration']} model"))
    if result is not None:
        stats = result[1]
        sec.body = (f"<p>Energy RMSE {stats['energy_rmse'] * 1000:.1f} meV/atom, force RMSE "
                    f"{stats['force_rmse']:.3f} eV/Å (recomputed here; the train stage reported "
                    f"{_fmt(train['energy_rmse'])} eV/atom, {_fmt(train['force_rmse'])} eV/Å).</p>")
        if pred.get("n_missing"):
            sec.missing.append(f"{pred['n_missing']} test frame ids not found among the labelled frames")
    return sec


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def _all_candidates(data: RunData) -> list[Candidate]:
    """Iteration-0 references-stage candidates plus every later iteration's most processed ones."""
    out = []
    for k in [0, *data.iterations]:
        out.extend(data.candidates(k)[0])
    return out


def _tsne_section(data: RunData, out: Path, enabled: bool, anion_map: bool, seed: int) -> Section:
    from cscflow.analysis.fingerprints import FingerprintCache
    from cscflow.analysis.maps import fingerprint_map

    sec = Section("tsne", "Joint t-SNE maps of CrystalNN fingerprints (Fig. 4a, Supp. Fig. 2)")
    if not enabled:
        sec.missing.append("t-SNE maps turned off (--no-tsne)")
        return sec
    cands = [c for c in _all_candidates(data) if c.status != "rejected"]
    cache_file = out / "fingerprints.json"
    cache = FingerprintCache()
    if cache_file.is_file():
        try:
            cache = FingerprintCache.from_dict(json.loads(cache_file.read_text()))
        except (json.JSONDecodeError, KeyError, OSError) as exc:
            logger.warning("fingerprint cache %s unreadable (%s): recomputing", cache_file, exc)
    notes = []
    for remove_li in ([False, True] if anion_map else [False]):
        tag = "anion framework (Li removed)" if remove_li else "all atoms"
        try:
            res = fingerprint_map(cands, out / "figures", remove_li=remove_li, seed=seed, cache=cache)
        except ValueError as exc:
            sec.missing.append(f"t-SNE ({tag}): {exc}")
            continue
        finally:
            cache_file.write_text(json.dumps(cache.to_dict()))
        for path, what in zip(res.figures, ("joint map coloured by iteration", "consecutive iterations on the shared map")):
            sec.figures.append((f"figures/{Path(path).name}", f"{what}, {tag}"))
        n_noox = sum(not f for f in res.oxidation_states)
        notes.append(f"{tag}: {len(res.ids) - len(res.failed)} structures embedded"
                     + (f", {n_noox} fingerprinted without oxidation states" if n_noox else "")
                     + (f", {len(res.failed)} without a fingerprint" if res.failed else ""))
    sec.body = "<p>" + "; ".join(html.escape(n) for n in notes) + " (iteration 0 = reference structures).</p>" if notes else ""
    return sec


def _motif_section(data: RunData, out: Path) -> Section:
    from cscflow.analysis.motifs import MotifSettings, build_motif_catalog, export_clusters

    sec = Section("motifs", "Anion motif catalogue (SI §1.2)")
    cands = [c for k in data.iterations for c in data.candidates(k)[0] if c.status != "rejected"]
    refs = data.references() + [f for f in data.frames(0) if f.kind == "unperturbed"]
    if not cands:
        sec.missing.append("no candidates of a loop iteration yet")
        return sec
    settings = MotifSettings.for_elements(data.spec.chemical_system.elements)
    catalog = build_motif_catalog(cands, refs, settings)
    (out / "motifs.json").write_text(catalog.model_dump_json(indent=1))
    try:
        clusters = export_clusters(catalog, out / "motifs")
    except ValueError as exc:
        clusters = []
        sec.missing.append(f"cluster export: {exc}")
    rows = [[r.name or "", r.formula, "periodic" if r.periodic else "finite", r.dimensionality if r.periodic else 0,
             r.charge, r.count, r.n_structures, r.first_iteration, r.in_references, ", ".join(r.example_ids[:3]),
             r.hash[:10]] for r in catalog.records]
    sec.body = (
        f"<p>{catalog.n_structures} candidate structures against {catalog.n_references} reference/"
        f"iteration-0 structures; excluded from the graph: {html.escape(', '.join(settings.exclude))}. "
        f"Catalogue: <a href=\"motifs.json\">motifs.json</a>; {len(clusters)} finite clusters in a 20 Å box under "
        f"<a href=\"motifs/\">motifs/</a>.</p>"
        + table(["name", "formula", "kind", "dim", "charge", "count", "structures", "first it.", "in refs",
                  "examples", "WL hash"], rows, "motifs")
    )
    if catalog.failures:
        sec.missing.append(f"{len(catalog.failures)} structures without a motif graph: "
                           + "; ".join(f"{k}: {v}" for k, v in list(catalog.failures.items())[:5]))
    return sec


def _phase_section(data: RunData, out: Path) -> Section:
    from cscflow.analysis.phase_diagrams import plot_phase_diagrams

    sec = Section("phase", "0 K phase diagrams: references vs references + S.U.N. (Figs. 2b–c)")
    refs = data.references()
    if not refs:
        sec.missing.append("no references stage in the store yet")
        return sec
    cands = [c for cs in data.scored().values() for c in cs]
    if not cands:
        sec.missing.append("no scored candidates yet: only the reference hull is drawn")
    result = add_figure(sec, out, "phase_diagrams.png", "left: reference hull; right: with S.U.N. candidates "
                     "(red stars: new stable, colour: E_hull ≤ 0.1 eV/atom)",
                     lambda p: plot_phase_diagrams(refs, cands, p))
    if result is not None:
        s = result[1]
        sec.body = (f"<p>Reference hull: {len(s.reference_stable)} stable entries. New stable: "
                    f"{html.escape(', '.join(s.new_stable) or 'none')}; metastable (≤ 0.1 eV/atom): {len(s.metastable)}; "
                    f"displaced references: {html.escape(', '.join(s.displaced) or 'none')}; energy models: "
                    f"{html.escape(', '.join(s.models))}.</p>")
    return sec


def _spacegroup(structure) -> str:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        return SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_symbol()
    except Exception:  # spglib gives up on some distorted cells
        return "?"


def _top_section(data: RunData, out: Path, top: int) -> Section:
    from pymatgen.io.cif import CifWriter

    sec = Section("top", f"Top {top} candidates by E_hull, with provenance")
    cands = [c for cs in data.scored().values() for c in cs if c.status != "rejected" and c.e_hull is not None]
    if not cands:
        sec.missing.append("no scored candidates yet")
        return sec
    labelled = {f.provenance.candidate_id for f in data.all_frames()}
    # Select writes its own documents; the scored ones keep selected=False
    selected = {c.id for k in data.iterations for c in data.selected(k)}
    cands.sort(key=lambda c: (c.e_hull, c.id))
    (out / "structures").mkdir(parents=True, exist_ok=True)
    rows = []
    for rank, c in enumerate(cands[:top], 1):
        p = c.provenance
        cif = f"structures/{rank:03d}_{c.formula}.cif"
        CifWriter(c.structure).write_file(out / cif)
        rows.append([rank, c.id, c.formula, len(c.structure), _spacegroup(c.structure), p.iteration,
                     c.e_hull * 1000, c.is_stable, c.is_unique, c.is_novel, c.is_sun, c.selected or c.id in selected,
                     c.id in labelled, c.delta_entropy, p.generator, json.dumps(p.condition), p.parent,
                     p.sample_index, p.seed, c.model, HtmlCell(f'<a href="{cif}">cif</a>')])
    page_table = table(["#", "id", "formula", "atoms", "space group", "iter.", "E_hull (meV/atom)", "stable", "unique",
                    "novel", "S.U.N.", "selected", "labelled", "δH", "generator", "condition", "parent",
                    "sample", "seed", "model", "file"], rows, "top")
    sec.body = page_table
    return sec


def _downstream_section(data: RunData, out: Path) -> Section:
    """QHA / conductivity stage outputs in the store, and any figures/tables in RUN_DIR/downstream."""
    sec = Section("downstream", "Downstream: QHA free energies and Li conductivity")
    found = False
    for stage in DOWNSTREAM_STAGES:
        keys = sorted((key for key in data.outputs if key[1] == stage), key=lambda key: data.completed[key])
        if not keys:
            continue
        found = True
        raw = data.output(*keys[-1])
        try:
            if stage == "qha":
                from cscflow.downstream.qha import QhaOutput, write_qha_report

                output = raw if isinstance(raw, QhaOutput) else QhaOutput.model_validate(
                    {a: b for a, b in dict(raw).items() if not a.startswith("@")})
                files = write_qha_report(output, out / "qha")
            else:
                from cscflow.downstream.conductivity import ConductivityOutput, write_conductivity_report

                output = raw if isinstance(raw, ConductivityOutput) else ConductivityOutput.model_validate(
                    {a: b for a, b in dict(raw).items() if not a.startswith("@")})
                files = write_conductivity_report(output, out / "conductivity")
                if output.table:
                    cols = list(output.table[0])
                    sec.body += "<h3>Kinetically stable conductors</h3>" + table(
                        cols, [[r.get(c) for c in cols] for r in output.table])
        except Exception as exc:
            sec.missing.append(f"{stage} stage output could not be reported: {type(exc).__name__}: {exc}")
            continue
        for name, path in files.items():
            rel = Path(path).relative_to(out).as_posix()
            if Path(path).suffix in _IMAGE_SUFFIXES:
                sec.figures.append((rel, f"{stage}: {name}"))
            else:
                sec.body += f'<p><a href="{html.escape(rel)}">{html.escape(rel)}</a></p>'
    ddir = data.run_dir / "downstream"
    if ddir.is_dir():
        for path in sorted(p for p in ddir.rglob("*") if p.is_file()):
            found = True
            rel = Path("downstream") / path.relative_to(ddir)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out / rel)
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                sec.figures.append((rel.as_posix(), f"{rel.as_posix()}"))
            elif path.suffix == ".md":
                sec.body += f"<h3>{html.escape(rel.as_posix())}</h3><pre>{html.escape(path.read_text()[:20000])}</pre>"
            else:
                sec.body += f'<p><a href="{html.escape(rel.as_posix())}">{html.escape(rel.as_posix())}</a></p>'
    if not found:
        sec.missing.append("no qha/conductivity stage in the store and no RUN_DIR/downstream folder "
                           "(run the downstream screens to fill this section)")
    return sec


def write_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    top: int = 20,
    parity: bool = True,
    tsne: bool = True,
    anion_map: bool = False,
    seed: int = 0,
) -> ReportOutput:
    """Write `out_dir` (default RUN_DIR/report)/index.html with every figure the run's store allows."""
    start = time.perf_counter()
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    data = load_run_data(run_dir)
    out = report_dir(run_dir, out_dir)
    rows = _iteration_rows(data)
    train_rows = _train_rows(data)
    sections = [
        _overview(data, rows),
        _ehull_section(data, out),
        _phase_section(data, out),
        *_ratio_sections(rows, out),
        _rmse_section(data, out, train_rows, fixed_test=parity),
        _parity_section(data, out, train_rows, parity),
        _tsne_section(data, out, tsne, anion_map, seed),
        _motif_section(data, out),
        _top_section(data, out, top),
        _downstream_section(data, out),
    ]
    seconds = time.perf_counter() - start
    index = out / "index.html"
    index.write_text(render_page(f"{data.spec.name} ({data.run_id})", data.run_dir, sections, seconds),
                     encoding="utf-8")
    return ReportOutput(
        index_html=str(index),
        figures=[src for s in sections for src, _ in s.figures],
        missing={s.key: s.missing for s in sections if s.missing},
        n_iterations=len(data.iterations),
        finished=data.final_state() is not None,
        seconds=seconds,
    )


@dataclass
class ReportMaker(Maker):
    """The run report as a job (e.g. appended after the loop's last trigger)."""

    name: str = "report"
    top: int = 20
    parity: bool = True
    tsne: bool = True
    anion_map: bool = False
    seed: int = 0

    @job
    def make(self, run_dir: str, out_dir: str | None = None) -> ReportOutput:
        return write_report(run_dir, out_dir, self.top, self.parity, self.tsne, self.anion_map, self.seed)
