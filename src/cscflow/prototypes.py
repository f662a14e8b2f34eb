"""Iteration-0 reference structures built from crystallographic facts (no files, no network).

Each prototype is ``Structure.from_spacegroup`` with literature lattice parameters and
Wyckoff positions (sources next to each entry), reduced to its primitive cell. They are
experimental room-temperature (or low-temperature, where noted) structures: the force
field relaxes them before they enter the hull, so the exact numbers matter little, but the
topology (black-P layers, S8 / S6 rings, antifluorite, Na3As type) must be right; the
tests check space group, density and bond lengths, and each one was checked to match the
corresponding Materials Project entry with pymatgen's StructureMatcher.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

from pymatgen.core import Element, Lattice, Structure

__all__ = ["PROTOTYPES", "Prototype", "prototype_structures"]

@dataclass(frozen=True)
class Prototype:
    """One literature structure: ``label`` is readable and safe in ids and file names."""

    label: str
    space_group: int
    lattice: tuple  # ("cubic", a) | ("hexagonal", a, c) | ("orthorhombic", a, b, c)
    species: tuple[str, ...]
    coords: tuple[tuple[float, float, float], ...]
    source: str

    @property
    def elements(self) -> frozenset[str]:
        return frozenset(self.species)

    def build(self) -> Structure:
        kind, *params = self.lattice
        lattice = getattr(Lattice, kind)(*params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = Structure.from_spacegroup(
                self.space_group, lattice, list(self.species), [list(c) for c in self.coords]
            )
        return conv.get_primitive_structure()


PROTOTYPES: tuple[Prototype, ...] = (
    # bcc Li, a = 3.51 Å at room temperature (R. W. G. Wyckoff, Crystal Structures,
    # 2nd ed., vol. 1, Wiley 1963).
    Prototype("Li-bcc-Im-3m", 229, ("cubic", 3.51), ("Li",), ((0, 0, 0),),
              "Wyckoff, Crystal Structures (1963)"),
    # Black phosphorus, Cmce (formerly Cmca), P on 8f (0, y, z): A. Brown & S. Rundqvist,
    # Acta Cryst. 19, 684 (1965).
    Prototype("P-black-Cmce", 64, ("orthorhombic", 3.3136, 10.478, 4.3763), ("P",),
              ((0.0, 0.10168, 0.08056),), "Brown & Rundqvist, Acta Cryst. 19, 684 (1965)"),
    # alpha-S8 (orthorhombic sulfur), Fddd, four S on 32h: S. J. Rettig & J. Trotter,
    # Acta Cryst. C43, 2260 (1987). Their coordinates are for origin choice 2; pymatgen's
    # Fddd is origin choice 1, hence +1/8 on every coordinate.
    Prototype("S-alpha-S8-Fddd", 70, ("orthorhombic", 10.4646, 12.8660, 24.4860), ("S",) * 4,
              tuple(tuple(round(x + 0.125, 5) for x in xyz) for xyz in (
                  (0.8554, 0.9526, 0.9516), (0.7844, 0.0301, 0.0763),
                  (0.7069, 0.9795, 0.0040), (0.7862, 0.9073, 0.1290))),
              "Rettig & Trotter, Acta Cryst. C43, 2260 (1987)"),
    # Rhombohedral cyclo-S6, R-3 (hexagonal axes), S on 18f: J. Steidel, J. Pickardt &
    # R. Steudel, Z. Naturforsch. 33b, 1554 (1978).
    Prototype("S-S6-R-3", 148, ("hexagonal", 10.766, 4.225), ("S",),
              ((0.1454, 0.1882, 0.1055),), "Steidel, Pickardt & Steudel, Z. Naturforsch. 33b (1978)"),
    # Li2S, antifluorite, a = 5.708 Å: Li on 8c, S on 4a (E. Zintl, A. Harder & B. Dauth,
    # Z. Elektrochem. 40, 588 (1934)).
    Prototype("Li2S-antifluorite-Fm-3m", 225, ("cubic", 5.708), ("Li", "S"),
              ((0.25, 0.25, 0.25), (0, 0, 0)), "Zintl, Harder & Dauth (1934)"),
    # Li3P, Na3As type P6_3/mmc: Li1 2b, Li2 4f (z = 0.583), P 2c; a = 4.273, c = 7.594 Å
    # (G. Brauer & E. Zintl, Z. Phys. Chem. B37, 323 (1937); lattice from later refinements).
    Prototype("Li3P-Na3As-P63mmc", 194, ("hexagonal", 4.273, 7.594), ("Li", "Li", "P"),
              ((0, 0, 0.25), (1 / 3, 2 / 3, 0.583), (1 / 3, 2 / 3, 0.25)),
              "Brauer & Zintl (1937)"),
    # hcp Zn, a = 2.665, c = 4.947 Å (Wyckoff 1963), Zn on 2c.
    Prototype("Zn-hcp-P63mmc", 194, ("hexagonal", 2.665, 4.947), ("Zn",),
              ((1 / 3, 2 / 3, 0.25),), "Wyckoff, Crystal Structures (1963)"),
    # Diamond Si, a = 5.431 Å, Si on 8a (Wyckoff 1963).
    Prototype("Si-diamond-Fd-3m", 227, ("cubic", 5.431), ("Si",), ((0, 0, 0),),
              "Wyckoff, Crystal Structures (1963)"),
    # Sphalerite ZnS, a = 5.409 Å, Zn 4a, S 4c (Wyckoff 1963).
    Prototype("ZnS-sphalerite-F-43m", 216, ("cubic", 5.409), ("Zn", "S"),
              ((0, 0, 0), (0.25, 0.25, 0.25)), "Wyckoff, Crystal Structures (1963)"),
    # Li15Si4, I-43d, a = 10.685 Å: Li1 12a, Li2 48e, Si 16c (x = 0.4583)
    # (M. N. Obrovac & L. Christensen, Electrochem. Solid-State Lett. 7, A93 (2004);
    # Y. Kubota et al., J. Appl. Phys. 102, 053704 (2007)).
    Prototype("Li15Si4-I-43d", 220, ("cubic", 10.685), ("Li", "Li", "Si"),
              ((0.375, 0, 0.25), (0.1178, 0.1573, 0.9626), (0.4583, 0.4583, 0.4583)),
              "Obrovac & Christensen (2004); Kubota et al. (2007)"),
)


@lru_cache(maxsize=None)
def _built(label: str) -> Structure:
    proto = next(p for p in PROTOTYPES if p.label == label)
    return proto.build()


def prototype_structures(elements: list[str]) -> list[tuple[str, Structure]]:
    """(label, primitive Structure) of every prototype whose elements are within ``elements``.

    Elements of the request that no prototype covers are named in a warning: the hull then
    needs seed files for them.
    """
    if isinstance(elements, str):
        raise TypeError("elements must be a list of symbols, e.g. ['Li', 'P', 'S'], not a string")
    requested = set()
    for symbol in elements:
        if not Element.is_valid_symbol(str(symbol)):
            raise ValueError(f"unknown element {symbol!r}")
        requested.add(str(symbol))
    out = [(p.label, _built(p.label).copy()) for p in PROTOTYPES if p.elements <= requested]
    covered = {el for label, _ in out for el in next(p for p in PROTOTYPES if p.label == label).elements}
    missing = sorted(requested - covered)
    if missing:
        warnings.warn(
            f"no prototype structure for {', '.join(missing)}: add seed files with these elements",
            stacklevel=2,
        )
    return out
