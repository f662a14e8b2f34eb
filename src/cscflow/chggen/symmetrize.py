"""Framework symmetrization (CHGGen step 3) and the space-group test used by the metrics.

Guests (Li by default) are removed; the remaining framework is refined with spglib at
increasing tolerance until its space group is above P1 (paper 002: "incremental structural
matching tolerance"). Refinement is ASE's ``refine_symmetry`` (spglib underneath): cell and
positions are symmetrized in place, so the framework keeps its cell and its atom count and
the guests can be re-inserted into the same cell. The tolerance reached is recorded.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Structure

__all__ = ["FrameworkResult", "remove_guests", "space_group", "symmetrize_framework"]

logger = logging.getLogger(__name__)


class FrameworkResult(BaseModel):
    """A symmetrized host framework and the guests to put back."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    parent: str = ""
    host: Structure | None = None
    guests: dict[str, int] = Field(default_factory=dict)
    success: bool = False
    tolerance: float | None = Field(None, description="symprec (Å) at which the space group rose above P1")
    space_group_before: int = 1
    space_group: int = 1
    space_group_symbol: str = "P1"
    reason: str | None = None


def space_group(structure: Structure, symprec: float = 0.1, angle_tolerance: float = 5.0) -> tuple[int, str]:
    """(number, international symbol) from spglib; (1, 'P1') when spglib finds nothing."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        sga = SpacegroupAnalyzer(structure, symprec=symprec, angle_tolerance=angle_tolerance)
        return int(sga.get_space_group_number()), str(sga.get_space_group_symbol())
    except Exception:  # noqa: BLE001  spglib gives up on badly distorted cells
        return 1, "P1"


def remove_guests(structure: Structure, guest_species: Sequence[str]) -> tuple[Structure, dict[str, int]]:
    """(framework, {guest element: count removed})."""
    guests = Counter(site.specie.symbol for site in structure if site.specie.symbol in set(guest_species))
    host = structure.copy()
    host.remove_species(list(guest_species))
    for key in list(host.site_properties):
        host.remove_site_property(key)
    return host, dict(guests)


def symmetrize_framework(
    structure: Structure,
    guest_species: Sequence[str] = ("Li",),
    tolerances: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    angle_tolerance: float = 5.0,
    min_space_group: int = 2,
    parent: str = "",
) -> FrameworkResult:
    """Remove guests, refine the framework at rising tolerance until its space group >= ``min_space_group``."""
    from ase.spacegroup.symmetrize import refine_symmetry
    from pymatgen.io.ase import AseAtomsAdaptor

    host, guests = remove_guests(structure, guest_species)
    if len(host) == 0:
        return FrameworkResult(parent=parent, guests=guests, reason="no_host_atoms")
    if not guests:
        return FrameworkResult(parent=parent, host=host, reason="no_guest_atoms")
    before, _ = space_group(host, min(tolerances), angle_tolerance)
    for tol in tolerances:
        number, _ = space_group(host, tol, angle_tolerance)
        if number < min_space_group:
            continue
        atoms = AseAtomsAdaptor.get_atoms(host)
        try:
            refine_symmetry(atoms, symprec=tol)
        except Exception as exc:  # noqa: BLE001
            logger.debug("refine_symmetry at %g failed: %s", tol, exc)
            continue
        atoms.wrap()
        refined = AseAtomsAdaptor.get_structure(atoms)
        final, symbol = space_group(refined, 1e-3, angle_tolerance)  # tight: the symmetry is now exact
        if final >= min_space_group:
            return FrameworkResult(parent=parent, host=refined, guests=guests, success=True, tolerance=tol,
                                   space_group_before=before, space_group=final, space_group_symbol=symbol)
    return FrameworkResult(parent=parent, host=host, guests=guests, space_group_before=before,
                           space_group=before, reason="no_symmetry_up_to_max_tolerance")
