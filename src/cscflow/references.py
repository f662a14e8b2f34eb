"""Iteration 0: the reference structures the hull is built from.

Sources, in order: the built-in references (``use_prototypes``; ``builtin_references``:
the Materials Project snapshot shipped in ``cscflow/data/mp_lips.json`` for Li-P-S, CC BY
4.0, or prototypes built from crystallographic facts for other systems), the spec's seed
files, and the Materials Project (``materials_project: true`` with MP_API_KEY). They are
read when the flow is built (on the submitting machine), relaxed by the exploration's own
force field (the paper recomputes iteration 0 with its own settings) and become
ReferenceEntry documents.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from jobflow import Maker, job
from pydantic import BaseModel, Field
from pymatgen.core import Structure

from cscflow.checkpoint import resumable
from cscflow.config import ExplorationSpec, SpecError
from cscflow.schemas import Candidate, Provenance, ReferenceEntry
from cscflow.structure_store import load_candidates

__all__ = ["ReferenceMaker", "ReferencesOutput", "builtin_references", "initial_candidates", "mp_snapshot"]

logger = logging.getLogger(__name__)


MP_SNAPSHOT = "mp_lips.json"


@lru_cache(maxsize=2)
def _snapshot(name: str) -> dict:
    return json.loads(resources.files("cscflow.data").joinpath(name).read_text())


def mp_snapshot(elements, max_atoms: int | None = None, name: str = MP_SNAPSHOT) -> list[tuple[str, Structure]]:
    """(MP id, primitive structure) of the shipped Materials Project snapshot within ``elements``.

    Data from the Materials Project, CC BY 4.0 (cscflow/data/README.md): Jain et al.,
    APL Materials 1, 011002 (2013).
    """
    allowed = set(elements)
    out = []
    for rec in _snapshot(name)["structures"]:
        structure = Structure.from_dict(rec["structure"])
        if {el.symbol for el in structure.composition.elements} <= allowed and (
            max_atoms is None or len(structure) <= max_atoms
        ):
            out.append((rec["material_id"], structure))
    return out


def builtin_references(spec: ExplorationSpec) -> tuple[str, list[tuple[str, Structure]]]:
    """("materials_project", [(mp id, structure)]) or ("prototype", [(label, structure)])."""
    elements = spec.chemical_system.elements
    kind = spec.builtin_references
    if kind == "auto":
        covered = set(_snapshot(MP_SNAPSHOT)["elements"])
        kind = "mp_snapshot" if set(elements) == covered else "prototypes"
    if kind == "mp_snapshot":
        return "materials_project", mp_snapshot(elements, spec.prototype_max_atoms)
    from cscflow.prototypes import prototype_structures

    return "prototype", [
        (label, s) for label, s in prototype_structures(elements)
        if spec.prototype_max_atoms is None or s.num_sites <= spec.prototype_max_atoms
    ]


def initial_candidates(spec: ExplorationSpec) -> list[Candidate]:
    """Iteration-0 structures as Candidates with provenance (prototype / seed / MP)."""
    from cscflow.structures_io import load_seed_files, query_materials_project

    elements = spec.chemical_system.elements
    out: list[Candidate] = []

    def add(structure, generator: str, label: str, parent: str | None):
        idx = len(out)
        prov = Provenance(
            candidate_id=f"it0-{generator}-{idx:04d}-{label}",
            iteration=0,
            generator=generator,
            parent=parent,
            sample_index=idx,
        )
        out.append(Candidate(provenance=prov, structure=structure))

    if spec.use_prototypes:
        generator, structures = builtin_references(spec)
        for label, structure in structures:
            # MP entries keep their id as parent (ReferenceEntry.source = the MP id)
            add(structure, generator, label, label if generator == "materials_project" else None)
    seeds, problems = load_seed_files(spec.seeds, elements, on_error=spec.seed_errors)
    for problem in problems:
        logger.warning(problem)
    for seed in seeds:
        add(seed.structure, "seed", seed.label, f"{seed.source}:{seed.label}")
    if spec.materials_project:
        for seed in query_materials_project(elements):
            add(seed.structure, "materials_project", seed.label, seed.label)
    if not out:
        raise SpecError(
            "iteration 0 has no reference structures: enable use_prototypes, list seed files "
            "under seeds, or set materials_project: true"
        )
    present = {el.symbol for c in out for el in c.structure.composition.elements}
    missing = sorted(set(elements) - present)
    if missing:
        raise SpecError(
            f"no reference structure contains {', '.join(missing)}: the hull needs every element; "
            "add seed files (seeds:) with those elements"
        )
    return out


class ReferencesOutput(BaseModel):
    references: list[ReferenceEntry] = Field(default_factory=list)
    candidates: list[Candidate] = Field(default_factory=list, description="relaxed references")
    n_rejected: int = 0
    rejected: dict[str, str] = Field(default_factory=dict, description="id -> reason")


@dataclass
class ReferenceMaker(Maker):
    """Turn relaxed iteration-0 candidates into hull references."""

    name: str = "references"

    @job(data=["references", "candidates"])
    @resumable
    def make(self, candidates) -> ReferencesOutput:
        """References keep their S.U.N. matching keys: every later Score reads them, none recomputes."""
        from cscflow.score import match_key

        candidates = load_candidates(candidates)
        good = [c for c in candidates if c.status == "relaxed" and c.energy_per_atom is not None]
        refs = [
            ReferenceEntry(
                entry_id=c.id,
                structure=c.structure,
                energy_per_atom=c.energy_per_atom,
                model=c.model or "unknown",
                source=c.provenance.generator if c.provenance.parent is None else c.provenance.parent,
                match_key=match_key(c.structure),
            )
            for c in good
        ]
        rejected = {c.id: c.reject_reason or c.status for c in candidates if c not in good}
        for cid, why in rejected.items():
            logger.warning("reference %s rejected: %s", cid, why)
        return ReferencesOutput(
            references=refs, candidates=good, n_rejected=len(rejected), rejected=rejected
        )
