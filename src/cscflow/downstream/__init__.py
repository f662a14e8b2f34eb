"""Downstream applications run with a (trained) force field after an exploration.

* :mod:`cscflow.downstream.qha` - P-T phase diagrams from quasi-harmonic phonons
  (paper 000 SI 1.3, Fig. 5): ``QhaMaker``.
* :mod:`cscflow.downstream.conductivity` - Li-ion conductivity screening by MD
  (SI 1.4, SI Table 1, Fig. 6): ``ConductivityMaker``.

Both take lists of ``Candidate`` / ``ReferenceEntry`` documents or plain ``Structure``
objects, so they can be appended to a finished exploration or run on their own. This
module holds what both need: input normalisation, the force field, supercells.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure

    from cscflow.config import ForceFieldSettings

__all__ = [
    "Item",
    "as_items",
    "atomate2_force_field",
    "isotropic_supercell_matrix",
    "resolve_calculator",
    "resolve_model_tag",
    "settings_calculator",
    # lazily imported from the submodules
    "QhaMaker",
    "QhaSettings",
    "QhaOutput",
    "ConductivityMaker",
    "ConductivitySettings",
    "ConductivityOutput",
]

_LAZY = {
    "QhaMaker": "qha",
    "QhaSettings": "qha",
    "QhaOutput": "qha",
    "ConductivityMaker": "conductivity",
    "ConductivitySettings": "conductivity",
    "ConductivityOutput": "conductivity",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Item:
    """One structure to analyse, with what the exploration knew about it."""

    id: str
    structure: Structure
    iteration: int | None = None
    e_hull: float | None = None
    energy_per_atom: float | None = None

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


def _iteration_from_source(source: str) -> int | None:
    match = re.search(r"iteration\s*(\d+)", source or "")
    return int(match.group(1)) if match else 0


def as_items(inputs: Any) -> list[Item]:
    """Candidates, reference entries, structures (or a mix) -> :class:`Item` list.

    Rejected candidates are dropped: they have no trustworthy relaxed structure.
    """
    from pymatgen.core import Structure

    from cscflow.schemas import Candidate, ReferenceEntry

    if inputs is None:
        raise ValueError("no structures given: pass candidates, reference entries or structures")
    if isinstance(inputs, (Structure, Candidate, ReferenceEntry)):
        inputs = [inputs]
    items: list[Item] = []
    seen: set[str] = set()
    for i, obj in enumerate(inputs):
        if isinstance(obj, dict) and "@module" in obj:  # a serialised document from a store
            from monty.json import MontyDecoder

            obj = MontyDecoder().process_decoded(obj)
        if isinstance(obj, Candidate):
            if obj.status == "rejected":
                continue
            item = Item(obj.id, obj.structure, obj.provenance.iteration, obj.e_hull, obj.energy_per_atom)
        elif isinstance(obj, ReferenceEntry):
            item = Item(obj.entry_id, obj.structure, _iteration_from_source(obj.source),
                        None, obj.energy_per_atom)
        elif isinstance(obj, Structure):
            item = Item(str(obj.properties.get("id", f"structure-{i}")), obj,
                        obj.properties.get("iteration"), obj.properties.get("e_hull"))
        else:
            raise TypeError(
                f"item {i} is a {type(obj).__name__}: expected Candidate, ReferenceEntry or Structure"
            )
        if not item.structure.is_ordered:
            raise ValueError(f"{item.id}: disordered structures cannot be simulated; order it first")
        if item.id in seen:
            item.id = f"{item.id}-{i}"
        seen.add(item.id)
        items.append(item)
    return items


def resolve_calculator(forcefield: ForceFieldSettings | None = None, model_path: str | Path | None = None) -> Calculator:
    """``cscflow.forcefields.get_calculator`` with the default force field when none is given."""
    from cscflow.config import ForceFieldSettings
    from cscflow.forcefields import get_calculator

    return get_calculator(forcefield or ForceFieldSettings(), model_path)


def resolve_model_tag(forcefield: ForceFieldSettings | None = None, model_path: str | Path | None = None) -> str:
    """``cscflow.forcefields.model_tag`` with the default force field when none is given."""
    from cscflow.config import ForceFieldSettings
    from cscflow.forcefields import model_tag

    return model_tag(forcefield or ForceFieldSettings(), model_path)


def settings_calculator(**kwargs) -> Calculator:
    """Calculator factory that atomate2 can import: ForceFieldSettings fields (+ model_path)."""
    from cscflow.config import ForceFieldSettings

    model_path = kwargs.pop("override_model_path", None)
    return resolve_calculator(ForceFieldSettings(**kwargs), model_path)


def atomate2_force_field(
    forcefield: ForceFieldSettings | None = None, model_path: str | Path | None = None
) -> tuple[str | dict, dict]:
    """``(force_field_name, calculator_kwargs)`` for atomate2 0.1.5 force-field makers.

    A frozen DeePMD model maps to atomate2's own ``MLFF.DeepMD`` (``deepmd.calculator.DP``);
    CHGNet 0.3.0 to ``MLFF.CHGNet`` (the ``chgnet`` package's calculator; atomate2 falls back
    to matgl only when chgnet is missing). Anything else goes through
    :func:`settings_calculator`, an importable callable atomate2 accepts as a monty dict.
    """
    from cscflow.config import ForceFieldSettings

    from cscflow.forcefields import model_backend

    forcefield = forcefield or ForceFieldSettings()
    meta = {"@module": __name__, "@callable": "settings_calculator"}
    if model_path is not None and Path(model_path).is_file() and model_backend(model_path) not in (None, "deepmd"):
        # a trained CHGNet/SevenNet/MACE/MatterSim model: cscflow.forcefields loads it
        return meta, {**forcefield.model_dump(mode="json"), "override_model_path": str(Path(model_path).resolve())}
    path = model_path or forcefield.model_path
    if path is not None and (model_path is not None or forcefield.backend == "deepmd"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"force-field model {path} does not exist")
        kwargs: dict = {"model": str(Path(path).resolve())}
        if forcefield.model_branch:
            kwargs["head"] = forcefield.model_branch
        return "DeepMD", kwargs
    if forcefield.backend == "chgnet" and forcefield.chgnet_version == "0.3.0":
        return "CHGNet", {"use_device": forcefield.device}
    return meta, forcefield.model_dump(mode="json")


def isotropic_supercell_matrix(structure: Structure, min_length: float, max_atoms: int | None = None) -> list[list[int]]:
    """Diagonal supercell whose three plane spacings are all >= ``min_length``.

    Using the perpendicular widths (not just |a|, |b|, |c|) keeps periodic images at least
    ``min_length`` apart in skewed cells too; repeating each axis by the ceiling of
    ``min_length / width`` gives near-equal lengths, as the paper asks.

    Not pymatgen's ``CubicSupercellTransformation``: it bounds in-plane heights, not plane
    spacings (mp-641703 at 6 Å: 5.74 Å), and its non-diagonal cells break the symmetry phonopy
    uses (primitive Li2S at 7 Å: 54 atoms x 9 displacements vs 81 atoms x 2 here).
    """
    if min_length <= 0:
        return np.eye(3, dtype=int).tolist()
    matrix = structure.lattice.matrix
    volume = abs(np.linalg.det(matrix))
    widths = [volume / np.linalg.norm(np.cross(matrix[(i + 1) % 3], matrix[(i + 2) % 3])) for i in range(3)]
    reps = [max(1, math.ceil(min_length / w - 1e-6)) for w in widths]
    n_atoms = len(structure) * int(np.prod(reps))
    if max_atoms is not None and n_atoms > max_atoms:
        raise ValueError(
            f"a {min_length} Å supercell of {structure.composition.reduced_formula} needs "
            f"{n_atoms} atoms (> max_atoms={max_atoms}); lower min_length or raise max_atoms"
        )
    return np.diag(reps).astype(int).tolist()
