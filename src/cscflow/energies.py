"""Energies per (structure, model tag), computed once and kept in the run's store.

When the force field changes, the hull needs every reference and earlier candidate
re-evaluated with the new model. Those single points are expensive (~6x10^4 at iteration 7
of a paper-size run) and must not be redone by every later stage, by a resumed stage or by
the report. One document per (structure id, model tag) lives in a maggma store next to the
run's job documents: the JobStore's ``energies`` additional store when it has one, else a
dedicated ``energies`` collection beside its docs store (same MontyDB/MongoDB database).
A record also holds a hash of the structure: a structure that changed under the same id
is a miss, never a stale hit.

API: ``EnergyCache.get(ids, model, structures)``, ``EnergyCache.put(...)``,
``energies_with_model(...)`` (the score path), ``energy_cache_for(job_store)``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import numpy as np
from pydantic import BaseModel, Field
from pymatgen.core import Structure

__all__ = [
    "COLLECTION",
    "EnergyCache",
    "EnergyRecord",
    "energies_with_model",
    "energy_cache_for",
    "structure_hash",
]

logger = logging.getLogger(__name__)

COLLECTION = "energies"
KEY = "energy_id"

# structures -> energies per atom (eV/atom) from one model
Compute = Callable[[list[Structure]], list[float]]


class EnergyRecord(BaseModel):
    """The energy of one structure under one force field."""

    energy_id: str = Field(..., description="'<model>|<structure id>', the store key")
    structure_id: str
    model: str = Field(..., description="cscflow.forcefields.model_tag")
    energy_per_atom: float = Field(..., description="eV/atom")
    n_atoms: int
    formula: str
    structure_hash: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


def structure_hash(structure: Structure) -> str:
    """Short hash of species, lattice and fractional positions (rounded to 1e-5)."""
    h = hashlib.sha1()
    h.update(",".join(site.species_string for site in structure).encode())
    h.update(np.round(structure.lattice.matrix, 5).tobytes())
    h.update(np.round(np.mod(structure.frac_coords, 1.0), 5).tobytes())
    return h.hexdigest()[:16]


def _energy_id(model: str, structure_id: str) -> str:
    return f"{model}|{structure_id}"


class EnergyCache:
    """Energies per (structure id, model tag) in a maggma store (MemoryStore when none given)."""

    def __init__(self, store=None):
        if store is None:
            from maggma.stores import MemoryStore

            store = MemoryStore(COLLECTION, key=KEY)
        self.store = store
        self._connected = False

    def _connect(self) -> None:
        if not self._connected:
            self.store.connect()
            for field in ("model", "structure_id"):
                try:
                    self.store.ensure_index(field)
                except Exception:  # some backends (MontyDB) index lazily or not at all
                    pass
            self._connected = True

    def get(
        self, ids: Sequence[str], model: str, structures: Sequence[Structure] | None = None
    ) -> dict[str, float]:
        """Energies per atom found for `ids` under `model`; with `structures`, only those whose
        stored hash matches the structure (a changed structure is a miss)."""
        self._connect()
        wanted = dict.fromkeys(ids)
        if structures is not None:
            wanted = {i: structure_hash(s) for i, s in zip(ids, structures)}
        if not wanted:
            return {}
        props = ["structure_id", "energy_per_atom", "structure_hash"]
        if len(wanted) <= 1000:
            criteria = {KEY: {"$in": [_energy_id(model, i) for i in wanted]}}
        else:  # one scan of this model's records beats a huge $in
            criteria = {"model": model}
        found: dict[str, float] = {}
        for doc in self.store.query(criteria=criteria, properties=props):
            sid = doc["structure_id"]
            if sid not in wanted:
                continue
            if wanted[sid] is not None and doc.get("structure_hash") != wanted[sid]:
                continue
            found[sid] = float(doc["energy_per_atom"])
        return found

    def put(self, ids: Sequence[str], structures: Sequence[Structure], energies: Sequence[float], model: str) -> None:
        """Store (or replace) one record per structure."""
        self._connect()
        docs = [
            EnergyRecord(
                energy_id=_energy_id(model, i),
                structure_id=i,
                model=model,
                energy_per_atom=float(e),
                n_atoms=len(s),
                formula=s.composition.reduced_formula,
                structure_hash=structure_hash(s),
            ).model_dump()
            for i, s, e in zip(ids, structures, energies)
        ]
        if docs:
            self.store.update(docs, key=KEY)

    def count(self, model: str | None = None) -> int:
        self._connect()
        return self.store.count({"model": model} if model else {})

    def close(self) -> None:
        if self._connected:
            self.store.close()
            self._connected = False


def energy_cache_for(job_store) -> EnergyCache | None:
    """The run's energy cache: the JobStore's ``energies`` additional store, else an
    ``energies`` collection beside its docs store (:func:`cscflow.structure_store.collection_for`).
    None for in-memory or per-job file stores (nothing to share with later jobs) or no store."""
    from cscflow.structure_store import collection_for

    store = collection_for(job_store, COLLECTION, key=KEY)
    return EnergyCache(store) if store is not None else None


def energies_with_model(
    ids: Sequence[str],
    structures: Sequence[Structure],
    model: str,
    compute: Compute | None,
    cache: EnergyCache | None = None,
    batch_size: int = 512,
) -> tuple[list[float], int]:
    """Energies per atom of `structures` under `model`: cached ones read, the rest computed
    with `compute` in batches and stored batch by batch (an interrupted job keeps what it
    finished). Returns (energies, number computed). Without `compute`, a miss is an error."""
    ids, structures = list(ids), list(structures)
    found = cache.get(ids, model, structures) if cache is not None else {}
    missing = [j for j, i in enumerate(ids) if i not in found]
    if missing and compute is None:
        raise ValueError(
            f"{len(missing)} structures have no energy under {model!r} and no calculator was given to compute them"
        )
    energies = [found.get(i) for i in ids]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        values = compute([structures[j] for j in chunk])
        for j, e in zip(chunk, values):
            energies[j] = float(e)
        if cache is not None:
            cache.put([ids[j] for j in chunk], [structures[j] for j in chunk], values, model)
    if found:
        logger.info("energies: %d of %d read from the cache for %s", len(found), len(ids), model)
    return energies, len(missing)
