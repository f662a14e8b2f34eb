"""0 K phase diagrams: references only vs references + S.U.N. candidates (paper Fig. 2b–c).

pymatgen's PhaseDiagram builds both hulls and its PDPlotter draws them (ternary triangle or
binary formation-energy line); drawn on top here: new stable phases highlighted and metastable
candidates (E_hull ≤ 0.1 eV/atom) coloured by their E_hull.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel, Field
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

from cscflow.analysis.plotting import pyplot, save_figure

__all__ = [
    "PhaseDiagramMaker",
    "PhaseDiagramSummary",
    "compare_hulls",
    "plot_phase_diagrams",
]

logger = logging.getLogger(__name__)


class PhaseDiagramSummary(BaseModel):
    """What adding the S.U.N. candidates did to the hull."""

    elements: list[str]
    reference_stable: list[str] = Field(default_factory=list, description="reference entry ids on the reference hull")
    new_stable: list[str] = Field(default_factory=list, description="candidate ids on the combined hull")
    displaced: list[str] = Field(
        default_factory=list, description="reference ids stable alone but off the combined hull"
    )
    metastable: dict[str, float] = Field(
        default_factory=dict, description="candidate id -> E_hull (combined hull), 0 < E_hull <= threshold"
    )
    e_hull_vs_references: dict[str, float] = Field(
        default_factory=dict, description="candidate id -> E_hull against the reference-only hull"
    )
    skipped: dict[str, str] = Field(default_factory=dict, description="candidate id -> why not on the diagram")
    models: list[str] = Field(default_factory=list, description="energy models seen; more than one is suspicious")
    figures: list[str] = Field(default_factory=list)


def _reference_entries(references) -> list[PDEntry]:
    entries = []
    for ref in references:
        entries.append(PDEntry(
            ref.structure.composition, ref.energy_per_atom * len(ref.structure), name=ref.entry_id,
            attribute={"kind": "reference", "id": ref.entry_id},
        ))
    return entries


def _candidate_entries(candidates, elements: set[str], sun_only: bool) -> tuple[list[PDEntry], dict[str, str]]:
    entries, skipped = [], {}
    for cand in candidates:
        cid = cand.provenance.candidate_id
        if cand.status == "rejected":
            continue
        if sun_only and not cand.is_sun:
            continue
        if cand.energy_per_atom is None:
            skipped[cid] = "no energy"
            continue
        symbols = {el.symbol for el in cand.structure.composition.elements}
        if not symbols <= elements:
            skipped[cid] = f"elements {sorted(symbols - elements)} not in the references"
            continue
        entries.append(PDEntry(
            cand.structure.composition, cand.energy_per_atom * len(cand.structure), name=cid,
            attribute={"kind": "candidate", "id": cid},
        ))
    return entries, skipped


def _build(references, candidates, sun_only: bool):
    if not references:
        raise ValueError("a phase diagram needs reference entries (at least the elements)")
    ref_entries = _reference_entries(references)
    elements = sorted({el.symbol for e in ref_entries for el in e.composition.elements})
    missing = [el for el in elements if not any(
        e.composition.is_element and e.composition.elements[0].symbol == el for e in ref_entries
    )]
    if missing:
        raise ValueError(f"no elemental reference for {missing}: the hull needs every element")
    if len(elements) < 2:
        raise ValueError(f"a phase diagram needs at least two elements, references have {elements}")
    cand_entries, skipped = _candidate_entries(candidates, set(elements), sun_only)
    pd_ref = PhaseDiagram(ref_entries)
    pd_all = PhaseDiagram(ref_entries + cand_entries)
    return elements, ref_entries, cand_entries, skipped, pd_ref, pd_all


def compare_hulls(
    references: Sequence,
    candidates: Sequence,
    sun_only: bool = True,
    metastable_threshold: float = 0.1,
) -> tuple[PhaseDiagramSummary, PhaseDiagram, PhaseDiagram]:
    """Summary + (reference-only, combined) PhaseDiagrams."""
    elements, ref_entries, cand_entries, skipped, pd_ref, pd_all = _build(references, candidates, sun_only)
    models = sorted({r.model for r in references} | {c.model for c in candidates if c.model and c.energy_per_atom is not None})
    if len(models) > 1:
        logger.warning("energies from several models on one hull: %s", models)
    stable_all = {id(e) for e in pd_all.stable_entries}
    summary = PhaseDiagramSummary(
        elements=elements,
        reference_stable=sorted(e.name for e in pd_ref.stable_entries),
        skipped=skipped,
        models=models,
    )
    all_stable_names = {e.name for e in pd_all.stable_entries}
    summary.displaced = [n for n in summary.reference_stable if n not in all_stable_names]
    for entry in cand_entries:
        summary.e_hull_vs_references[entry.name] = float(pd_ref.get_e_above_hull(entry, allow_negative=True))
        if id(entry) in stable_all:
            summary.new_stable.append(entry.name)
            continue
        e_hull = float(pd_all.get_e_above_hull(entry))
        if e_hull <= metastable_threshold:
            summary.metastable[entry.name] = e_hull
    return summary, pd_ref, pd_all


def _draw(ax, pd: PhaseDiagram, elements, candidates_meta: dict[str, float] | None, new_ids: set[str],
          threshold: float, title: str, displaced: Sequence[str] = ()):
    """pymatgen's PDPlotter draws the hull (tie lines, stable nodes, triangle/energy axes);
    on top: candidates coloured by E_hull, new stable phases as stars, displaced references
    (PDPlotter colours neither by our E_hull nor marks 'new' vs 'displaced')."""
    from pymatgen.analysis.phase_diagram import PDPlotter

    plt = pyplot()
    binary = len(elements) == 2
    plotter = PDPlotter(pd, show_unstable=0, backend="matplotlib",
                        markerfacecolor="k", markersize=5, linewidth=0.8)
    plt.sca(ax)  # PDPlotter's matplotlib backend draws on the current axes
    plotter.get_plot(label_stable=False, label_unstable=False, ax=ax)
    _, stable, unstable = plotter.pd_plot_data
    where = {id(e): xy for xy, e in stable.items()} | {id(e): xy for e, xy in unstable.items()}

    def point(entry):
        return where[id(entry)]

    if binary:
        ax.axhline(0, color="0.6", lw=0.8)
        a, b = (el.symbol for el in pd.elements)  # PDPlotter's x: atomic fraction of pd.elements[1]
        ax.set_xlabel(f"x in {a}(1-x){b}x", fontsize=10, fontweight="normal")
        ax.set_ylabel("formation energy (eV/atom)", fontsize=10, fontweight="normal")
    else:
        ax.set_aspect("equal", adjustable="box")  # PDPlotter's axis("equal") fights tight_layout
        ax.set_xlim(-0.08, 1.08)
        ax.set_ylim(-0.08, 0.95)
        for entry in pd.el_refs.values():
            x, y = point(entry)
            ax.annotate(entry.composition.elements[0].symbol, (x, y), textcoords="offset points",
                        xytext=(0, -14 if y < 0.1 else 6), ha="center", fontsize=11, fontweight="bold")
    sc = None
    if candidates_meta:
        entries = {e.name: e for e in pd.all_entries if (e.attribute or {}).get("kind") == "candidate"}
        names = [n for n in candidates_meta if n in entries]
        xy = np.array([point(entries[n]) for n in names]) if names else np.empty((0, 2))
        if len(xy):
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=[candidates_meta[n] for n in names], cmap="viridis",
                            vmin=0, vmax=threshold, s=22, zorder=2, edgecolors="none")
    for entry in pd.all_entries:
        if entry.name in displaced and (entry.attribute or {}).get("kind") == "reference":
            x, y = point(entry)
            ax.scatter([x], [y], s=40, facecolors="none", edgecolors="0.4", zorder=3)
            ax.annotate(f"{entry.composition.reduced_formula} (off hull)", (x, y), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color="0.4")
    for entry in pd.stable_entries:
        x, y = point(entry)
        is_new = (entry.attribute or {}).get("kind") == "candidate" and entry.name in new_ids
        if is_new:
            ax.scatter([x], [y], marker="*", s=180, color="tab:red", edgecolors="k", zorder=4)
        if not entry.composition.is_element:
            ax.annotate(entry.composition.reduced_formula, (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color="tab:red" if is_new else "k")
    ax.set_title(title, fontsize=10)
    return sc


def plot_phase_diagrams(
    references: Sequence,
    candidates: Sequence,
    path: str | Path,
    sun_only: bool = True,
    metastable_threshold: float = 0.1,
) -> tuple[Path, PhaseDiagramSummary]:
    """Two panels (references | references + S.U.N.) saved as PNG; returns (path, summary)."""
    plt = pyplot()

    summary, pd_ref, pd_all = compare_hulls(references, candidates, sun_only, metastable_threshold)
    if len(summary.elements) > 3:
        raise ValueError(f"only binary and ternary diagrams are drawn, got {summary.elements}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    _draw(axes[0], pd_ref, summary.elements, None, set(), metastable_threshold,
          f"references only ({len(summary.reference_stable)} stable)")
    sc = _draw(axes[1], pd_all, summary.elements, summary.metastable, set(summary.new_stable),
               metastable_threshold, displaced=summary.displaced,
               title=f"references + S.U.N. ({len(summary.new_stable)} new stable, {len(summary.metastable)} metastable)")
    if sc is not None:
        fig.colorbar(sc, ax=axes[1], shrink=0.7, label="E_hull (eV/atom)")
    fig.set_size_inches(11, 5)  # PDPlotter resizes the figure for a single panel
    path = save_figure(fig, path, dpi=120)
    summary.figures = [str(path)]
    return path, summary


@dataclass
class PhaseDiagramMaker(Maker):
    """Reference hull vs hull with the run's S.U.N. structures, as a summary and a PNG."""

    name: str = "phase diagram"
    sun_only: bool = True
    metastable_threshold: float = 0.1

    @job
    def make(self, references: list, candidates: list, out_dir: str) -> PhaseDiagramSummary:
        flat = []
        for item in candidates:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        _, summary = plot_phase_diagrams(references, flat, Path(out_dir) / "phase_diagram.png",
                                         self.sun_only, self.metastable_threshold)
        return summary
