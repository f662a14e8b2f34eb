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
calculator, once per (structure, model): the energies go to the run's energy cache
(cscflow.energies) and later scorings, resumed jobs and the report read them from there.
ScoreOutput.recomputed counts new single points, ScoreOutput.reused cache hits.

S.U.N. Stable: E_hull < settings.stability_threshold. Unique: no earlier *unique* candidate
of this iteration (input order) matches it, ``fit(later, earlier)``. Novel: no reference and
no relaxed candidate of an earlier iteration matches it, ``fit(candidate, known)``. Matching
is pymatgen's StructureMatcher (ltol/stol/angle_tol from settings).

Incremental matching. Each structure gets a `MatchKey` once (stored on the Candidate, so
earlier iterations' keys are read, not recomputed). StructureMatcher is only called on
pairs that can match: same reduced formula, same number of sites in the reduced cell, and
successive minima of the new cell < (1 + ltol) x the old reduced-cell lengths (volume
normalised). These are necessary conditions of ``fit`` with primitive_cell=True,
attempt_supercell=False (a matching lattice basis must have lengths within ltol of the
other cell's, and a basis is never shorter than the successive minima), so the flags equal
the all-pairs comparison. Space group and volume per atom are not filters (the matcher's
tolerances and its volume scaling let matching structures differ in both); they order the
comparisons (with the distance between the cells' lattice shapes) so a match, when there is
one, is usually found first. Reduced cells are
computed once per structure and compared with ``skip_structure_reduction=True``.
``StructureMatcher.group_structures`` is not used: it calls fit(earlier, later), the reverse
of the order S.U.N. has always used (fit is not symmetric), and has no hook for the filters.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from cscflow.checkpoint import resumable
from cscflow.config import ForceFieldSettings, ScoreSettings
from cscflow.energies import EnergyCache, energies_with_model, energy_cache_for
from cscflow.schemas import Candidate, MatchKey, ReferenceEntry
from cscflow.structure_store import CandidateSet, load_candidates, save_candidates

__all__ = [
    "MissingReferenceError",
    "ReevaluateMaker",
    "ScoreMaker",
    "reevaluate_energies",
    "ScoreOutput",
    "SunMatcher",
    "build_hull",
    "hull_entry",
    "match_flags_all_pairs",
    "match_key",
    "reduced_structure",
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

    candidates: CandidateSet = Field(default_factory=CandidateSet, description="one stored document each")
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
    reused: dict[str, int] = Field(
        default_factory=dict, description="entries whose `model` energy came from the run's energy cache"
    )
    recomputed_from: list[str] = Field(default_factory=list, description="model tags replaced")
    n_hull_entries: int = 0
    n_matcher_fits: int = Field(0, description="StructureMatcher calls the S.U.N. flags needed")
    n_match_keys: int = Field(0, description="matching keys computed (the rest were stored)")
    seconds: float = 0.0


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


# --------------------------------------------------------------------------- S.U.N. matching

_SLACK = 1e-6  # relative: the pre-filter must never drop a pair that fit() would accept


def reduced_structure(structure: Structure) -> Structure:
    """The cell StructureMatcher compares (primitive_cell=True): Niggli, then primitive."""
    return Structure.from_sites(structure).get_reduced_structure("niggli").get_primitive_structure()


def _successive_minima(lattice) -> list[float]:
    """Lengths of the shortest 1, 2, 3 linearly independent lattice vectors."""
    radius = max(lattice.get_niggli_reduced_lattice().abc) * (1 + 1e-6) + 1e-8
    frac, dist, _, _ = lattice.get_points_in_sphere(np.zeros((1, 3)), np.zeros(3), radius, zip_results=False)
    cart = lattice.get_cartesian_coords(frac)
    chosen: list[np.ndarray] = []
    for i in np.argsort(dist):
        if dist[i] < 1e-8:
            continue
        v = cart[i]
        if len(chosen) == 1 and np.linalg.norm(np.cross(chosen[0], v)) <= 1e-8 * dist[i] * np.linalg.norm(chosen[0]):
            continue
        if len(chosen) == 2 and abs(np.linalg.det([*chosen, v])) <= 1e-8 * lattice.volume:
            continue
        chosen.append(v)
        if len(chosen) == 3:
            break
    return sorted(float(np.linalg.norm(v)) for v in chosen)


def match_key(structure: Structure, reduced: Structure | None = None, spacegroup: int | None = None) -> MatchKey:
    """The matching key of a structure (see the module docstring).

    `spacegroup` is stored when the caller knows it; Score does not run spglib for it
    (measured ~70 ms per rattled cell at symprec 0.1, more than a StructureMatcher fit, for a
    key that only orders comparisons)."""
    reduced = reduced_structure(structure) if reduced is None else reduced
    scale = (reduced.volume / len(reduced)) ** (1 / 3)
    return MatchKey(
        formula=structure.composition.reduced_formula,
        n_sites=len(reduced),
        minima=[x / scale for x in _successive_minima(reduced.lattice)],
        lengths=sorted(x / scale for x in reduced.lattice.abc),
        spacegroup=spacegroup,
        volume_per_atom=structure.volume / len(structure),
    )


class _Bucket:
    """Structures of one reduced formula: keys as arrays, reduced cells made on demand."""

    def __init__(self):
        self.structures: list[Structure] = []
        self.reduced: list[Structure | None] = []
        self.keys: list[MatchKey] = []
        self._n: list[int] = []
        self._lengths: list[list[float]] = []
        self._arrays = None

    def add(self, structure: Structure, key: MatchKey, reduced: Structure | None = None) -> None:
        self.structures.append(structure)
        self.reduced.append(reduced)
        self.keys.append(key)
        self._n.append(key.n_sites)
        self._lengths.append(key.lengths)
        self._arrays = None

    def plausible(self, key: MatchKey, ltol: float) -> list[int]:
        """Indices that can match a new structure with `key`, likeliest first."""
        if not self.keys:
            return []
        if self._arrays is None:
            self._arrays = (np.array(self._n), np.array(self._lengths))
        n, lengths = self._arrays
        minima = np.array(key.minima)
        ok = (n == key.n_sites) & np.all(minima < (1 + ltol) * (1 + _SLACK) * lengths, axis=1)
        idx = np.flatnonzero(ok)
        if len(idx) > 1:
            order = sorted(idx, key=lambda j: self._closeness(key, j, lengths[j]))
            idx = np.array(order)
        return [int(j) for j in idx]

    def _closeness(self, key: MatchKey, j: int, lengths) -> tuple:
        other = self.keys[j]
        same_sg = key.spacegroup is not None and key.spacegroup == other.spacegroup
        dv = abs(math.log(key.volume_per_atom / other.volume_per_atom))
        return (not same_sg, float(np.abs(np.array(key.lengths) - lengths).sum()) + dv)

    def reduced_at(self, j: int) -> Structure:
        if self.reduced[j] is None:
            self.reduced[j] = reduced_structure(self.structures[j])
        return self.reduced[j]


class SunMatcher:
    """Uniqueness and novelty of structures checked one at a time, in order.

    `add_known` registers a reference or earlier-iteration structure (its stored key is
    reused); `check` flags the next candidate of this iteration and remembers it if unique.
    ``n_fits`` counts StructureMatcher calls.
    """

    def __init__(self, settings: ScoreSettings | None = None):
        settings = settings or ScoreSettings()
        self.ltol = settings.ltol
        self.matcher = StructureMatcher(ltol=settings.ltol, stol=settings.stol, angle_tol=settings.angle_tol)
        self.known: dict[str, _Bucket] = defaultdict(_Bucket)
        self.unique: dict[str, _Bucket] = defaultdict(_Bucket)
        self.n_fits = 0
        self.n_keys = 0

    def add_known(self, structure: Structure, key: MatchKey | None = None) -> None:
        reduced = None
        if key is None:
            reduced = reduced_structure(structure)
            key = match_key(structure, reduced)
            self.n_keys += 1
        self.known[key.formula].add(structure, key, reduced)

    def _any_fit(self, bucket: _Bucket, reduced: Structure, key: MatchKey) -> bool:
        for j in bucket.plausible(key, self.ltol):
            self.n_fits += 1
            if self.matcher.fit(reduced, bucket.reduced_at(j), skip_structure_reduction=True):
                return True
        return False

    def check(self, structure: Structure, key: MatchKey | None = None) -> tuple[bool, bool, MatchKey]:
        """(is_unique, is_novel, key) of the next candidate of this iteration."""
        reduced = reduced_structure(structure)
        if key is None:
            key = match_key(structure, reduced)
            self.n_keys += 1
        unique = not self._any_fit(self.unique[key.formula], reduced, key) if key.formula in self.unique else True
        novel = not self._any_fit(self.known[key.formula], reduced, key) if key.formula in self.known else True
        if unique:
            self.unique[key.formula].add(structure, key, reduced)
        return unique, novel, key


def match_flags_all_pairs(
    structures: Sequence[Structure], known: Sequence[Structure], settings: ScoreSettings | None = None
) -> list[tuple[bool, bool]]:
    """(is_unique, is_novel) by comparing every same-formula pair with StructureMatcher.

    The reference definition (what cscflow did before the incremental matcher): quadratic,
    for tests and benchmarks only.
    """
    settings = settings or ScoreSettings()
    matcher = StructureMatcher(ltol=settings.ltol, stol=settings.stol, angle_tol=settings.angle_tol)
    known_by_formula: dict[str, list[Structure]] = defaultdict(list)
    for k in known:
        known_by_formula[k.composition.reduced_formula].append(k)
    uniques: dict[str, list[Structure]] = defaultdict(list)
    flags = []
    for s in structures:
        formula = s.composition.reduced_formula
        unique = not any(matcher.fit(s, u) for u in uniques[formula])
        if unique:
            uniques[formula].append(s)
        novel = not any(matcher.fit(s, k) for k in known_by_formula[formula])
        flags.append((unique, novel))
    return flags


def score_candidates(
    candidates: Sequence[Candidate],
    references: Sequence[ReferenceEntry],
    previous: Sequence[Candidate] | Sequence[Sequence[Candidate]] = (),
    settings: ScoreSettings | None = None,
    model: str | None = None,
    recompute: Recompute | None = None,
    energy_cache: EnergyCache | None = None,
) -> ScoreOutput:
    """E_hull and S.U.N. flags; returns new Candidate objects (inputs are not modified).

    `model`: the current force-field tag. Entries with another tag get their `model` energy
    from `energy_cache` (cscflow.energies) or, when it has none, from `recompute`, and the
    new energies are stored there; without either a mismatch is an error (a hull mixing
    models is wrong).
    """
    t0 = time.perf_counter()
    settings = settings or ScoreSettings()
    if not references:
        raise MissingReferenceError("no reference entries: the hull needs iteration-0 references")
    prev = [c for c in load_candidates(previous) if _scorable(c)]
    cands = [c.model_copy(deep=True) for c in load_candidates(candidates)]
    current = [i for i, c in enumerate(cands) if _scorable(c)]
    for c in cands:
        if c.status == "relaxed" and c.energy_per_atom is None:
            c.status, c.reject_reason = "rejected", "relaxed without an energy: cannot score"
            logger.warning("candidate %s has no energy: rejected", c.id)

    ref_e = [r.energy_per_atom for r in references]
    prev_e = [c.energy_per_atom for c in prev]
    recomputed = {"references": 0, "previous": 0, "current": 0}
    reused = {"references": 0, "previous": 0, "current": 0}
    replaced: set[str] = set()
    if model is not None:
        groups = {
            "references": ([r.entry_id for r in references], [r.structure for r in references],
                           [r.model for r in references], ref_e),
            "previous": ([c.id for c in prev], [c.structure for c in prev], [c.model for c in prev], prev_e),
            "current": (
                [cands[i].id for i in current],
                [cands[i].structure for i in current],
                [cands[i].model for i in current],
                None,
            ),
        }
        for key, (ids, structures, tags, energies) in groups.items():
            stale = [j for j, tag in enumerate(tags) if tag != model]
            if not stale:
                continue
            try:
                new, n_computed = energies_with_model(
                    [ids[j] for j in stale], [structures[j] for j in stale], model, recompute, energy_cache
                )
            except ValueError:
                raise ValueError(
                    f"{len(stale)} {key} entries carry model {sorted({str(tags[j]) for j in stale})}, "
                    f"not the current {model!r}, and no calculator was given to recompute them"
                ) from None
            for j, e in zip(stale, new):
                replaced.add(str(tags[j]))
                if key == "current":
                    c = cands[current[j]]
                    c.energy_per_atom, c.energy, c.model = e, e * len(c.structure), model
                else:
                    energies[j] = e
            recomputed[key], reused[key] = n_computed, len(stale) - n_computed
            logger.info("score: %d %s energies with %s (%d computed, %d cached)",
                        len(stale), key, model, n_computed, len(stale) - n_computed)

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

    for i in current:
        c = cands[i]
        entry = hull_entry(c.structure, c.energy_per_atom, c.id)
        c.e_hull = float(pd.get_e_above_hull(entry, allow_negative=True))
        c.is_stable = c.e_hull < settings.stability_threshold

    sun = SunMatcher(settings)
    for r in references:
        sun.add_known(r.structure, r.match_key)
    for c in prev:
        sun.add_known(c.structure, c.match_key)
    for i in current:
        c = cands[i]
        c.is_unique, c.is_novel, c.match_key = sun.check(c.structure, c.match_key)

    scored = [cands[i] for i in current]
    return ScoreOutput(
        candidates=save_candidates(cands, "score"),
        n_relaxed=len(scored),
        n_rejected=sum(c.status == "rejected" for c in cands),
        n_stable=sum(bool(c.is_stable) for c in scored),
        n_unique=sum(bool(c.is_unique) for c in scored),
        n_novel=sum(bool(c.is_novel) for c in scored),
        n_sun=sum(c.is_sun for c in scored),
        model=model,
        recomputed={k: v for k, v in recomputed.items() if v},
        reused={k: v for k, v in reused.items() if v},
        recomputed_from=sorted(replaced),
        n_hull_entries=len(hull_entries),
        n_matcher_fits=sun.n_fits,
        n_match_keys=sun.n_keys,
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
        candidates: CandidateSet | list[Candidate],
        references: list[ReferenceEntry],
        previous: list[CandidateSet] | list[list[Candidate]] = (),
        model_path: str | None = None,
        after=None,
    ) -> ScoreOutput:
        """`after`: only orders Score behind the re-evaluation (ReevaluateMaker) whose
        energies it reads from the cache."""
        from jobflow import CURRENT_JOB

        from cscflow.forcefields import get_calculator, model_tag

        tag = model_tag(self.forcefield, model_path)
        # the run's store (jobs get it with expose_store, as the loop's stages do)
        energy_cache = energy_cache_for(CURRENT_JOB.store)
        cache: dict[str, Recompute] = {}

        def recompute(structures: list[Structure]) -> list[float]:
            # the calculator is built only when some energy has to be recomputed
            if "fn" not in cache:
                cache["fn"] = calculator_recompute(get_calculator(self.forcefield, model_path))
            return cache["fn"](structures)

        return score_candidates(
            candidates, references, previous, settings=self.settings, model=tag, recompute=recompute,
            energy_cache=energy_cache,
        )


def reevaluate_energies(items, tag: str, recompute: Recompute, energy_cache: EnergyCache | None) -> dict[str, int]:
    """Energies under `tag` of the references / relaxed candidates in `items` whose energy came
    from another model, computed once and stored in `energy_cache` (what Score then reads)."""
    items = list(items)
    refs = [r for r in items if isinstance(r, ReferenceEntry)]
    cands = [c for c in load_candidates([i for i in items if not isinstance(i, ReferenceEntry)]) if _scorable(c)]
    ids = [r.entry_id for r in refs if r.model != tag] + [c.id for c in cands if c.model != tag]
    structures = [r.structure for r in refs if r.model != tag] + [c.structure for c in cands if c.model != tag]
    if not ids:
        return {"stale": 0, "computed": 0}
    _, computed = energies_with_model(ids, structures, tag, recompute, energy_cache)
    return {"stale": len(ids), "computed": computed}


@job
def reevaluate_shard(items, forcefield: ForceFieldSettings, model_path: str | None = None) -> dict[str, int]:
    """Job: one shard of the re-evaluation (see :class:`ReevaluateMaker`)."""
    from jobflow import CURRENT_JOB

    from cscflow.forcefields import get_calculator, model_tag
    from cscflow.threads import pinned

    tag = model_tag(forcefield, model_path)
    cache: dict[str, Recompute] = {}

    def recompute(structures: list[Structure]) -> list[float]:
        if "fn" not in cache:
            cache["fn"] = calculator_recompute(get_calculator(forcefield, model_path))
        return cache["fn"](structures)

    with pinned():
        return reevaluate_energies(items, tag, recompute, energy_cache_for(CURRENT_JOB.store))


@job
def collect_reevaluation(outputs: list) -> dict[str, int]:
    return {"stale": sum(o["stale"] for o in outputs), "computed": sum(o["computed"] for o in outputs),
            "shards": len(outputs)}


@dataclass
class ReevaluateMaker(Maker):
    """Score's re-evaluation, fanned out: when the force field changed, the references and
    every earlier candidate get their energy under the new model in shards of
    ``shard_size`` structures (GPU workers, batched single points), stored once per
    (structure, model) in the run's energy cache; Score then reads them
    (``ScoreOutput.reused``) instead of computing ~6x10^4 single points in one CPU job."""

    name: str = "reevaluate"
    forcefield: ForceFieldSettings = field(default_factory=ForceFieldSettings)
    shard_size: int = 2048

    @job
    @resumable
    def make(self, references: list[ReferenceEntry], previous=(), model_path: str | None = None):
        from jobflow import Response

        from cscflow.checkpoint import fan_out
        from cscflow.structure_store import merge_sets, shards

        units: list = [list(references)] if references else []
        if previous:
            units += shards(merge_sets(previous), self.shard_size)
        jobs = []
        for i, unit in enumerate(units):
            j = reevaluate_shard(unit, self.forcefield, model_path)
            j.name = f"{self.name} {i + 1}/{len(units)}"
            jobs.append(j)
        collect = collect_reevaluation([j.output for j in jobs])
        return Response(replace=fan_out(jobs, collect, "reevaluate", "shard", self.name))
