"""The paper's per-structure DFT labelling protocol as a jobflow Flow (paper 000, Methods 4.2).

For every selected candidate:

1. ``copies_per_structure`` (3) perturbed copies (:func:`cscflow.perturb.perturb_structure`),
   each relaxed (positions + cell) with the DFT engine; from each trajectory
   ``relax_frames_kept`` = (1, 5) ionic steps are kept at random, always the first and the
   last (a one-step trajectory gives one frame);
2. ``statics_per_structure`` (5) statics on perturbations of the converged structure (the
   lowest-energy final structure of the copies, converged relaxations preferred).

One job per relaxation and per static, so a failure costs one calculation: the job catches
the error and returns it as a record; a job that dies outright is tolerated by its
children (``OnMissing.NONE``). A collector job returns the :class:`LabelOutput`. Every
per-structure job is :func:`cscflow.checkpoint.resumable` under
``<label key>/<candidate>/relax<j>`` or ``.../static<k>``: nothing is recomputed on resume.

Seeds: ``default_rng([seed, iteration, crc32(candidate_id)])`` draws one integer per copy
and per static (``Frame.label_seed``); ``default_rng(label_seed)`` rebuilds the perturbation,
``default_rng([label_seed, 1])`` picks the kept steps.

Engines (:mod:`cscflow.label.engines`): ``cp2k`` and ``teacher`` (a pretrained force field
standing in for DFT; the same protocol in seconds). The teacher runs it in one job
(:func:`run_protocol`), CP2K as one job per calculation (:func:`protocol_flow`); VASP
(:mod:`cscflow.label.vasp`) builds the same steps from atomate2 jobs. Relaxations stop at
``labeller.relax_fmax`` / ``relax_steps`` whatever the engine.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

import numpy as np
from jobflow import Flow, JobConfig, OnMissing, job
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Structure

from cscflow.checkpoint import KEY, current_key, resumable, stage_metadata
from cscflow.config import LabelSettings
from cscflow.label.engines import EngineCalculator, engine_labeller
from cscflow.schemas import Candidate, Frame

__all__ = [
    "StepResult",
    "collect",
    "collect_frames",
    "converged_structure",
    "keep_steps",
    "perturbed_copy",
    "protocol_flow",
    "protocol_label",
    "protocol_seeds",
    "relax_copy",
    "run_protocol",
    "run_relax_copy",
    "run_static",
    "static_copy",
]

logger = logging.getLogger(__name__)

class StepResult(BaseModel):
    """Output of one relaxation or static job: its frames, or the error that stopped it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    candidate_id: str
    step: str = Field(..., description="relax<j> or static<k>")
    label_seed: int
    frames: list[Frame] = Field(default_factory=list)
    failures: list[dict[str, Any]] = Field(default_factory=list)
    final_structure: Structure | None = None
    final_energy_per_atom: float | None = None
    converged: bool | None = None
    n_ionic_steps: int | None = None
    perturbation: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------- seeds and step choice


def protocol_seeds(candidate_id: str, iteration: int, seed: int, settings: LabelSettings) -> dict[str, list[int]]:
    """Integer seeds of the copies and statics of one candidate; independent of list order."""
    rng = np.random.default_rng([seed, iteration, zlib.crc32(candidate_id.encode())])
    relax = [int(rng.integers(2**31 - 1)) for _ in range(settings.copies_per_structure)]
    static = [int(rng.integers(2**31 - 1)) for _ in range(settings.statics_per_structure)]
    return {"relax": relax, "static": static}


def keep_steps(n_steps: int, kept: tuple[int, int], rng: np.random.Generator) -> list[int]:
    """Indices of the ionic steps to keep: k ~ U{low..high}, always the first and the last."""
    low, high = int(kept[0]), int(kept[1])
    if not 1 <= low <= high:
        raise ValueError(f"relax_frames_kept must satisfy 1 <= low <= high, got {kept!r}")
    if n_steps < 1:
        raise ValueError("a relaxation trajectory needs at least one step")
    if n_steps == 1:
        return [0]
    k = min(max(int(rng.integers(low, high + 1)), 2), n_steps)
    middle = rng.choice(np.arange(1, n_steps - 1), size=k - 2, replace=False) if k > 2 else []
    return sorted({0, n_steps - 1, *(int(i) for i in middle)})


def _record(atoms) -> dict:
    from ase.units import GPa

    return {
        "structure": _to_structure(atoms),
        "energy": float(atoms.get_potential_energy()),
        "forces": np.asarray(atoms.get_forces(), dtype=float),
        "stress": np.asarray(atoms.get_stress(voigt=False), dtype=float) / GPa,
    }


def _to_structure(atoms) -> Structure:
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_structure(atoms.copy())


def _to_atoms(structure: Structure):
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_atoms(structure)


def _check_finite(rec: dict) -> None:
    for key in ("energy", "forces", "stress"):
        if not np.isfinite(np.asarray(rec[key])).all():
            raise FloatingPointError(f"non-finite {key}")


def _frame(cand: Candidate, frame_id: str, kind: str, rec: dict, labeller: str, label_seed: int) -> Frame:
    return Frame(
        frame_id=frame_id,
        structure=rec["structure"],
        energy=rec["energy"],
        forces=rec["forces"].tolist(),
        stress=rec["stress"].tolist(),
        kind=kind,
        labeller=labeller,
        provenance=cand.provenance.model_copy(deep=True),
        label_seed=label_seed,
    )


def perturbed_copy(structure: Structure, label_seed: int, settings: LabelSettings):
    """(structure, record): the protocol's perturbation rebuilt from its ``label_seed``."""
    from cscflow.perturb import perturb_structure

    return perturb_structure(
        structure,
        np.random.default_rng(label_seed),
        position_sigma=settings.position_sigma,
        lattice_strain=settings.lattice_strain,
    )


# ---------------------------------------------------------------- plain functions


def run_relax_copy(cand: Candidate, copy_index: int, label_seed: int, settings: LabelSettings) -> StepResult:
    """Perturb, relax (positions + cell, BFGS + FrechetCellFilter), keep 1-5 steps."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    t0 = time.perf_counter()
    step = f"relax{copy_index}"
    result = StepResult(candidate_id=cand.id, step=step, label_seed=label_seed)
    labeller = engine_labeller(settings)
    try:
        structure, record = perturbed_copy(cand.structure, label_seed, settings)
        result.perturbation = record
        atoms = _to_atoms(structure)
        trajectory: list[dict] = []
        with EngineCalculator(settings, structure) as calc:
            atoms.calc = calc
            opt = BFGS(FrechetCellFilter(atoms), logfile=None)
            opt.attach(lambda: trajectory.append(_record(atoms)), interval=1)
            fmax = settings.relax_fmax
            steps = settings.relax_steps
            converged = bool(opt.run(fmax=fmax, steps=steps))
        for rec in trajectory:
            _check_finite(rec)
        keep = keep_steps(len(trajectory), settings.relax_frames_kept, np.random.default_rng([label_seed, 1]))
        result.frames = [
            _frame(cand, f"{cand.id}-{step}-s{i:03d}", "relax_step", trajectory[i], labeller, label_seed)
            for i in keep
        ]
        last = trajectory[-1]
        result.final_structure = last["structure"]
        result.final_energy_per_atom = last["energy"] / len(last["structure"])
        result.converged = converged
        result.n_ionic_steps = len(trajectory)
    except Exception as exc:  # recorded, never raised: one failure must not stop the flow
        logger.warning("%s %s failed: %s: %s", cand.id, step, type(exc).__name__, exc)
        result.failures.append(
            {"candidate_id": cand.id, "frame_id": f"{cand.id}-{step}", "error": f"{type(exc).__name__}: {exc}"}
        )
    result.seconds = time.perf_counter() - t0
    return result


def converged_structure(relaxations: list[StepResult | None]) -> Structure | None:
    """The lowest-energy final structure; converged relaxations are preferred."""
    relaxations = [StepResult.model_validate(r) if isinstance(r, dict) else r for r in relaxations]
    done = [r for r in relaxations if r is not None and r.final_structure is not None]
    if not done:
        return None
    converged = [r for r in done if r.converged] or done
    return min(converged, key=lambda r: r.final_energy_per_atom).final_structure


def run_static(
    cand: Candidate,
    static_index: int,
    label_seed: int,
    relaxations: list[StepResult | None],
    settings: LabelSettings,
) -> StepResult:
    """One static on a perturbation of the converged structure."""
    t0 = time.perf_counter()
    step = f"static{static_index}"
    frame_id = f"{cand.id}-{step}"
    result = StepResult(candidate_id=cand.id, step=step, label_seed=label_seed)
    try:
        base = converged_structure(relaxations)
        if base is None:
            raise RuntimeError("no relaxation of this candidate finished: nothing to perturb")
        structure, record = perturbed_copy(base, label_seed, settings)
        result.perturbation = record
        atoms = _to_atoms(structure)
        with EngineCalculator(settings, structure) as calc:
            atoms.calc = calc
            rec = _record(atoms)
        _check_finite(rec)
        result.frames = [_frame(cand, frame_id, "static", rec, engine_labeller(settings), label_seed)]
    except Exception as exc:
        logger.warning("%s failed: %s: %s", frame_id, type(exc).__name__, exc)
        result.failures.append({"candidate_id": cand.id, "frame_id": frame_id, "error": f"{type(exc).__name__}: {exc}"})
    result.seconds = time.perf_counter() - t0
    return result


def collect(results: list[StepResult | None], labeller: str, expected: list[tuple[str, str]] = ()) -> Any:
    """Merge step results into a LabelOutput; a missing result (dead job) becomes a failure."""
    from cscflow.label import LabelOutput

    frames, failures, seconds = [], [], 0.0
    for i, res in enumerate(results):
        if res is None:
            cid, step = expected[i] if i < len(expected) else ("?", "?")
            failures.append({"candidate_id": cid, "frame_id": f"{cid}-{step}",
                             "error": "job did not finish (fizzled or missing output)"})
            continue
        if isinstance(res, dict):
            res = StepResult.model_validate(res)
        frames.extend(res.frames)
        failures.extend(res.failures)
        seconds += res.seconds
    from cscflow.structure_store import save_frames

    return LabelOutput(frames=save_frames(frames, "label"), failures=failures, labeller=labeller, seconds=seconds)


def run_protocol(selected: list[Candidate], iteration: int, seed: int, settings: LabelSettings) -> Any:
    """The whole protocol in this process (same steps, seeds and frames as :func:`protocol_flow`).

    For engines that take seconds per structure (the teacher): one job instead of one per
    calculation. Returns the :class:`cscflow.label.LabelOutput`.
    """
    labeller = engine_labeller(settings)
    keep_steps(2, settings.relax_frames_kept, np.random.default_rng(0))  # validates the range
    results = []
    for cand in selected:
        seeds = protocol_seeds(cand.id, iteration, seed, settings)
        relaxes = [run_relax_copy(cand, j, s, settings) for j, s in enumerate(seeds["relax"])]
        statics = [run_static(cand, k, s, relaxes, settings) for k, s in enumerate(seeds["static"])]
        results += [*relaxes, *statics]
    out = collect(results, labeller)
    for f in out.failures:
        logger.warning("label %s failed: %s", f["frame_id"], f["error"])
    return out


def protocol_label(selected: list[Candidate], iteration: int, seed: int, settings: LabelSettings) -> Any:
    """LABELLERS entry of the ASE engines: the protocol of `selected` in this process.

    The Label stage calls it once per structure for CP2K (one Firework per structure's
    protocol, :func:`cscflow.label.label_fanout_flow`) and once for all for the teacher.
    :func:`protocol_flow` (one job per calculation) stays available for finer restarts."""
    if settings.backend == "cp2k":
        from cscflow.label.cp2k import cp2k_command

        cp2k_command(settings.cp2k)  # fail early, with the message, when CP2K is missing
    return run_protocol(selected, iteration, seed, settings)


# ---------------------------------------------------------------- jobs and the flow


@job(data=["frames"])
@resumable
def relax_copy(cand: Candidate, copy_index: int, label_seed: int, settings: LabelSettings) -> StepResult:
    """Job: one perturbed relaxation (see :func:`run_relax_copy`)."""
    return run_relax_copy(cand, copy_index, label_seed, settings)


@job(data=["frames"])
@resumable
def static_copy(cand: Candidate, static_index: int, label_seed: int, relaxations: list, settings: LabelSettings) -> StepResult:
    """Job: one static on a perturbation of the converged structure (see :func:`run_static`)."""
    return run_static(cand, static_index, label_seed, relaxations, settings)


@job(data=["frames"])
def collect_frames(results: list, labeller: str, expected: list) -> Any:
    """Job: the LabelOutput of the whole protocol (tolerates dead parents)."""
    return collect(results, labeller, [tuple(e) for e in expected])


def protocol_flow(
    selected: list[Candidate],
    iteration: int,
    seed: int,
    settings: LabelSettings,
    key_prefix: str | None = None,
    name: str = "dft protocol",
) -> Flow:
    """Flow of relax/static jobs per candidate and a collector whose output is a LabelOutput.

    ``key_prefix`` (default: the ``cscflow_key`` of the job building the flow) makes every
    per-structure job resumable under ``<prefix>/<candidate id>/<step>``.
    """
    labeller = engine_labeller(settings)
    keep_steps(2, settings.relax_frames_kept, np.random.default_rng(0))  # validates the range
    prefix = key_prefix if key_prefix is not None else current_key()
    # expose_store: @resumable looks finished calculations up in the store the job runs on
    tolerant = JobConfig(on_missing_references=OnMissing.NONE, expose_store=True)
    jobs, outputs, expected = [], [], []
    for cand in selected:
        seeds = protocol_seeds(cand.id, iteration, seed, settings)
        relaxes = []
        for j, s in enumerate(seeds["relax"]):
            rj = relax_copy(cand, j, s, settings)
            rj.name = f"{cand.id} relax{j}"
            rj.config = JobConfig(expose_store=True)
            relaxes.append(rj)
        statics = []
        for k, s in enumerate(seeds["static"]):
            sj = static_copy(cand, k, s, [r.output for r in relaxes], settings)
            sj.name = f"{cand.id} static{k}"
            sj.config = tolerant
            statics.append(sj)
        for j_, step in [(r, f"relax{i}") for i, r in enumerate(relaxes)] + [
            (s, f"static{i}") for i, s in enumerate(statics)
        ]:
            if prefix:
                j_.metadata = {**(j_.metadata or {}), KEY: f"{prefix}/{cand.id}/{step}"}
            jobs.append(j_)
            outputs.append(j_.output)
            expected.append((cand.id, step))
    collector = collect_frames(outputs, labeller, expected)
    collector.name = "collect frames"
    collector.config = tolerant
    collector.metadata.update(stage_metadata())  # its frames are the label stage's
    return Flow([*jobs, collector], output=collector.output, name=name)
