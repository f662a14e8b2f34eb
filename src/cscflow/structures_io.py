"""Reading seed structures ("iteration 0") from files and from the Materials Project.

Supported: CIF, POSCAR/CONTCAR/*.vasp, extxyz/xyz (all frames), and JSON lists of records
with a ``cif`` field (``id`` becomes the structure label). A file that cannot be read
is reported by name and skipped or rejected, as the caller chooses.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pymatgen.core import Structure

__all__ = [
    "SeedStructure",
    "StructureReadError",
    "load_seed_files",
    "query_materials_project",
    "read_structures",
]

logger = logging.getLogger(__name__)


class StructureReadError(ValueError):
    """A structure file that cannot be parsed; the message names the file."""


@dataclass
class SeedStructure:
    """One seed structure and where it came from."""

    structure: Structure
    label: str
    source: str
    extra: dict = field(default_factory=dict)


def _from_cif_text(text: str, where: str) -> list[Structure]:
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser = CifParser.from_str(text)
        structures = parser.parse_structures(primitive=False, on_error="ignore")
    if not structures:
        raise StructureReadError(f"{where}: no structure could be parsed from the CIF")
    return structures


def _from_json(path: Path) -> list[SeedStructure]:
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StructureReadError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(records, dict):
        records = records.get("records", [records])
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise StructureReadError(f"{path}: record {i} is not an object")
        label = str(rec.get("id", f"{path.stem}-{i}"))
        if "cif" in rec:
            structures = _from_cif_text(rec["cif"], f"{path} record {label}")
        elif "structure" in rec:
            structures = [Structure.from_dict(rec["structure"])]
        else:
            raise StructureReadError(f"{path}: record {label} has neither 'cif' nor 'structure'")
        extra = {k: v for k, v in rec.items() if k not in ("cif", "structure")}
        out.append(SeedStructure(structures[0], label, str(path), extra))
    return out


def read_structures(path: str | Path) -> list[SeedStructure]:
    """Read every structure in one file; raise StructureReadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise StructureReadError(f"{path}: file not found")
    name = path.name.lower()
    try:
        if name.endswith(".json"):
            return _from_json(path)
        if name.endswith(".cif"):
            structures = _from_cif_text(path.read_text(), str(path))
        elif name.endswith((".xyz", ".extxyz")):
            from ase.io import read
            from pymatgen.io.ase import AseAtomsAdaptor

            frames = read(path, index=":")
            structures = [AseAtomsAdaptor.get_structure(a) for a in frames]
        else:  # POSCAR, CONTCAR, *.vasp and whatever pymatgen recognises
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structures = [Structure.from_file(path)]
    except StructureReadError:
        raise
    except Exception as exc:  # parsers raise anything from ValueError to IndexError
        raise StructureReadError(f"{path}: cannot read structure ({type(exc).__name__}: {exc})") from None
    if not structures:
        raise StructureReadError(f"{path}: no structure found")
    return [
        SeedStructure(s, path.stem if len(structures) == 1 else f"{path.stem}-{i}", str(path))
        for i, s in enumerate(structures)
    ]


def load_seed_files(
    paths: list[str | Path],
    elements: list[str] | None = None,
    on_error: Literal["skip", "raise"] = "skip",
) -> tuple[list[SeedStructure], list[str]]:
    """Read all seed files; return (structures inside the chemical system, problems).

    Unreadable files and unusable structures (elements outside `elements`, disordered)
    are skipped and listed as problems, or raise StructureReadError, as `on_error` says.
    The caller reports the problems (once).
    """
    seeds: list[SeedStructure] = []
    problems: list[str] = []
    allowed = set(elements) if elements else None
    for path in paths:
        try:
            found = read_structures(path)
        except StructureReadError as exc:
            if on_error == "raise":
                raise
            problems.append(str(exc))
            continue
        for seed in found:
            symbols = {el.symbol for el in seed.structure.composition.elements}
            if allowed is not None and not symbols <= allowed:
                problems.append(
                    f"{seed.source}: {seed.label} ({seed.structure.composition.reduced_formula}) "
                    f"is outside the chemical system {'-'.join(sorted(allowed))}"
                )
                continue
            if not seed.structure.is_ordered:
                problems.append(f"{seed.source}: {seed.label} is disordered")
                continue
            seeds.append(seed)
    if problems and on_error == "raise":
        raise StructureReadError("; ".join(problems))
    return seeds, problems


def query_materials_project(elements: list[str], api_key: str | None = None) -> list[SeedStructure]:
    """All MP structures in the chemical system and its subsystems (needs MP_API_KEY)."""
    api_key = api_key or os.environ.get("MP_API_KEY")
    if not api_key:
        raise RuntimeError("materials_project: true needs the MP_API_KEY environment variable")
    from itertools import combinations

    from mp_api.client import MPRester

    # one summary query for the system and every subsystem (chemsys takes a list); not
    # get_entries_in_chemsys: seeds need one structure per material, not entries per functional
    elements = sorted(set(elements))
    systems = ["-".join(sub) for n in range(1, len(elements) + 1) for sub in combinations(elements, n)]
    with MPRester(api_key) as mpr:
        docs = mpr.materials.summary.search(chemsys=systems, fields=["material_id", "structure"])
    return [SeedStructure(d.structure, str(d.material_id), "materials_project") for d in docs]
