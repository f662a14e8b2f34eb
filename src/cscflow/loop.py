"""The closed loop: a trigger job that appends one iteration at a time until saturation.

``exploration_flow(spec)`` = iteration 0 (relax the seed/prototype references, label
them) + the first trigger. Each trigger either returns the final LoopState (entropy
saturated, or max_iterations) or replaces itself with
``Generate -> Relax -> Score -> Select -> Label -> Train -> Evaluate -> next trigger``.
Stages receive earlier iterations' outputs as OutputReferences built from uuids kept in
the state, so the state stays small and jobflow resolves the data from the store.
"""

from __future__ import annotations

import uuid as uuidlib

from jobflow import Flow, Job, Response, job
from jobflow.core.reference import OutputReference

from cscflow.checkpoint import KEY, stage_key
from cscflow.config import ExplorationSpec
from cscflow.schemas import IterationDocument, LoopState

__all__ = ["exploration_flow", "exploration_step", "iteration_jobs", "tag_stage"]


def tag_stage(job_: Job, spec: ExplorationSpec, run_id: str, iteration: int, stage: str) -> Job:
    """Name, checkpoint key and FireWorks category of one stage job."""
    job_.name = f"{stage} it{iteration}"
    job_.metadata.update(
        {KEY: stage_key(run_id, iteration, stage), "run_id": run_id, "iteration": iteration, "stage": stage}
    )
    job_.config.expose_store = True
    category = spec.dispatch.category(stage)
    if category:
        job_.update_config({"manager_config": {"_category": category}}, dynamic=False)
    return job_


def _ref(uuid: str, attribute: str) -> OutputReference:
    return getattr(OutputReference(uuid), attribute)


def iteration_jobs(spec: ExplorationSpec, state: LoopState, k: int) -> dict[str, Job]:
    """The seven stage jobs of iteration k, wired together."""
    from cscflow.evaluate import EvaluateMaker
    from cscflow.generators import GenerateMaker
    from cscflow.label import LabelMaker
    from cscflow.relax import RelaxMaker
    from cscflow.score import ScoreMaker
    from cscflow.select import SelectMaker
    from cscflow.train import TrainMaker

    relax_model = state.model_path if spec.training.relax_with_trained_model else None
    old_frames = [_ref(u, "frames") for u in state.labelled_uuids]
    jobs: dict[str, Job] = {}
    jobs["generate"] = GenerateMaker(
        chemical_system=spec.chemical_system, settings=spec.generator
    ).make(iteration=k, seed=spec.seed, checkpoint=state.generator_checkpoint)
    jobs["relax"] = RelaxMaker(forcefield=spec.forcefield, settings=spec.relax).make(
        jobs["generate"].output.candidates, model_path=relax_model
    )
    jobs["score"] = ScoreMaker(settings=spec.score, forcefield=spec.forcefield).make(
        jobs["relax"].output.candidates,
        references=_ref(state.reference_uuid, "references"),
        previous=[_ref(u, "candidates") for u in state.scored_uuids],
        model_path=relax_model,
    )
    jobs["select"] = SelectMaker(settings=spec.selection).make(
        jobs["score"].output.candidates, training_frames=old_frames, seed=spec.seed + k
    )
    jobs["label"] = LabelMaker(settings=spec.labeller).make(
        jobs["select"].output.selected, iteration=k, seed=spec.seed
    )
    all_frames = [*old_frames, jobs["label"].output.frames]
    jobs["train"] = TrainMaker(settings=spec.training, type_map=spec.chemical_system.elements).make(
        all_frames, iteration=k, previous_model=state.model_checkpoint
    )
    jobs["evaluate"] = EvaluateMaker(selection=spec.selection, convergence=spec.convergence).make(
        k,
        scored=jobs["score"].output.candidates,
        selected=jobs["select"].output.selected,
        frames=all_frames,
        train=jobs["train"].output,
        history=state.history,
    )
    for stage, job_ in jobs.items():
        tag_stage(job_, spec, state.run_id, k, stage)
    return jobs


@job(name="explore")
def exploration_step(state: LoopState, evaluation: IterationDocument | None = None, train=None):
    """Record the last iteration, stop if saturated, else append the next iteration."""
    from cscflow.evaluate import should_stop

    spec = ExplorationSpec.model_validate(state.spec)
    if evaluation is not None:
        updates = {"history": [*state.history, evaluation]}
        if train is not None and getattr(train, "model_path", None):
            updates.update(model_path=train.model_path, model_checkpoint=train.checkpoint_path)
        state = state.model_copy(update=updates)
    reason = should_stop(state.history, spec.convergence) if state.history else None
    if reason is None and state.iteration >= spec.convergence.max_iterations:
        reason = f"max_iterations ({spec.convergence.max_iterations}) reached"
    if reason is not None:
        return state.model_copy(update={"converged": True, "stop_reason": reason})

    k = state.iteration + 1
    jobs = iteration_jobs(spec, state, k)
    next_state = state.model_copy(
        update={
            "iteration": k,
            "scored_uuids": [*state.scored_uuids, jobs["score"].uuid],
            "labelled_uuids": [*state.labelled_uuids, jobs["label"].uuid],
        }
    )
    trigger = exploration_step(next_state, evaluation=jobs["evaluate"].output, train=jobs["train"].output)
    _tag_trigger(trigger, spec, state.run_id, k)
    # No flow output on purpose: jobflow would add an uncategorised `store_inputs` job that
    # category-bound FireWorks workers never pick up. The last trigger returns the final state.
    return Response(replace=Flow([*jobs.values(), trigger], name=f"iteration {k}"))


def _tag_trigger(trigger: Job, spec: ExplorationSpec, run_id: str, k: int) -> None:
    trigger.name = f"explore after it{k}"
    trigger.metadata.update({"run_id": run_id, "iteration": k, "stage": "trigger"})
    trigger.config.expose_store = True
    # The trigger's own category must not leak to the stages it creates.
    trigger.config.pass_manager_config = False
    category = spec.dispatch.category("trigger")
    if category:
        trigger.update_config({"manager_config": {"_category": category}}, dynamic=False)


def initial_jobs(spec: ExplorationSpec, run_id: str, seeds) -> dict[str, Job]:
    """Iteration 0: relax the reference structures with the MLFF and label them."""
    from cscflow.label import LabelMaker
    from cscflow.references import ReferenceMaker
    from cscflow.relax import RelaxMaker

    jobs: dict[str, Job] = {}
    jobs["relax"] = RelaxMaker(forcefield=spec.forcefield, settings=spec.relax).make(seeds)
    jobs["references"] = ReferenceMaker().make(jobs["relax"].output.candidates)
    jobs["label"] = LabelMaker(settings=spec.labeller).make(
        jobs["references"].output.candidates, iteration=0, seed=spec.seed
    )
    for stage, job_ in jobs.items():
        tag_stage(job_, spec, run_id, 0, stage)
    return jobs


def exploration_flow(spec: ExplorationSpec, run_id: str | None = None, seeds=None) -> Flow:
    """The whole exploration as one dynamic Flow; its output is the final LoopState."""
    from cscflow.references import initial_candidates

    run_id = run_id or uuidlib.uuid4().hex[:12]
    seeds = initial_candidates(spec) if seeds is None else seeds
    jobs = initial_jobs(spec, run_id, seeds)
    state = LoopState(
        run_id=run_id,
        spec=spec.model_dump(mode="json"),
        reference_uuid=jobs["references"].uuid,
        labelled_uuids=[jobs["label"].uuid],
    )
    trigger = exploration_step(state)
    _tag_trigger(trigger, spec, run_id, 0)
    return Flow([*jobs.values(), trigger], output=trigger.output, name=f"cscflow {spec.name}")
