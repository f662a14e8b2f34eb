"""Random symmetric crystals with pyxtal: the baseline generator (no learned model).

Sampling scheme for one structure (each attempt draws its own integer seed from the
caller's rng; that seed alone reproduces the attempt and is stored in Provenance.seed):

1. number of elements k, with P(k) proportional to k over 1..min(n_elements, max_atoms):
   for Li-P-S that is unary 1/6, binary 1/3, ternary 1/2. Drawing the element subset
   uniformly instead would give the one ternary subset 1/7 of the draws and drown it in
   unaries and binaries, although ternaries are what the exploration is after;
2. the element subset uniformly among the subsets of size k;
3. the number of atoms N uniformly in [max(min_atoms, k), max_atoms] (conventional cell,
   exactly what pyxtal builds), then the counts uniformly over all ways to write N as a
   sum of k positive integers;
4. a space group uniformly among those in [min_space_group, max_space_group] whose
   Wyckoff positions can hold these counts (``pyxtal.symmetry.Group.check_compatible``);
5. pyxtal's ``from_random`` with its own volume prior: per atom a volume drawn between
   the covalent-radius and the van-der-Waals-radius sphere, times pyxtal's default factor
   1.1 times ``settings.volume_factor``; pyxtal's tolerance matrix keeps atoms apart.

A failed attempt (no compatible group, pyxtal gives up, atoms too close) is counted by
reason in ``self.failures`` and retried, up to ``max_attempts_per_structure`` times.

pyxtal cannot condition on E_hull: the target condition is only recorded in Provenance,
the structures for every condition come from the same distribution.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
from pymatgen.core import Structure

from cscflow.config import ChemicalSystem, GeneratorSettings
from cscflow.generators import GENERATORS, Generator
from cscflow.schemas import Candidate

__all__ = ["PyXtalGenerator", "sample_composition", "compatible_space_groups"]

logger = logging.getLogger(__name__)

#: pyxtal's own default volume factor; settings.volume_factor multiplies it.
PYXTAL_DEFAULT_FACTOR = 1.1
#: atoms closer than this (Å) make a draw invalid, whatever pyxtal said
MIN_DISTANCE = 0.5


@lru_cache(maxsize=None)
def _group(number: int):
    from pyxtal.symmetry import Group

    return Group(number)


@lru_cache(maxsize=4096)
def compatible_space_groups(counts: tuple[int, ...], low: int = 1, high: int = 230) -> tuple[int, ...]:
    """Space groups in [low, high] whose Wyckoff positions can hold ``counts`` atoms."""
    out = []
    for number in range(low, high + 1):
        try:
            ok, _ = _group(number).check_compatible(list(counts))
        except Exception:  # pyxtal raises for some degenerate inputs: treat as incompatible
            ok = False
        if ok:
            out.append(number)
    return tuple(out)


def sample_composition(
    elements: list[str], min_atoms: int, max_atoms: int, rng: np.random.Generator
) -> tuple[list[str], list[int]]:
    """(species, counts) of one cell, drawn by steps 1-3 of the module docstring."""
    n_el = len(elements)
    arities = np.arange(1, min(n_el, max_atoms) + 1)
    k = int(rng.choice(arities, p=arities / arities.sum()))
    subsets = list(itertools.combinations(sorted(elements), k))
    species = list(subsets[int(rng.integers(len(subsets)))])
    n_atoms = int(rng.integers(max(min_atoms, k), max_atoms + 1))
    # uniform over compositions of n_atoms into k positive parts: k-1 distinct cuts
    cuts = np.sort(rng.choice(np.arange(1, n_atoms), size=k - 1, replace=False)) if k > 1 else []
    bounds = np.concatenate([[0], cuts, [n_atoms]]).astype(int)
    counts = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    return species, counts


class PyXtalGenerator(Generator):
    """Random symmetric crystals over all compositions of the chemical system."""

    name = "pyxtal"

    def __init__(self, settings: GeneratorSettings):
        super().__init__(settings)
        if settings.backend != "pyxtal":
            raise ValueError(f"PyXtalGenerator got settings for backend {settings.backend!r}")

    def draw(
        self, chemical_system: ChemicalSystem, seed: int
    ) -> tuple[Structure | None, str | None, dict[str, Any]]:
        """One attempt from ``seed``: (structure, None, info) or (None, reason, info)."""
        from pyxtal import pyxtal

        arng = np.random.default_rng(seed)
        species, counts = sample_composition(
            chemical_system.elements, chemical_system.min_atoms, chemical_system.max_atoms, arng
        )
        info: dict[str, Any] = {"species": species, "counts": counts}
        groups = compatible_space_groups(
            tuple(counts), self.settings.min_space_group, self.settings.max_space_group
        )
        if not groups:
            return None, "no_compatible_space_group", info
        group = int(groups[int(arng.integers(len(groups)))])
        info["space_group"] = group
        crystal = pyxtal()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                crystal.from_random(
                    3,
                    group,
                    species,
                    counts,
                    factor=PYXTAL_DEFAULT_FACTOR * self.settings.volume_factor,
                    max_count=1,
                    random_state=arng,
                )
            if not crystal.valid:
                return None, "pyxtal_invalid", info
            structure = crystal.to_pymatgen()
        except RuntimeError:
            return None, "pyxtal_failed", info
        except Exception as exc:  # pyxtal has many internal failure modes; never crash
            return None, f"error:{type(exc).__name__}", info
        structure = Structure.from_sites(structure.sites)  # drop pyxtal site properties
        n = len(structure)
        if not chemical_system.min_atoms <= n <= chemical_system.max_atoms:
            return None, "atom_count_out_of_range", info
        if n > 1:
            dist = structure.distance_matrix
            np.fill_diagonal(dist, np.inf)
            if dist.min() < MIN_DISTANCE:
                return None, "too_close", info
        return structure, None, info

    def generate(
        self,
        chemical_system: ChemicalSystem,
        n: int,
        condition: dict[str, Any],
        rng: np.random.Generator,
        iteration: int = 0,
        start_index: int = 0,
    ) -> list[Candidate]:
        """``n`` random crystals; ``condition`` is recorded only (pyxtal is unconditional)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out: list[Candidate] = []
        for i in range(n):
            for _attempt in range(self.settings.max_attempts_per_structure):
                seed = int(rng.integers(2**31 - 1))
                structure, reason, info = self.draw(chemical_system, seed)
                if structure is not None:
                    out.append(
                        self._candidate(structure, condition, iteration, start_index + i, seed)
                    )
                    break
                self.failures[reason] += 1
                logger.debug("pyxtal draw failed (%s): %s", reason, info)
            else:
                self.failures["max_attempts_exceeded"] += 1
        return out


GENERATORS["pyxtal"] = PyXtalGenerator
