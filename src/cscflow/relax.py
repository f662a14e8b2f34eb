"""Relaxation of candidates with an MLFF (cell + positions), behind reject gates.

Each structure is relaxed by atomate2's ``AseRelaxer`` (optimizer + cell filter), with
cscflow's step guard attached to the optimizer. atomate2's ``ForceFieldRelaxMaker`` does not
fit as the job: it is one job per structure that loads its own calculator from atomate2's
model names and has no reject gates, while a cscflow relax job takes a shard of candidates
with the loop's cached (possibly fine-tuned) calculator; so the job is cscflow's, the
relaxation atomate2's.

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
from cscflow.structure_store import CandidateSet, load_candidates, merge_sets, save_candidates, shards

__all__ = [
    "RelaxCollectMaker",
    "RelaxMaker",
    "RelaxOutput",
    "RelaxShardMaker",
    "batched_model",
    "check_structure",
    "finish_relaxation",
    "min_interatomic_distance",
    "reject",
    "relax_candidate",
    "relax_candidates",
    "relax_output",
    "shard_candidates",
]

logger = logging.getLogger(__name__)


class RelaxOutput(BaseModel):
    """Relaxed and rejected candidates (same order as the input, one stored document each) and counts."""

    candidates: CandidateSet = Field(default_factory=CandidateSet)
    n_relaxed: int = 0
    n_rejected: int = 0
    n_converged: int = 0
    rejection_reasons: dict[str, int] = Field(default_factory=dict)
    model: str = ""
    seconds: float = 0.0


class _Reject(Exception):
    """Raised inside the optimizer loop to stop a structure that failed a gate."""

    def __init__(self, reason: str, steps: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.steps = steps


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


_CELL_FILTERS = {"frechet": "FrechetCellFilter", "exp": "ExpCellFilter"}


def _guarded(optimizer: str, atoms: Atoms, settings: RelaxSettings, seen: list):
    """The ASE optimizer class with cscflow's step guard attached at construction.

    AseRelaxer builds the optimizer itself, so the guard rides in on a subclass; ``seen``
    receives the instance so the step count is known even when a gate stops the run.
    """
    from atomate2.ase.utils import OPTIMIZERS

    base = OPTIMIZERS[optimizer]

    class Guarded(base):
        def __init__(self, optimizable, **kwargs):
            super().__init__(optimizable, **kwargs)
            self.attach(_step_guard(atoms, settings, self), interval=1)
            seen.append(self)

    return Guarded


def _step_guard(atoms: Atoms, settings: RelaxSettings, opt):
    """Observer that stops a relaxation as soon as the cell explodes or energies go NaN."""

    def guard():
        if atoms.get_volume() / len(atoms) > settings.max_volume_per_atom:
            raise _Reject("exploded", opt.nsteps)
        results = atoms.calc.results if atoms.calc is not None else {}
        energy = results.get("energy")
        forces = results.get("forces")
        if energy is not None and not np.isfinite(energy):
            raise _Reject("nan_energy", opt.nsteps)
        if forces is not None and not np.isfinite(forces).all():
            raise _Reject("nan_energy", opt.nsteps)
        if energy is not None and abs(energy) / len(atoms) > settings.max_abs_energy_per_atom:
            raise _Reject("energy_out_of_range", opt.nsteps)

    return guard


def reject(cand: Candidate, reason: str, model: str, steps: int | None = None) -> Candidate:
    """A rejected copy of a candidate (structure and provenance untouched)."""
    return cand.model_copy(
        update={"status": "rejected", "reject_reason": reason, "model": model, "relax_steps": steps}
    )


def finish_relaxation(
    candidate: Candidate,
    structure: Structure,
    energy: float,
    forces: np.ndarray,
    stress: np.ndarray,
    steps: int,
    converged: bool,
    settings: RelaxSettings,
    model: str,
) -> Candidate:
    """The relaxed candidate, or a rejected copy when the final state fails a gate.

    One place for the final gates of every engine (ASE and batched): stress in GPa, ASE sign.
    """
    forces = np.asarray(forces, dtype=float)
    stress = np.asarray(stress, dtype=float)
    if not (np.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(stress).all()):
        return reject(candidate, "nan_energy", model, steps)
    n = len(structure)
    if abs(energy) / n > settings.max_abs_energy_per_atom:
        return reject(candidate, "energy_out_of_range", model, steps)
    reason = check_structure(structure, settings)
    if reason is not None:
        return reject(candidate, reason, model, steps)
    return candidate.model_copy(
        update={
            "structure": structure,
            "status": "relaxed",
            "reject_reason": None,
            "energy": float(energy),
            "energy_per_atom": float(energy) / n,
            "max_force": float(np.linalg.norm(forces, axis=1).max()),
            "stress": stress.tolist(),
            "relax_steps": steps,
            "converged": bool(converged),
            "model": model,
        }
    )


def relax_candidate(
    candidate: Candidate, calculator: Calculator, settings: RelaxSettings, model: str
) -> Candidate:
    """Relax one candidate with atomate2's AseRelaxer; a failed gate gives a rejected copy.

    Never raises for a bad structure: a calculator error is recorded as
    ``calculator_error: <Type>``.
    """
    from ase import filters
    from ase.units import GPa
    from atomate2.ase.utils import AseRelaxer
    from pymatgen.io.ase import AseAtomsAdaptor

    if candidate.status == "rejected":  # already rejected upstream: pass through
        return candidate
    reason = check_structure(candidate.structure, settings)
    if reason is not None:
        return reject(candidate, reason, model)

    atoms = AseAtomsAdaptor.get_atoms(candidate.structure)
    calculator.reset()
    seen: list = []
    relax_cell = settings.cell_filter != "none"
    relaxer = AseRelaxer(
        calculator, optimizer=_guarded(settings.optimizer, atoms, settings, seen), relax_cell=relax_cell
    )
    cell_filter = getattr(filters, _CELL_FILTERS.get(settings.cell_filter, "FrechetCellFilter"))
    try:
        result = relaxer.relax(
            atoms,  # relaxed in place: the guard and the final read-out see this object
            fmax=settings.fmax,
            steps=settings.steps,  # AseRelaxer: steps=1 is a single point (0 steps)
            cell_filter=cell_filter,
            final_atoms_object_file=None,  # AseRelaxer writes an extxyz into the cwd by default
            interval=settings.steps + 1,  # keep only the first and last frame of the trajectory
            use_emmet_models=False,
            logfile=None,
        )
        steps = int(seen[0].nsteps) if seen else 0
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(), dtype=float)
        stress = np.asarray(atoms.get_stress(voigt=False), dtype=float) / GPa
    except _Reject as rej:
        return reject(candidate, rej.reason, model, rej.steps)
    except Exception as exc:  # the force field failed on this structure: record it
        logger.debug("relax of %s failed", candidate.id, exc_info=True)
        steps = int(seen[0].nsteps) if seen else None
        return reject(candidate, f"calculator_error: {type(exc).__name__}", model, steps)

    final = atoms.copy()  # drops the calculator: no results leak into site properties
    final.wrap()
    structure = AseAtomsAdaptor.get_structure(final)
    return finish_relaxation(
        candidate, structure, energy, forces, stress, steps, bool(result.converged), settings, model
    )


def _as_candidate(item) -> Candidate:
    if isinstance(item, Candidate):
        return item
    if isinstance(item, dict):
        from monty.json import MontyDecoder

        return Candidate.model_validate(MontyDecoder().process_decoded(item))
    raise TypeError(f"expected a Candidate, got {type(item).__name__}")


def batched_model(calculator: Calculator, settings: RelaxSettings):
    """The torch-sim model that relaxes in batches under ``settings.engine``, or None for ASE.

    ``auto`` batches only on a GPU (on a CPU batching gains little: ~1.1x, benchmarks/),
    only with FIRE, and only for calculators with a torch-sim wrapper; ``torchsim`` insists.
    """
    if settings.engine == "ase":
        return None
    if settings.engine == "auto":
        import torch

        if settings.optimizer != "FIRE" or not torch.cuda.is_available():
            return None
    from cscflow.batched import torchsim_model

    model = torchsim_model(calculator)
    if model is None and settings.engine == "torchsim":
        raise ValueError(
            f"relax.engine 'torchsim' has no torch-sim model for a {type(calculator).__name__} "
            "calculator (CHGNet, DeePMD, MACE and MatterSim have one): set relax.engine to ase or auto"
        )
    if model is not None and settings.engine == "auto" and model.device.type != "cuda":
        return None
    return model


def _relax_batched(candidates: list[Candidate], ts_model, settings: RelaxSettings, model: str,
                   progress: bool) -> list[Candidate]:
    """The torch-sim engine behind the same gates: pre-checks here, steps in cscflow.batched."""
    from cscflow.batched import relax_structures

    out: list[Candidate | None] = []
    todo: list[int] = []
    for cand in candidates:
        if cand.status == "rejected":
            out.append(cand)
            continue
        reason = check_structure(cand.structure, settings)
        out.append(reject(cand, reason, model) if reason is not None else None)
        if reason is None:
            todo.append(len(out) - 1)
    results = relax_structures([candidates[i].structure for i in todo], ts_model, settings,
                               progress=progress)
    for i, res in zip(todo, results, strict=True):
        if res.reject_reason is not None:
            out[i] = reject(candidates[i], res.reject_reason, model, res.steps)
        else:
            out[i] = finish_relaxation(candidates[i], res.structure, res.energy, res.forces,
                                       res.stress, res.steps, res.converged, settings, model)
    return out


def relax_candidates(
    candidates: list[Candidate],
    calculator: Calculator,
    settings: RelaxSettings,
    model: str,
    progress: bool = True,
) -> list[Candidate]:
    """Relax every candidate in order; rejected ones are kept with their reason.

    The engine follows ``settings.engine`` (see ``batched_model``): batched with torch-sim,
    or one structure at a time with ASE; gates and outputs are the same.
    """
    from tqdm.auto import tqdm

    candidates = [_as_candidate(item) for item in candidates]
    ts_model = batched_model(calculator, settings)
    if ts_model is not None:
        return _relax_batched(candidates, ts_model, settings, model, progress)

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
    def make(self, candidates: CandidateSet | list[Candidate], model_path: str | None = None) -> RelaxOutput:
        from cscflow.forcefields import get_calculator, model_tag

        t0 = time.perf_counter()
        calculator = get_calculator(self.forcefield, model_path)
        model = model_tag(self.forcefield, model_path)
        relaxed = relax_candidates(load_candidates(candidates), calculator, self.settings, model, self.progress)
        return relax_output(relaxed, model, time.perf_counter() - t0)


def relax_output(relaxed: list[Candidate], model: str, seconds: float) -> RelaxOutput:
    """The stage document of relaxed candidates: the list and its counts."""
    reasons = Counter(c.reject_reason for c in relaxed if c.status == "rejected")
    return RelaxOutput(
        candidates=save_candidates(relaxed, "relax"),
        n_relaxed=sum(c.status == "relaxed" for c in relaxed),
        n_rejected=sum(c.status == "rejected" for c in relaxed),
        n_converged=sum(bool(c.converged) for c in relaxed if c.status == "relaxed"),
        rejection_reasons={str(k): v for k, v in reasons.items()},
        model=model,
        seconds=seconds,
    )


def shard_candidates(candidates, shard_size: int) -> list:
    """Consecutive shards of at most ``shard_size`` candidates (order kept, none empty).

    A stored CandidateSet is cut into smaller sets of keys: a shard job reads only its own
    candidates from the store, nothing travels through the fan-out job."""
    if shard_size < 1:
        raise ValueError(f"relax.shard_size must be at least 1, got {shard_size}")
    return shards(candidates, shard_size)


@dataclass
class RelaxCollectMaker(Maker):
    """Join the shards' outputs into one RelaxOutput, in shard order (the fan-in step)."""

    name: str = "relax collect"

    @job(data=["candidates"])
    def make(self, outputs: list[RelaxOutput]) -> RelaxOutput:
        docs = [o if isinstance(o, RelaxOutput) else RelaxOutput.model_validate(o) for o in outputs]
        models = {d.model for d in docs if d.model}
        if len(models) > 1:
            raise ValueError(f"relax shards used different force fields: {sorted(models)}")
        reasons: Counter[str] = Counter()
        for d in docs:
            reasons.update(d.rejection_reasons)
        return RelaxOutput(  # the shards' stored documents, joined by key: nothing is reloaded
            candidates=merge_sets([d.candidates for d in docs], CandidateSet),
            n_relaxed=sum(d.n_relaxed for d in docs),
            n_rejected=sum(d.n_rejected for d in docs),
            n_converged=sum(d.n_converged for d in docs),
            rejection_reasons=dict(reasons),
            model=models.pop() if models else "",
            seconds=sum(d.seconds for d in docs),
        )


@dataclass
class RelaxShardMaker(Maker):
    """Fan the relax stage out: one ``relax_maker`` job per shard of ``relax.shard_size``
    candidates, then one collect job; FireWorks / jobflow-remote run the shards concurrently.

    The loop's relax stage; same inputs and output as ``RelaxMaker``::

        relax = RelaxShardMaker(relax_maker=RelaxMaker(forcefield=spec.forcefield, settings=spec.relax))
        jobs["relax"] = relax.make(jobs["generate"].output.candidates, model_path=relax_model)
        ... jobs["relax"].output.candidates  # the collect job's RelaxOutput

    The job replaces itself by the shard jobs and the collect job when it runs (the
    candidate count is known only then), so its output reference resolves to the collect's.
    One shard (≤ shard_size candidates) still runs as a shard job plus a collect.
    """

    relax_maker: RelaxMaker = field(default_factory=RelaxMaker)
    name: str = "relax shards"
    collect_maker: RelaxCollectMaker = field(default_factory=RelaxCollectMaker)

    @job
    @resumable  # on resume, a finished stage's collected output instead of a new fan-out
    def make(self, candidates: CandidateSet | list[Candidate], model_path: str | None = None):
        from jobflow import Response

        from cscflow.checkpoint import fan_out

        shards = shard_candidates(candidates, self.relax_maker.settings.shard_size)
        jobs = []
        for i, shard in enumerate(shards):
            shard_job = self.relax_maker.make(shard, model_path=model_path)
            shard_job.name = f"{self.relax_maker.name} {i + 1}/{len(shards)}"
            shard_job.metadata.update({"shard": i, "n_shards": len(shards)})
            jobs.append(shard_job)
        collect = self.collect_maker.make([j.output for j in jobs])
        return Response(replace=fan_out(jobs, collect, "relax", "shard", self.name))
