"""CHGGen metrics (paper 002, Figs. 2, 4, 6).

- symmetry success rate: fraction of relaxed structures whose spglib space group at
  ``symprec`` is above P1/P-1 (number >= ``min_space_group``, default 3), overall and by
  atom count;
- ΔE (generated minus relaxed, eV/atom, same MLFF) and RMSD (Å, per-atom displacement
  between generated and relaxed after removing the mean shift; atom order is kept by the
  relaxation) and the max displacement;
- E_d: decomposition energy against the reference hull (pymatgen
  ``PhaseDiagram.get_decomp_and_phase_separation_energy``: E above hull for unstable
  phases, minus the phase-separation energy for phases below it);
- locality: partial RDFs per element pair (matminer ``PartialRadialDistributionFunction``)
  and coordination numbers from pymatgen's **CrystalNN** (ChemEnv's LocalGeometryFinder
  is optional: seconds per site on this machine), generated vs reference structures.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import numpy as np
from pymatgen.core import Structure

from cscflow.chggen.symmetrize import space_group

__all__ = [
    "coordination_statistics",
    "decomposition_energies",
    "displacement_rmsd",
    "partial_rdfs",
    "rdf_difference",
    "summary",
    "symmetry_success_rate",
]

logger = logging.getLogger(__name__)


def symmetry_success_rate(
    structures: Sequence[Structure], symprec: float = 0.1, min_space_group: int = 3, angle_tolerance: float = 5.0
) -> dict:
    """{'rate', 'n', 'n_symmetric', 'by_atoms': {n_atoms: rate}, 'space_groups': [...]}; rate None when empty."""
    groups = [space_group(s, symprec, angle_tolerance)[0] for s in structures]
    ok = [g >= min_space_group for g in groups]
    by: dict[int, list[bool]] = defaultdict(list)
    for s, good in zip(structures, ok):
        by[len(s)].append(good)
    return {
        "rate": (sum(ok) / len(ok)) if ok else None,
        "n": len(ok),
        "n_symmetric": int(sum(ok)),
        "by_atoms": {int(k): float(np.mean(v)) for k, v in sorted(by.items())},
        "space_groups": groups,
        "symprec": symprec,
        "min_space_group": min_space_group,
    }


def displacement_rmsd(generated: Structure, relaxed: Structure) -> tuple[float, float]:
    """(RMSD, max displacement) in Å between two structures with the same atom order."""
    if len(generated) != len(relaxed) or [s.specie for s in generated] != [s.specie for s in relaxed]:
        raise ValueError("generated and relaxed structures must hold the same atoms in the same order")
    d = relaxed.frac_coords - generated.frac_coords
    d -= np.round(d)  # minimum image
    d -= d.mean(axis=0)  # a rigid shift is no change
    cart = relaxed.lattice.get_cartesian_coords(d)
    norms = np.linalg.norm(cart, axis=1)
    return float(np.sqrt(np.mean(norms**2))), float(norms.max())


def decomposition_energies(structures: Sequence[Structure], energies_per_atom: Sequence[float], references) -> list[float]:
    """E_d (eV/atom) of each structure against the hull of ``references`` (ReferenceEntry list)."""
    from cscflow.score import build_hull, hull_entry

    entries = [hull_entry(r.structure, r.energy_per_atom, r.entry_id) for r in references]
    elements = sorted({el.symbol for s in structures for el in s.composition.elements})
    pd = build_hull(entries, elements)
    out = []
    for i, (s, e) in enumerate(zip(structures, energies_per_atom)):
        entry = hull_entry(s, float(e), f"cand-{i}")
        try:
            out.append(float(pd.get_decomp_and_phase_separation_energy(entry)[1]))
        except Exception as exc:  # noqa: BLE001  (degenerate hull, numerical failure)
            logger.warning("E_d of %s failed (%s): using E above hull", s.composition.reduced_formula, exc)
            out.append(float(pd.get_e_above_hull(entry, allow_negative=True)))
    return out


def partial_rdfs(structures: Sequence[Structure], rmax: float = 6.0, bins: int = 60) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(bin starts, {'A-B': mean partial RDF over structures}) with matminer's PRDF."""
    from matminer.featurizers.structure import PartialRadialDistributionFunction

    prdf = PartialRadialDistributionFunction(cutoff=rmax, bin_size=rmax / bins)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)
    dist = None
    for s in structures:
        dist, per_pair = prdf.compute_prdf(s)
        for (a, b), g in per_pair.items():
            key = "-".join(sorted((a, b)))
            sums[key] = sums.get(key, 0) + np.asarray(g, dtype=float)
            counts[key] += 1
    if dist is None:
        return np.zeros(0), {}
    return np.asarray(dist, dtype=float), {k: v / counts[k] for k, v in sorted(sums.items())}


def rdf_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean absolute difference of two PRDF sets, per pair both hold."""
    return {k: float(np.mean(np.abs(a[k] - b[k]))) for k in sorted(set(a) & set(b))}


def coordination_statistics(structures: Sequence[Structure], method: str = "crystalnn", max_structures: int = 30) -> dict[str, dict]:
    """Per element: mean, std and histogram of coordination numbers (CrystalNN or ChemEnv)."""
    cns: dict[str, list[int]] = defaultdict(list)
    if method == "crystalnn":
        from pymatgen.analysis.local_env import CrystalNN

        nn = CrystalNN()

        def cn_of(s: Structure, i: int) -> int:
            return int(nn.get_cn(s, i))
    elif method == "chemenv":
        from pymatgen.analysis.chemenv.coordination_environments.coordination_geometry_finder import (
            LocalGeometryFinder,
        )
        from pymatgen.analysis.chemenv.coordination_environments.chemenv_strategies import SimplestChemenvStrategy
        from pymatgen.analysis.chemenv.coordination_environments.structure_environments import (
            LightStructureEnvironments,
        )

        lgf = LocalGeometryFinder()

        def cn_of(s: Structure, i: int) -> int:  # noqa: F811
            lgf.setup_structure(s)
            se = lgf.compute_structure_environments(only_indices=[i], maximum_distance_factor=1.41)
            lse = LightStructureEnvironments.from_structure_environments(
                strategy=SimplestChemenvStrategy(), structure_environments=se)
            env = lse.coordination_environments[i][0]["ce_symbol"]
            return int(env.split(":")[1])
    else:
        raise ValueError(f"unknown coordination method {method!r} (crystalnn or chemenv)")
    for s in list(structures)[:max_structures]:
        for i, site in enumerate(s):
            try:
                cns[site.specie.symbol].append(cn_of(s, i))
            except Exception as exc:  # noqa: BLE001
                logger.debug("CN of site %d failed: %s", i, exc)
    return {
        el: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n_sites": len(v),
             "histogram": {int(k): int(c) for k, c in zip(*np.unique(v, return_counts=True))}}
        for el, v in sorted(cns.items()) if v
    }


def summary(values: Sequence[float]) -> dict:
    """n, median, mean, min, max and quartiles of a list (None entries dropped)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"n": 0}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(med), "mean": float(v.mean()), "min": float(v.min()),
            "max": float(v.max()), "q1": float(q1), "q3": float(q3)}
