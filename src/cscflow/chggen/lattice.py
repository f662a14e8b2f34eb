"""Lattice random search at fixed volume N·V0 (CHGGen step 1).

Bravais lattices with random lattice-constant ratios and angles, scaled to N·V0: a prior
that the diffusion model fills and the MLFF relaxation then optimises. V0 comes from the
reference phases (same reduced composition, else a composition-weighted mix of the
elemental references), else from atomic radii.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from pymatgen.core import Composition, Lattice, Structure

from cscflow.chggen.settings import CRYSTAL_SYSTEMS

__all__ = ["estimate_volume_per_atom", "random_lattice"]


def _shape_factor(alpha: float, beta: float, gamma: float) -> float:
    ca, cb, cg = (math.cos(math.radians(x)) for x in (alpha, beta, gamma))
    v = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    return math.sqrt(v) if v > 0 else 0.0


def random_lattice(
    n_atoms: int,
    volume_per_atom: float,
    rng: np.random.Generator,
    crystal_system: str | None = None,
    ratio_range: tuple[float, float] = (0.7, 1.5),
    angle_range: tuple[float, float] = (65.0, 115.0),
    min_shape_factor: float = 0.5,
) -> tuple[Lattice, str]:
    """A random lattice of ``crystal_system`` (random one when None) with volume n·V0."""
    if n_atoms < 1 or volume_per_atom <= 0:
        raise ValueError(f"need n_atoms >= 1 and volume_per_atom > 0, got {n_atoms}, {volume_per_atom}")
    system = crystal_system or str(rng.choice(CRYSTAL_SYSTEMS))
    if system not in CRYSTAL_SYSTEMS:
        raise ValueError(f"unknown crystal system {system!r} (one of {', '.join(CRYSTAL_SYSTEMS)})")
    lo, hi = ratio_range

    def ratio() -> float:
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    def angle() -> float:
        return float(rng.uniform(*angle_range))

    for _ in range(1000):
        a, b, c, al, be, ga = 1.0, 1.0, 1.0, 90.0, 90.0, 90.0
        if system == "triclinic":
            b, c, al, be, ga = ratio(), ratio(), angle(), angle(), angle()
        elif system == "monoclinic":
            b, c, be = ratio(), ratio(), angle()
        elif system == "orthorhombic":
            b, c = ratio(), ratio()
        elif system == "tetragonal":
            c = ratio()
        elif system == "hexagonal":
            c, ga = ratio(), 120.0
        elif system == "trigonal":  # rhombohedral setting
            al = be = ga = float(rng.uniform(max(angle_range[0], 50.0), min(angle_range[1], 110.0)))
        if _shape_factor(al, be, ga) >= min_shape_factor:
            break
    else:  # pragma: no cover - angle ranges that never give a cell are rejected by settings
        raise ValueError(f"no {system} cell with shape factor >= {min_shape_factor} in {angle_range}")
    lattice = Lattice.from_parameters(a, b, c, al, be, ga)
    return lattice.scale(n_atoms * volume_per_atom), system


def estimate_volume_per_atom(composition: Composition | str, references: Sequence[Structure] = ()) -> tuple[float, str]:
    """(V0 in Å^3/atom, where it came from) for ``composition``."""
    comp = Composition(composition)
    same = [s.volume / len(s) for s in references if s.composition.reduced_formula == comp.reduced_formula]
    if same:
        return float(np.mean(same)), "references:same_composition"
    elemental: dict[str, list[float]] = {}
    for s in references:
        if len(s.composition.elements) == 1:
            elemental.setdefault(s.composition.elements[0].symbol, []).append(s.volume / len(s))
    frac = comp.fractional_composition
    if all(el.symbol in elemental for el in comp.elements):
        v = sum(frac[el] * float(np.median(elemental[el.symbol])) for el in comp.elements)
        return float(v), "references:elemental_mix"
    v = 0.0
    for el in comp.elements:
        r = el.atomic_radius or el.atomic_radius_calculated or 1.5
        v += frac[el] * (4.0 / 3.0) * math.pi * float(r) ** 3 / 0.52  # simple-cubic packing of spheres
    return float(v), "atomic_radii"
