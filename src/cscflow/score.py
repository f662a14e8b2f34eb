"""E_hull and S.U.N. flags of relaxed candidates (paper Methods 4.1).

Hull. A pymatgen PhaseDiagram of the references (iteration 0) plus the relaxed candidates
of earlier iterations ("evaluated relative to the MP database and previously generated
structures"). This iteration's candidates are scored against that hull with
``allow_negative=True``: a candidate below the known hull gets E_hull < 0, which is what the
paper's first selection bin (E_hull < 0) needs. Putting this iteration's candidates into the
hull as well would clip every such value to 0 and leave that bin empty.

One model. Every energy on the hull must come from the same force field. References and
earlier candidates whose `model` tag differs from the current model
(`cscflow.forcefields.model_tag`) are recomputed as single points with the current
calculator; how many were recomputed is recorded in ScoreOutput.recomputed.

S.U.N. Stable: E_hull < settings.stability_threshold. Unique: no earlier candidate of this
iteration (input order) matches it. Novel: no reference and no relaxed candidate of an
earlier iteration matches it. Matching is pymatgen's StructureMatcher (ltol/stol/angle_tol
from settings), only within one reduced composition.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from jobflow import Maker, job
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from cscflow.checkpoint import resumable
from cscflow.config import ForceFieldSettings, ScoreSettings
from cscflow.schemas import Candidate, ReferenceEntry

__all__ = [
    "MissingReferenceError",
    "ScoreMaker",
    "ScoreOutput",
    "build_hull",
    "hull_entry",
    "score_candidates",
]

logger = logging.getLogger(__name__)

# structures -> energies per atom (eV/atom) from the current model
Recompute = Callable[[list[Structure]], list[float]]


class MissingReferenceError(ValueError):
    """The references have no elemental entry for some element of the candidates."""


class ScoreOutput(BaseModel):
    """Scored candidates (rejected ones kept, unscored) and the S.U.N. counts."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    candidates: list[Candidate] = Field(default_factory=list)
    n_relaxed: int = 0
    n_rejected: int = 0
    n_stable: int = 0
    n_unique: int = 0
    n_novel: int = 0
    n_sun: int = 0
    model: str | None = Field(None, description="force field whose energies built the hull")
    recomputed: dict[str, int] = Field(
        default_factory=dict, description="entries re-evaluated with `model`: references, previous, current"
    )
    recomputed_from: list[str] = Field(default_factory=list, description="model tags replaced")
    n_hull_entries: int = 0
    seconds: float = 0.0


def _flatten(previous) -> list[Candidate]:
    out: list[Candidate] = []
    for item in previous or ():
        if isinstance(item, Candidate):
            out.append(item)
        else:
            out.extend(item)
    return out


def _scorable(c: Candidate) -> bool:
    return c.status == "relaxed" and c.energy_per_atom is not None


def hull_entry(structure: Structure, energy_per_atom: float, name: str) -> PDEntry:
    """A PhaseDiagram entry from a structure and its energy per atom."""
    comp = structure.composition
    return PDEntry(comp, energy_per_atom * comp.num_atoms, name=name)


def build_hull(entries: Sequence[PDEntry], elements: Sequence[str] | None = None) -> PhaseDiagram:
    """PhaseDiagram of `entries`; a missing elemental entry is a clear error naming it."""
    present = {str(el) for e in entries if len(e.composition.elements) == 1 for el in e.composition.elements}
    needed = set(elements or ()) | {str(el) for e in entries for el in e.composition.elements}
    missing = sorted(needed - present)
    if missing:
        raise MissingReferenceError(
            f"the reference hull has no elemental entry for {', '.join(missing)}: add a structure of "
            f"pure {', '.join(missing)} to the references (prototypes or seed files)"
        )
    return PhaseDiagram(list(entries))


def _match_groups(structures: Sequence[Structure]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(structures):
        groups[s.composition.reduced_formula].append(i)
    return groups


def score_candidates(
    candidates: Sequence[Candidate],
    references: Sequence[ReferenceEntry],
    previous: Sequence[Candidate] | Sequence[Sequence[Candidate]] = (),
    settings: ScoreSettings | None = None,
    model: str | None = None,
    recompute: Recompute | None = None,
) -> ScoreOutput:
    """E_hull and S.U.N. flags; returns new Candidate objects (inputs are not modified).

    `model`: the current force-field tag. Entries with another tag are re-evaluated with
    `recompute`; without `recompute` a mismatch is an error (a hull mixing models is wrong).
    """
    t0 = time.perf_counter()
    settings = settings or ScoreSettings()
    if not references:
        raise MissingReferenceError("no reference entries: the hull needs iteration-0 references")
    prev = [c for c in _flatten(previous) if _scorable(c)]
    cands = [c.model_copy(deep=True) for c in candidates]
    current = [i for i, c in enumerate(cands) if _scorable(c)]
    for c in cands:
        if c.status == "relaxed" and c.energy_per_atom is None:
            c.status, c.reject_reason = "rejected", "relaxed without an energy: cannot score"
            logger.warning("candidate %s has no energy: rejected", c.id)

    ref_e = [r.energy_per_atom for r in references]
    prev_e = [c.energy_per_atom for c in prev]
    recomputed = {"references": 0, "previous": 0, "current": 0}
    replaced: set[str] = set()
    if model is not None:
        groups = {
            "references": ([r.structure for r in references], [r.model for r in references], ref_e),
            "previous": ([c.structure for c in prev], [c.model for c in prev], prev_e),
            "current": (
                [cands[i].structure for i in current],
                [cands[i].model for i in current],
                None,
            ),
        }
        for key, (structures, tags, energies) in groups.items():
            stale = [j for j, tag in enumerate(tags) if tag != model]
            if not stale:
                continue
            if recompute is None:
                raise ValueError(
                    f"{len(stale)} {key} entries carry model {sorted({str(tags[j]) for j in stale})}, "
                    f"not the current {model!r}, and no calculator was given to recompute them"
                )
            new = recompute([structures[j] for j in stale])
            for j, e in zip(stale, new):
                replaced.add(str(tags[j]))
                if key == "current":
                    c = cands[current[j]]
                    c.energy_per_atom, c.energy, c.model = e, e * len(c.structure), model
                else:
                    energies[j] = e
            recomputed[key] = len(stale)
            logger.info("score: recomputed %d %s energies with %s", len(stale), key, model)

    hull_entries = [hull_entry(r.structure, e, r.entry_id) for r, e in zip(references, ref_e)]
    hull_entries += [hull_entry(c.structure, e, c.id) for c, e in zip(prev, prev_e)]
    elements = {str(el) for i in current for el in cands[i].structure.composition.elements}
    ref_elements = {str(el) for r in references if len(r.structure.composition.elements) == 1
                    for el in r.structure.composition.elements}
    missing = sorted(elements - ref_elements)
    if missing:
        raise MissingReferenceError(
            f"the references have no elemental entry for {', '.join(missing)}: add a structure of pure "
            f"{', '.join(missing)} (prototype or seed file) so the hull spans every candidate element"
        )
    pd = build_hull(hull_entries, sorted(elements))

    matcher = StructureMatcher(ltol=settings.ltol, stol=settings.stol, angle_tol=settings.angle_tol)
    known_by_formula: dict[str, list[Structure]] = defaultdict(list)
    for r in references:
        known_by_formula[r.structure.composition.reduced_formula].append(r.structure)
    for c in prev:
        known_by_formula[c.structure.composition.reduced_formula].append(c.structure)

    by_formula = _match_groups([cands[i].structure for i in current])
    for formula, members in by_formula.items():
        uniques: list[Structure] = []
        known = known_by_formula.get(formula, [])
        for j in members:
            c = cands[current[j]]
            entry = hull_entry(c.structure, c.energy_per_atom, c.id)
            c.e_hull = float(pd.get_e_above_hull(entry, allow_negative=True))
            c.is_stable = c.e_hull < settings.stability_threshold
            c.is_unique = not any(matcher.fit(c.structure, u) for u in uniques)
            if c.is_unique:
                uniques.append(c.structure)
            c.is_novel = not any(matcher.fit(c.structure, k) for k in known)

    scored = [cands[i] for i in current]
    return ScoreOutput(
        candidates=cands,
        n_relaxed=len(scored),
        n_rejected=sum(c.status == "rejected" for c in cands),
        n_stable=sum(bool(c.is_stable) for c in scored),
        n_unique=sum(bool(c.is_unique) for c in scored),
        n_novel=sum(bool(c.is_novel) for c in scored),
        n_sun=sum(c.is_sun for c in scored),
        model=model,
        recomputed={k: v for k, v in recomputed.items() if v},
        recomputed_from=sorted(replaced),
        n_hull_entries=len(hull_entries),
        seconds=time.perf_counter() - t0,
    )


def calculator_recompute(calculator) -> Recompute:
    """Energies per atom from single points with an ASE calculator (cscflow.forcefields)."""
    from cscflow.forcefields import single_points

    def run(structures: list[Structure]) -> list[float]:
        results = single_points(list(structures), calculator)
        return [r["energy"] / len(s) for r, s in zip(results, structures)]

    return run


@dataclass
class ScoreMaker(Maker):
    """E_hull against references + earlier iterations, and S.U.N. flags."""

    name: str = "score"
    settings: ScoreSettings = field(default_factory=ScoreSettings)
    forcefield: ForceFieldSettings = field(default_factory=ForceFieldSettings)

    @job(data=["candidates"])
    @resumable
    def make(
        self,
        candidates: list[Candidate],
        references: list[ReferenceEntry],
        previous: list[list[Candidate]] = (),
        model_path: str | None = None,
    ) -> ScoreOutput:
        from cscflow.forcefields import get_calculator, model_tag

        tag = model_tag(self.forcefield, model_path)
        cache: dict[str, Recompute] = {}

        def recompute(structures: list[Structure]) -> list[float]:
            # the calculator is built only when some energy has to be recomputed
            if "fn" not in cache:
                cache["fn"] = calculator_recompute(get_calculator(self.forcefield, model_path))
            return cache["fn"](structures)

        return score_candidates(
            candidates, references, previous, settings=self.settings, model=tag, recompute=recompute
        )
