"""VASP labeller for clusters: atomate2 makers with the paper's input sets (Methods 4.2).

"Input files were generated using pymatgen's MPRelaxSet with default parameters. A
plane-wave cutoff of 520 eV and a Γ-centered k-point mesh with a reciprocal-space density
of 64 Å⁻³ were used. Li 1s electrons were treated as valence electrons [Li_sv]. Electronic
convergence was set to 5e-5 eV/atom, and ionic steps were converged to 10 times the
electronic threshold." So: MPRelaxSet's config (PBE PAW, ENCUT 520, EDIFF_PER_ATOM 5e-5,
Li_sv), ``force_gamma``, EDIFF = 5e-5 × N_atoms and EDIFFG = +10 × EDIFF (positive: an
energy criterion, which is also VASP's own default). The SCF set for charge densities
(SI: "electronic convergence tightened to 1e-5 eV, KSPACING 0.2") is
:class:`PaperSCFSetGenerator`.

Jobs run through atomate2's ``run_vasp`` with custodian and atomate2's default handlers.
We never write VASP outputs ourselves; without a VASP binary :func:`vasp_label` stops
with a message naming ``VASP_CMD``.
"""

from __future__ import annotations

import copy
import shlex
import shutil
import zlib
from dataclasses import dataclass, field

import numpy as np
from atomate2.vasp.jobs.core import RelaxMaker, StaticMaker
from atomate2.vasp.sets.core import RelaxSetGenerator, StaticSetGenerator
from jobflow import Flow, JobConfig, OnMissing, Response, job
from pymatgen.io.vasp.sets import MPRelaxSet

from cscflow.checkpoint import stage_metadata

__all__ = [
    "EDIFF_PER_ATOM",
    "PaperRelaxSetGenerator",
    "PaperSCFSetGenerator",
    "PaperStaticSetGenerator",
    "VaspNotFoundError",
    "check_vasp_command",
    "paper_relax_maker",
    "paper_scf_maker",
    "paper_static_maker",
    "taskdoc_frames",
    "vasp_label",
]

EDIFF_PER_ATOM = 5e-5  # eV/atom, paper Methods 4.2 (= MPRelaxSet's EDIFF_PER_ATOM)
EDIFFG_FACTOR = 10.0
LABELLER = "vasp:PBE-PAW/MPRelaxSet/ENCUT520/rd64"


class VaspNotFoundError(RuntimeError):
    """No VASP binary: atomate2's VASP_CMD does not point to an executable."""


def paper_config_dict() -> dict:
    """pymatgen's MPRelaxSet configuration (PBE PAW, ENCUT 520, Li_sv, reciprocal density 64)."""
    return copy.deepcopy(MPRelaxSet()._config_dict)  # noqa: SLF001


def _paper_ediff(structure) -> dict:
    ediff = EDIFF_PER_ATOM * len(structure)
    return {"ENCUT": 520, "EDIFF": ediff, "EDIFFG": EDIFFG_FACTOR * ediff}


@dataclass
class PaperRelaxSetGenerator(RelaxSetGenerator):
    """Full relaxation (ISIF 3) with the paper's MPRelaxSet-derived settings, Γ-centred mesh."""

    config_dict: dict = field(default_factory=paper_config_dict)
    force_gamma: bool = True

    @property
    def incar_updates(self) -> dict:
        return {**super().incar_updates, **_paper_ediff(self.structure)}


@dataclass
class PaperStaticSetGenerator(StaticSetGenerator):
    """Static on a perturbed structure, same settings as the relaxation (no CHGCAR kept)."""

    config_dict: dict = field(default_factory=paper_config_dict)
    force_gamma: bool = True

    @property
    def incar_updates(self) -> dict:
        return {**super().incar_updates, **_paper_ediff(self.structure), "LCHARG": False}


@dataclass
class PaperSCFSetGenerator(StaticSetGenerator):
    """Tighter SCF for charge densities: EDIFF 1e-5 eV, KSPACING 0.2 (SI), CHGCAR written."""

    config_dict: dict = field(default_factory=paper_config_dict)

    @property
    def incar_updates(self) -> dict:
        return {**super().incar_updates, "ENCUT": 520, "EDIFF": 1e-5, "KSPACING": 0.2, "LCHARG": True}


def paper_relax_maker(**kwargs) -> RelaxMaker:
    return RelaxMaker(name="paper relax", input_set_generator=PaperRelaxSetGenerator(), **kwargs)


def paper_static_maker(**kwargs) -> StaticMaker:
    return StaticMaker(name="paper static", input_set_generator=PaperStaticSetGenerator(), **kwargs)


def paper_scf_maker(**kwargs) -> StaticMaker:
    return StaticMaker(name="paper scf", input_set_generator=PaperSCFSetGenerator(), **kwargs)


def check_vasp_command(command: str | None = None) -> str:
    """atomate2's VASP_CMD, checked: a clear error when its executable is missing."""
    from atomate2 import SETTINGS

    command = command or SETTINGS.VASP_CMD
    words = shlex.split(command) if command else []
    exe = next((w for w in words if "vasp" in w.lower()), words[0] if words else "")
    if not exe or shutil.which(exe) is None:
        raise VaspNotFoundError(
            f"VASP binary {exe or '(none)'!r} not found (VASP_CMD={command!r}): set VASP_CMD in "
            "~/.atomate2.yaml or the ATOMATE2_VASP_CMD environment variable to your VASP "
            "command (e.g. 'srun vasp_std'), or use labeller.backend: cp2k / teacher"
        )
    return command


def _stress_gpa_ase(stress_kbar) -> list[list[float]]:
    """VASP prints stress in kBar with pressure positive; ASE: GPa, tensile positive."""
    return (-0.1 * np.asarray(stress_kbar, dtype=float)).tolist()


def taskdoc_frames(task, cand, kind: str, keep: list[int] | None, label_seed: int, step: str) -> list:
    """Frames from an atomate2 VASP TaskDoc: ionic steps (eV, eV/Å, kBar -> GPa ASE sign)."""
    from cscflow.schemas import Frame

    steps = task.calcs_reversed[0].output.ionic_steps
    indices = range(len(steps)) if keep is None else keep
    frames = []
    for i in indices:
        st = steps[i]
        frames.append(
            Frame(
                frame_id=f"{cand.id}-{step}" + (f"-s{i:03d}" if kind == "relax_step" else ""),
                structure=st.structure,
                energy=float(st.e_0_energy),
                forces=[list(map(float, f)) for f in st.forces],
                stress=_stress_gpa_ase(st.stress) if st.stress is not None else None,
                kind=kind,
                labeller=LABELLER,
                provenance=cand.provenance.model_copy(deep=True),
                label_seed=label_seed,
            )
        )
    return frames


@job
def vasp_statics(cand, relax_outputs: list, seeds: list[int], settings) -> Response:
    """Statics on perturbations of the lowest-energy relaxed copy (known only at run time)."""
    from cscflow.label.protocol import perturbed_copy

    done = [o for o in relax_outputs if o is not None]
    if not done:
        return Response(output={"candidate_id": cand.id, "error": "no VASP relaxation finished"})
    best = min(done, key=lambda t: t.output.energy_per_atom).output.structure
    jobs = []
    for k, s in enumerate(seeds):
        structure, _ = perturbed_copy(best, s, settings)
        j = paper_static_maker().make(structure)
        j.name = f"{cand.id} vasp static{k}"
        jobs.append(j)
    return Response(replace=Flow(jobs, output=[j.output for j in jobs]))


@job(data=["frames"])
def collect_vasp(cand_list: list, relax_tasks: list, static_tasks: list, plan: list):
    """LabelOutput from the TaskDocs; a missing TaskDoc (failed after custodian) is a failure."""
    from cscflow.label import LabelOutput
    from cscflow.label.protocol import keep_steps

    frames, failures = [], []
    for cand, relaxes, statics, p in zip(cand_list, relax_tasks, static_tasks, plan):
        for j, task in enumerate(relaxes):
            if task is None:
                failures.append({"candidate_id": cand.id, "frame_id": f"{cand.id}-relax{j}",
                                 "error": "VASP relaxation failed (custodian gave up or job fizzled)"})
                continue
            n = len(task.calcs_reversed[0].output.ionic_steps)
            keep = keep_steps(n, tuple(p["kept"]), np.random.default_rng([p["relax"][j], 1]))
            frames += taskdoc_frames(task, cand, "relax_step", keep, p["relax"][j], f"relax{j}")
        statics = statics if isinstance(statics, list) else []
        for k, s in enumerate(p["static"]):
            task = statics[k] if k < len(statics) else None
            if task is None:
                failures.append({"candidate_id": cand.id, "frame_id": f"{cand.id}-static{k}",
                                 "error": "VASP static failed or was not run"})
                continue
            frames += taskdoc_frames(task, cand, "static", [-1], s, f"static{k}")
    from cscflow.structure_store import save_frames

    return LabelOutput(frames=save_frames(frames, "label"), failures=failures, labeller=LABELLER)


def vasp_flow(selected, iteration: int, seed: int, settings) -> Flow:
    """The protocol with atomate2 VASP jobs: 3 perturbed relaxations, 5 statics, collector."""
    from cscflow.label.protocol import keep_steps, perturbed_copy, protocol_seeds

    keep_steps(2, settings.relax_frames_kept, np.random.default_rng(0))  # validates the range
    tolerant = JobConfig(on_missing_references=OnMissing.NONE, expose_store=True)  # collect_vasp stores the frames
    jobs, relax_out, static_out, plan = [], [], [], []
    for cand in selected:
        seeds = protocol_seeds(cand.id, iteration, seed, settings)
        relaxes = []
        for j, s in enumerate(seeds["relax"]):
            structure, _ = perturbed_copy(cand.structure, s, settings)
            rj = paper_relax_maker().make(structure)
            rj.name = f"{cand.id} vasp relax{j}"
            relaxes.append(rj)
        st = vasp_statics(cand, [r.output for r in relaxes], seeds["static"], settings)
        st.config = tolerant
        jobs += [*relaxes, st]
        relax_out.append([r.output for r in relaxes])
        static_out.append(st.output)
        plan.append({**seeds, "kept": list(settings.relax_frames_kept), "crc": zlib.crc32(cand.id.encode())})
    collector = collect_vasp(list(selected), relax_out, static_out, plan)
    collector.config = tolerant
    collector.metadata.update(stage_metadata())  # its frames are the label stage's
    return Flow([*jobs, collector], output=collector.output, name="vasp protocol")


def vasp_label(selected, iteration: int, seed: int, settings):
    """LABELLERS entry: checks VASP_CMD, then replaces the Label job by the VASP flow."""
    check_vasp_command()
    return Response(replace=vasp_flow(selected, iteration, seed, settings))


def _register() -> None:
    from cscflow.label import LABELLERS

    LABELLERS.setdefault("vasp", vasp_label)


_register()
