"""Downstream screens on a finished exploration: `cscflow downstream RUN_DIR`.

Picks the run's structures (iteration-0 references and every scored candidate), builds
the QHA and conductivity Makers with the run's force field (or its trained DPA-3), and runs
them with ``run_locally`` against the run's own store, tagged like the loop's stages
(``metadata.stage`` = ``qha`` / ``conductivity``), so `cscflow report` shows their tables and
figures and a second call reuses finished screens instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jobflow import Flow, Job

from cscflow.config import ForceFieldSettings

__all__ = ["DownstreamPlan", "QUICK_CONDUCTIVITY", "QUICK_QHA", "plan_downstream", "run_downstream"]

# Laptop sizes: enough to produce every table and figure in minutes, not the paper's numbers.
# With CHGNet the layered/molecular elements (black P, S6/S8) keep soft imaginary modes at
# every volume in small cells, so quick mode keeps them in (recorded per volume in
# `min_frequencies`); the full protocol drops such volumes.
QUICK_QHA = {"min_length": 8.0, "max_atoms": 160, "scale_min": 0.95, "scale_max": 1.05, "relax_fmax": 1e-3,
             "relax_steps": 1000, "t_step": 20.0, "ignore_imaginary": True}
QUICK_CONDUCTIVITY = {"min_length": 6.0, "max_atoms": 64, "npt_ps": 0.1, "nvt_ps": 0.4, "analysis_ps": 0.3,
                      "sample_every": 5}


@dataclass
class DownstreamPlan:
    """What will run: structures per screen, the force field and the model file."""

    run_id: str
    iteration: int
    forcefield: ForceFieldSettings
    model_path: str | None
    qha_structures: list
    conductivity_structures: list
    jobs: list[Job]


def _structures(data, max_structures: int | None):
    """References plus scored candidates (non-rejected), lowest E_hull first, unique by id."""
    from cscflow.schemas import Candidate

    refs = data.references()
    scored = [c for cands in data.scored().values() for c in cands if isinstance(c, Candidate)]
    scored = [c for c in scored if c.status != "rejected" and c.e_hull is not None]
    scored.sort(key=lambda c: c.e_hull)
    if max_structures is not None:
        scored = scored[:max_structures]
    return refs, scored


def plan_downstream(
    run_dir: str | Path,
    only: Literal["qha", "conductivity"] | None = None,
    quick: bool = False,
    model: Literal["forcefield", "trained"] = "forcefield",
    max_structures: int | None = None,
    qha_overrides: dict | None = None,
    conductivity_overrides: dict | None = None,
) -> DownstreamPlan:
    """The QHA / conductivity jobs for a run, tagged for its store (nothing runs yet)."""
    from cscflow.analysis.run_data import load_run_data
    from cscflow.checkpoint import stage_key
    from cscflow.downstream.conductivity import ConductivityMaker, ConductivitySettings
    from cscflow.downstream.qha import QhaMaker, QhaSettings
    from cscflow.runner import RunError

    data = load_run_data(run_dir)
    if data.output(0, "references") is None:
        raise RunError(f"{run_dir}: the run has no iteration-0 references yet; nothing to screen")
    iteration = max(data.iterations, default=0)
    model_path = None
    if model == "trained":
        state = data.final_state()
        model_path = state.model_path if state is not None else None
        if model_path is None:
            train = data.output(iteration, "train")
            model_path = getattr(train, "model_path", None) if train is not None else None
        if model_path is None or not Path(model_path).is_file():
            raise RunError(f"{run_dir}: no trained model file to use (--model trained); use --model forcefield")
    refs, scored = _structures(data, max_structures)
    qha_settings = QhaSettings(**{**(QUICK_QHA if quick else {}), **(qha_overrides or {})})
    md_settings = ConductivitySettings(
        **{"seed": data.spec.seed, **(QUICK_CONDUCTIVITY if quick else {}), **(conductivity_overrides or {})}
    )
    forcefield = data.spec.forcefield
    # The checkpoint key covers everything that changes the result: other settings, other screen.
    digest = hashlib.sha1(
        json.dumps([qha_settings.model_dump(mode="json"), md_settings.model_dump(mode="json"), model,
                    str(model_path), forcefield.model_dump(mode="json"), max_structures], sort_keys=True).encode()
    ).hexdigest()[:10]
    tag = f"{model}-{digest}"

    jobs: list[Job] = []
    if only in (None, "qha"):
        # QHA needs the elemental references for its Gibbs hulls; candidates above its E_hull window are skipped.
        qha = QhaMaker(forcefield=forcefield, settings=qha_settings).make([*refs, *scored], model_path=model_path)
        jobs.append(qha)
    if only in (None, "conductivity"):
        md = ConductivityMaker(forcefield=forcefield, settings=md_settings).make(scored, model_path=model_path)
        jobs.append(md)
    for job_ in jobs:
        stage = job_.name
        job_.metadata.update({"run_id": data.run_id, "iteration": iteration, "stage": stage,
                              "cscflow_key": stage_key(data.run_id, iteration, f"{stage}/{tag}")})
    return DownstreamPlan(data.run_id, iteration, forcefield, model_path, [*refs, *scored], scored, jobs)


def run_downstream(run_dir: str | Path, **kwargs) -> dict:
    """Run the planned screens on the run's store; a screen finished before is reused, not rerun."""
    from jobflow import run_locally

    from cscflow.checkpoint import find_checkpoint
    from cscflow.runner import load_run
    from cscflow.stores import build_job_store

    plan = plan_downstream(run_dir, **kwargs)
    _, spec = load_run(run_dir)
    store = build_job_store(spec.store, run_dir)
    store.connect()
    outputs, todo = {}, []
    try:
        for job_ in plan.jobs:
            cached = find_checkpoint(store, job_.metadata["cscflow_key"])
            if cached is not None:
                outputs[job_.name] = cached
            else:
                todo.append(job_)
    finally:
        store.close()
    if todo:
        jobs_dir = Path(run_dir) / "jobs"
        jobs_dir.mkdir(exist_ok=True)
        responses = run_locally(Flow(todo, name="downstream"), store=store, root_dir=jobs_dir,
                                create_folders=True, log=False)
        for job_ in todo:
            response = responses.get(job_.uuid, {})
            if not response:
                raise RuntimeError(f"the {job_.name} screen failed (see the log above)")
            outputs[job_.name] = response[max(response)].output
    return outputs
