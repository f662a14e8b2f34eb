"""`cscflow find RUN FILE...`: did the exploration find this structure?

For every structure in the given files, the closest candidate of the run among those of
the same reduced formula that pymatgen's StructureMatcher (the spec's ``score`` tolerances)
fits, ranked by its RMS displacement: its iteration, generator condition, E_hull and
S.U.N. flags. Iteration 0 (the references) counts as a match too ("reference").
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel
from pymatgen.analysis.structure_matcher import StructureMatcher

from cscflow.schemas import Candidate

__all__ = ["FindResult", "find_in_run", "format_find"]


class FindResult(BaseModel):
    """The closest candidate of the run to one given structure (None fields: not found)."""

    query: str
    formula: str
    n_same_formula: int = 0
    candidate_id: str | None = None
    iteration: int | None = None
    condition: dict | None = None
    e_hull: float | None = None
    is_sun: bool | None = None
    rms: float | None = None


def _run_candidates(data) -> list[Candidate]:
    out = list(data.candidates(0)[0])
    for k in data.iterations:
        out += [c for c in data.candidates(k)[0] if c.status != "rejected"]
    return out


def find_in_run(run_dir: str | Path, files: list[str | Path]) -> list[FindResult]:
    """One FindResult per structure of ``files`` (every structure of a multi-structure file)."""
    from cscflow.analysis.report import load_run_data
    from cscflow.structures_io import read_structures

    queries = [(f"{path}:{seed.label}", seed.structure) for path in files for seed in read_structures(path)]
    data = load_run_data(run_dir)
    settings = data.spec.score
    matcher = StructureMatcher(ltol=settings.ltol, stol=settings.stol, angle_tol=settings.angle_tol)
    by_formula: dict[str, list[Candidate]] = {}
    for c in _run_candidates(data):
        by_formula.setdefault(c.structure.composition.reduced_formula, []).append(c)
    results = []
    for name, structure in queries:
        formula = structure.composition.reduced_formula
        same = by_formula.get(formula, [])
        best, best_rms = None, None
        for c in same:
            rms = matcher.get_rms_dist(structure, c.structure)
            if rms is not None and (best_rms is None or rms[0] < best_rms):
                best, best_rms = c, float(rms[0])
        result = FindResult(query=name, formula=formula, n_same_formula=len(same))
        if best is not None:
            result = result.model_copy(update={
                "candidate_id": best.id, "iteration": best.provenance.iteration,
                "condition": best.provenance.condition or None, "e_hull": best.e_hull,
                "is_sun": best.is_sun if best.e_hull is not None else None, "rms": best_rms,
            })
        results.append(result)
    return results


def format_find(results: list[FindResult]) -> str:
    """A plain table: one row per queried structure."""
    header = ["structure", "formula", "found", "iteration", "condition", "E_hull", "S.U.N.", "rms", "same formula"]
    rows = []
    for r in results:
        cond = ", ".join(f"{k}={v}" for k, v in (r.condition or {}).items()) if r.condition else "-"
        rows.append([
            r.query, r.formula, r.candidate_id or "not found",
            "-" if r.iteration is None else ("0 (reference)" if r.iteration == 0 else str(r.iteration)),
            cond if r.candidate_id else "-",
            "-" if r.e_hull is None else f"{r.e_hull:.3f}",
            "-" if r.is_sun is None else ("yes" if r.is_sun else "no"),
            "-" if r.rms is None else f"{r.rms:.3f}",
            str(r.n_same_formula),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
