"""Batch relaxation of candidates with an ASE optimizer and a cell filter, behind reject gates.

Generated structures are often unphysical (overlapping atoms, huge vacuum); one of them
must never take the loop down. Each candidate is checked before and after relaxation and,
when a gate fails, kept in the output with ``status="rejected"`` and a short categorical
``reject_reason`` that the evaluation counts:

- ``overlap``: two atoms (or an atom and its periodic image) closer than
  ``min_interatomic_distance``;
- ``exploded``: volume per atom above ``max_volume_per_atom`` (checked at every step too,
  so an exploding cell stops early);
- ``nan_energy``: non-finite energy, forces or stress;
- ``energy_out_of_range``: |E/atom| above ``max_abs_energy_per_atom``;
- ``calculator_error: <ExceptionType>``: the force field raised;
- ``empty_structure``: no atoms.

A candidate that is not converged within ``steps`` is still ``relaxed`` with
``converged=False``. Provenance is copied untouched.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from jobflow import Maker, job
from pydantic import BaseModel, Field
from pymatgen.core import Structure

from cscflow.checkpoint import resumable
from cscflow.config import ForceFieldSettings, RelaxSettings
from cscflow.schemas import Candidate

__all__ = [
    "RelaxMaker",
    "RelaxOutput",
    "check_structure",
    "min_interatomic_distance",
    "relax_candidate",
    "relax_candidates",
]

logger = logging.getLogger(__name__)


class RelaxOutput(BaseModel):
    """Relaxed and rejected candidates (same order as the input) and counts."""

    candidates: list[Candidate] = Field(default_factory=list)
    n_relaxed: int = 0
    n_rejected: int = 0
    n_converged: int = 0
    rejection_reasons: dict[str, int] = Field(default_factory=dict)
    model: str = ""
    seconds: float = 0.0


class _Reject(Exception):
    """Raised inside the optimizer loop to stop a structure that failed a gate."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def min_interatomic_distance(structure: Structure) -> float:
    """Shortest distance between two atoms, periodic images of the same atom included."""
    n = len(structure)
    if n == 0:
        return float("inf")
    best = float("inf")
    if n > 1:
        dm = np.array(structure.distance_matrix, dtype=float)
        np.fill_diagonal(dm, np.inf)
        best = float(dm.min())
    # an atom and its own periodic image: the shortest lattice vector (LLL-reduced)
    best = min(best, float(np.linalg.norm(structure.lattice.lll_matrix, axis=1).min()))
    return best


def check_structure(structure: Structure, settings: RelaxSettings) -> str | None:
    """The reject reason of a structure outside the sanity gates, or None."""
    if len(structure) == 0:
        return "empty_structure"
    if not (np.isfinite(structure.cart_coords).all() and np.isfinite(structure.lattice.matrix).all()):
        return "nan_structure"
    volume = structure.volume
    if not np.isfinite(volume) or volume <= 1e-8:
        return "degenerate_cell"
    if volume / len(structure) > settings.max_volume_per_atom:
        return "exploded"
    if min_interatomic_distance(structure) < settings.min_interatomic_distance:
        return "overlap"
    return None


def _make_optimizer(atoms: Atoms, settings: RelaxSettings):
    from ase import optimize
    from ase.filters import ExpCellFilter, FrechetCellFilter

    target = {
        "frechet": FrechetCellFilter,
        "exp": ExpCellFilter,
        "none": None,
    }[settings.cell_filter]
    obj = target(atoms) if target is not None else atoms
    opt_cls = {"FIRE": optimize.FIRE, "BFGS": optimize.BFGS, "LBFGS": optimize.LBFGS}[settings.optimizer]
    return opt_cls(obj, logfile=None)


def _step_guard(atoms: Atoms, settings: RelaxSettings):
    """Observer that stops a relaxation as soon as the cell explodes or energies go NaN."""

    def guard():
        if atoms.get_volume() / len(atoms) > settings.max_volume_per_atom:
            raise _Reject("exploded")
        results = atoms.calc.results if atoms.calc is not None else {}
        energy = results.get("energy")
        forces = results.get("forces")
        if energy is not None and not np.isfinite(energy):
            raise _Reject("nan_energy")
        if forces is not None and not np.isfinite(forces).all():
            raise _Reject("nan_energy")
        if energy is not None and abs(energy) / len(atoms) > settings.max_abs_energy_per_atom:
            raise _Reject("energy_out_of_range")

    return guard


def _reject(cand: Candidate, reason: str, model: str, steps: int | None = None) -> Candidate:
    return cand.model_copy(
        update={"status": "rejected", "reject_reason": reason, "model": model, "relax_steps": steps}
    )


def relax_candidate(
    candidate: Candidate, calculator: Calculator, settings: RelaxSettings, model: str
) -> Candidate:
    """Relax one candidate; a failed gate or calculator error gives a rejected copy, never raises."""
    from ase.units import GPa
    from pymatgen.io.ase import AseAtomsAdaptor

    if candidate.status == "rejected":  # already rejected upstream: pass through
        return candidate
    reason = check_structure(candidate.structure, settings)
    if reason is not None:
        return _reject(candidate, reason, model)

    atoms = AseAtomsAdaptor.get_atoms(candidate.structure)
    atoms.calc = calculator
    calculator.reset()
    opt = None
    steps: int | None = None
    try:
        opt = _make_optimizer(atoms, settings)
        opt.attach(_step_guard(atoms, settings), interval=1)
        converged = bool(opt.run(fmax=settings.fmax, steps=settings.steps))
        steps = int(opt.nsteps)
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(), dtype=float)
        stress = np.asarray(atoms.get_stress(voigt=False), dtype=float) / GPa
    except _Reject as rej:
        return _reject(candidate, rej.reason, model, getattr(opt, "nsteps", None))
    except Exception as exc:  # the force field failed on this structure: record it
        logger.debug("relax of %s failed", candidate.id, exc_info=True)
        steps = getattr(opt, "nsteps", None)
        return _reject(candidate, f"calculator_error: {type(exc).__name__}", model, steps)

    if not (np.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(stress).all()):
        return _reject(candidate, "nan_energy", model, steps)
    n = len(atoms)
    if abs(energy) / n > settings.max_abs_energy_per_atom:
        return _reject(candidate, "energy_out_of_range", model, steps)

    final = atoms.copy()  # drops the calculator: no results leak into site properties
    final.wrap()
    structure = AseAtomsAdaptor.get_structure(final)
    reason = check_structure(structure, settings)
    if reason is not None:
        return _reject(candidate, reason, model, steps)

    return candidate.model_copy(
        update={
            "structure": structure,
            "status": "relaxed",
            "reject_reason": None,
            "energy": energy,
            "energy_per_atom": energy / n,
            "max_force": float(np.linalg.norm(forces, axis=1).max()),
            "stress": stress.tolist(),
            "relax_steps": steps,
            "converged": converged,
            "model": model,
        }
    )


def _as_candidate(item) -> Candidate:
    if isinstance(item, Candidate):
        return item
    if isinstance(item, dict):
        from monty.json import MontyDecoder

        return Candidate.model_validate(MontyDecoder().process_decoded(item))
    raise TypeError(f"expected a Candidate, got {type(item).__name__}")


def relax_candidates(
    candidates: list[Candidate],
    calculator: Calculator,
    settings: RelaxSettings,
    model: str,
    progress: bool = True,
) -> list[Candidate]:
    """Relax every candidate in order; rejected ones are kept with their reason."""
    from tqdm.auto import tqdm

    out: list[Candidate] = []
    counts: Counter[str] = Counter()
    bar = tqdm(candidates, desc="relax", disable=not progress, unit="structure")
    for item in bar:
        result = relax_candidate(_as_candidate(item), calculator, settings, model)
        counts[result.status] += 1
        out.append(result)
        bar.set_postfix(relaxed=counts["relaxed"], rejected=counts["rejected"], refresh=False)
    return out


@dataclass
class RelaxMaker(Maker):
    """Relax candidates (cell + positions) with the configured MLFF, rejecting unphysical ones."""

    name: str = "relax"
    forcefield: ForceFieldSettings = field(default_factory=ForceFieldSettings)
    settings: RelaxSettings = field(default_factory=RelaxSettings)
    progress: bool = True

    @job(data=["candidates"])
    @resumable
    def make(self, candidates: list[Candidate], model_path: str | None = None) -> RelaxOutput:
        from cscflow.forcefields import get_calculator, model_tag

        t0 = time.perf_counter()
        calculator = get_calculator(self.forcefield, model_path)
        model = model_tag(self.forcefield, model_path)
        relaxed = relax_candidates(list(candidates), calculator, self.settings, model, self.progress)
        reasons = Counter(c.reject_reason for c in relaxed if c.status == "rejected")
        return RelaxOutput(
            candidates=relaxed,
            n_relaxed=sum(c.status == "relaxed" for c in relaxed),
            n_rejected=sum(c.status == "rejected" for c in relaxed),
            n_converged=sum(bool(c.converged) for c in relaxed if c.status == "relaxed"),
            rejection_reasons={str(k): v for k, v in reasons.items()},
            model=model,
            seconds=time.perf_counter() - t0,
        )
