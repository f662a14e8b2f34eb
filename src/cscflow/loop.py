"""The closed loop: a trigger job that appends one iteration at a time until saturation.

:class:`ExplorationMaker` is the whole exploration as a Maker composed of the stage Makers
(generator, relaxer, scorer, selector, labeller, trainer, evaluator, generator fine-tune):
swap one, or reach into them with ``update_kwargs``, as with atomate2's flows.
``ExplorationMaker.from_spec(spec)`` builds them from a spec; ``exploration_flow(spec)`` is
``from_spec(spec).make(spec)``: iteration 0 (relax the seed/prototype references, label
them) + the first trigger. Each trigger either returns the final LoopState (entropy
saturated, or max_iterations) or replaces itself with
``Generate -> Relax -> Score -> Select -> Label -> Train -> Evaluate -> next trigger``.
Stages receive earlier iterations' outputs as OutputReferences built from uuids kept in
the state, so the state stays small and jobflow resolves the data from the store.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass

from jobflow import Flow, Job, Maker, Response, job
from jobflow.core.reference import OutputReference

from cscflow.checkpoint import KEY, stage_key
from cscflow.config import ExplorationSpec
from cscflow.schemas import field_of, IterationDocument, LoopState

__all__ = [
    "ExplorationMaker",
    "exploration_flow",
    "exploration_step",
    "iteration_jobs",
    "tag_stage",
    "tag_trigger",
    "trained_model",
]


def tag_stage(job_: Job, spec: ExplorationSpec, run_id: str, iteration: int, stage: str) -> Job:
    """Name, checkpoint key and FireWorks category of one stage job."""
    job_.name = f"{stage} it{iteration}"
    job_.metadata.update(
        {KEY: stage_key(run_id, iteration, stage), "run_id": run_id, "iteration": iteration, "stage": stage}
    )
    job_.config.expose_store = True
    _route(job_, spec, stage)
    return job_


def _route(job_: Job, spec: ExplorationSpec, stage: str) -> None:
    """Where the job runs: FireWorks `_category` and jobflow-remote worker, set on this job only
    (dynamic=False), so that stages created later by a trigger get their own, not a parent's."""
    config = spec.dispatch.manager_config(stage)
    if config:
        job_.update_config({"manager_config": config}, dynamic=False)


def _ref(uuid: str, attribute: str) -> OutputReference:
    return getattr(OutputReference(uuid), attribute)


def trained_model(spec: ExplorationSpec, state: LoopState) -> str | None:
    """The force field that relaxes and scores iteration k: the one fine-tuned so far.

    Paper Methods 4.1 closes the loop this way; Score then recomputes the reference hull
    and earlier candidates with the same model (their model tag differs). None (the
    starting ``forcefield``) before the first Train, or with
    ``training.relax_with_trained_model: false``.
    """
    return state.model_path if spec.training.relax_with_trained_model else None


def generator_checkpoint(spec: ExplorationSpec, state: LoopState) -> str | None:
    """The generator model of this iteration: the last fine-tuned one, else the configured one."""
    if state.generator_checkpoint:
        return state.generator_checkpoint
    return str(spec.generator.checkpoint) if spec.generator.checkpoint else None


@job(name="link")
def link_outputs(uuids: list[str], attribute: str) -> list[OutputReference]:
    """References to earlier iterations' outputs, made at run time.

    Under FireWorks a replace flow may not reference jobs outside itself (jobflow's
    ``flow_to_workflow`` rejects external references), so the uuids travel as plain strings
    and this job returns the references; jobflow resolves them when a stage reads them, so
    nothing is copied in the store.
    """
    return [_ref(u, attribute) for u in uuids]


def _linked(spec: ExplorationSpec, run_id: str, k: int, uuids: list[str], attribute: str):
    link = link_outputs(list(uuids), attribute)
    link.name = f"link {attribute} it{k}"
    link.metadata.update({"run_id": run_id, "iteration": k, "stage": "link"})
    _route(link, spec, "link")
    return link, [link.output[i] for i in range(len(uuids))]


def iteration_jobs(spec: ExplorationSpec, state: LoopState, k: int, maker: ExplorationMaker | None = None) -> dict[str, Job]:
    """The stage jobs of iteration k, wired together, plus the `link` jobs they read from."""
    from cscflow.generators import GenerateFanOutMaker
    from cscflow.relax import RelaxShardMaker

    maker = maker or ExplorationMaker.from_spec(spec)
    relax_model = trained_model(spec, state)
    links = {
        attribute: _linked(spec, state.run_id, k, uuids, attribute)
        for attribute, uuids in (
            ("references", [state.reference_uuid]),
            ("candidates", state.scored_uuids),
            ("frames", state.labelled_uuids),
            ("train_frame_ids", [state.train_uuid] if state.train_uuid else []),
        )
        if uuids
    }
    old_frames = links["frames"][1]
    jobs: dict[str, Job] = {}
    # one job per (condition, batch of generator.per_job), run concurrently by the GPU workers
    jobs["generate"] = GenerateFanOutMaker(generate_maker=maker.generate_maker).make(
        iteration=k, seed=spec.seed, checkpoint=generator_checkpoint(spec, state)
    )
    # shards of relax.shard_size candidates, run concurrently by the workers of the relax category
    jobs["relax"] = RelaxShardMaker(relax_maker=maker.relax_maker).make(
        jobs["generate"].output.candidates, model_path=relax_model
    )
    previous = links["candidates"][1] if "candidates" in links else []
    after = None
    if relax_model is not None:  # a new force field: references and earlier candidates re-evaluated, sharded
        from cscflow.score import ReevaluateMaker

        jobs["reevaluate"] = ReevaluateMaker(
            forcefield=maker.score_maker.forcefield, shard_size=maker.score_maker.settings.reevaluate_shard_size
        ).make(links["references"][1][0], previous, model_path=relax_model)
        after = jobs["reevaluate"].output
    jobs["score"] = maker.score_maker.make(
        jobs["relax"].output.candidates,
        references=links["references"][1][0],
        previous=previous,
        model_path=relax_model,
        after=after,
    )
    jobs["select"] = maker.select_maker.make(
        jobs["score"].output.candidates, training_frames=old_frames, seed=spec.seed + k
    )
    jobs["label"] = maker.label_maker.make(jobs["select"].output.selected, iteration=k, seed=spec.seed)
    all_frames = [*old_frames, jobs["label"].output.frames]
    jobs["train"] = maker.train_maker.make(
        all_frames, iteration=k, previous_model=state.model_checkpoint,
        previous_train_ids=links["train_frame_ids"][1][0] if "train_frame_ids" in links else [],
    )
    if maker.finetune_generator_maker is not None:
        jobs["finetune_generator"] = maker.finetune_generator_maker.make(
            all_frames,
            checkpoint=generator_checkpoint(spec, state),
            iteration=k,
            seed=spec.seed,
            references=links["references"][1][0],
        )
    jobs["evaluate"] = maker.evaluate_maker.make(
        k,
        scored=jobs["score"].output.candidates,
        selected=jobs["select"].output.selected,
        frames=all_frames,
        train=jobs["train"].output,
        history=state.history,
    )
    for stage, job_ in jobs.items():
        tag_stage(job_, spec, state.run_id, k, stage)
    for attribute, (link, _) in links.items():
        jobs[f"link_{attribute}"] = link
    return jobs


@job(name="explore")
def exploration_step(
    state: LoopState,
    evaluation: IterationDocument | None = None,
    train=None,
    generator=None,
    after=None,
    maker: ExplorationMaker | None = None,
):
    """Record the last iteration, stop if saturated, else append the next iteration.

    `after` only orders the first trigger behind iteration 0: FireWorks starts a job as soon
    as its parents are done, and without a reference the trigger would have none. `maker`:
    the exploration's stage Makers (None: built from the state's spec, as on resume).
    """
    from cscflow.evaluate import should_stop

    spec = ExplorationSpec.model_validate(state.spec)
    if evaluation is not None:
        state = advance_state(state, evaluation, train, generator)
    reason = should_stop(state.history, spec.convergence) if state.history else None
    if reason is None and state.iteration >= spec.convergence.max_iterations:
        reason = f"max_iterations ({spec.convergence.max_iterations}) reached"
    if reason is not None:
        return state.model_copy(update={"converged": True, "stop_reason": reason})

    k = state.iteration + 1
    jobs = iteration_jobs(spec, state, k, maker)
    next_state = state.model_copy(
        update={
            "iteration": k,
            "scored_uuids": [*state.scored_uuids, jobs["score"].uuid],
            "labelled_uuids": [*state.labelled_uuids, jobs["label"].uuid],
            "train_uuid": jobs["train"].uuid,
        }
    )
    finetuned = jobs["finetune_generator"].output if "finetune_generator" in jobs else None
    trigger = exploration_step(
        next_state, evaluation=jobs["evaluate"].output, train=jobs["train"].output, generator=finetuned, maker=maker
    )
    tag_trigger(trigger, spec, state.run_id, k)
    # No flow output on purpose: jobflow would add an uncategorised `store_inputs` job that
    # category-bound FireWorks workers never pick up. The last trigger returns the final state.
    return Response(replace=Flow([*jobs.values(), trigger], name=f"iteration {k}"))


def advance_state(state: LoopState, evaluation, train=None, generator=None) -> LoopState:
    """Fold one finished iteration (its evaluation, trained models) into the state."""
    updates = {"history": [*state.history, evaluation]}
    model_path = field_of(train, "model_path")
    if model_path:
        updates.update(model_path=model_path, model_checkpoint=field_of(train, "checkpoint_path"))
    if field_of(generator, "checkpoint"):
        updates["generator_checkpoint"] = field_of(generator, "checkpoint")
    return state.model_copy(update=updates)




def tag_trigger(trigger: Job, spec: ExplorationSpec, run_id: str, k: int) -> None:
    trigger.name = f"explore after it{k}"
    trigger.metadata.update({"run_id": run_id, "iteration": k, "stage": "trigger"})
    trigger.config.expose_store = True
    # The trigger's own category must not leak to the stages it creates.
    trigger.config.pass_manager_config = False
    _route(trigger, spec, "trigger")


def initial_jobs(spec: ExplorationSpec, run_id: str, seeds, maker: ExplorationMaker | None = None) -> dict[str, Job]:
    """Iteration 0: relax the reference structures with the MLFF and label them."""
    from cscflow.references import ReferenceMaker

    maker = maker or ExplorationMaker.from_spec(spec)
    jobs: dict[str, Job] = {}
    jobs["relax"] = maker.relax_maker.make(seeds)
    jobs["references"] = ReferenceMaker().make(jobs["relax"].output.candidates)
    jobs["label"] = maker.label_maker.make(jobs["references"].output.candidates, iteration=0, seed=spec.seed)
    for stage, job_ in jobs.items():
        tag_stage(job_, spec, run_id, 0, stage)
    return jobs


@dataclass
class ExplorationMaker(Maker):
    """The exploration of one chemical system (paper 000, Methods 4.1), composed of stage Makers.

    Each iteration runs ``generate -> relax (shards) -> score -> select -> label -> train
    [-> finetune_generator] -> evaluate`` with these Makers, then the trigger decides whether
    to go on. Any Maker may be replaced by a compatible one, e.g.::

        maker = ExplorationMaker.from_spec(spec)
        maker.update_kwargs({"progress": False}, class_filter=RelaxMaker)
        flow = maker.make(spec)

    The Makers travel with the trigger, so every later iteration uses them. A resumed run
    (``cscflow resume``) rebuilds them from its spec.
    """

    name: str = "cscflow exploration"
    generate_maker: Maker | None = None
    relax_maker: Maker | None = None
    score_maker: Maker | None = None
    select_maker: Maker | None = None
    label_maker: Maker | None = None
    train_maker: Maker | None = None
    evaluate_maker: Maker | None = None
    finetune_generator_maker: Maker | None = None

    def __post_init__(self):
        from cscflow.evaluate import EvaluateMaker
        from cscflow.generators import GenerateMaker
        from cscflow.label import LabelMaker
        from cscflow.relax import RelaxMaker
        from cscflow.score import ScoreMaker
        from cscflow.select import SelectMaker
        from cscflow.train import TrainMaker

        defaults = {
            "generate_maker": GenerateMaker, "relax_maker": RelaxMaker, "score_maker": ScoreMaker,
            "select_maker": SelectMaker, "label_maker": LabelMaker, "train_maker": TrainMaker,
            "evaluate_maker": EvaluateMaker,
        }
        for name, cls in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, cls())

    @classmethod
    def from_spec(cls, spec: ExplorationSpec) -> ExplorationMaker:
        """The stage Makers a spec describes."""
        from cscflow.evaluate import EvaluateMaker
        from cscflow.generators import GenerateMaker
        from cscflow.label import LabelMaker
        from cscflow.relax import RelaxMaker
        from cscflow.score import ScoreMaker
        from cscflow.select import SelectMaker
        from cscflow.train import TrainMaker

        finetune = None
        if spec.generator.backend == "mattergen" and spec.generator.finetune:
            from cscflow.generators.mattergen import FinetuneGeneratorMaker

            finetune = FinetuneGeneratorMaker(
                max_steps=spec.generator.finetune_steps,
                batch_size=spec.generator.finetune_batch_size,
                lr=spec.generator.finetune_lr,
                device=spec.generator.device,
            )
        return cls(
            name=f"cscflow {spec.name}",
            generate_maker=GenerateMaker(chemical_system=spec.chemical_system, settings=spec.generator),
            relax_maker=RelaxMaker(forcefield=spec.forcefield, settings=spec.relax),
            score_maker=ScoreMaker(settings=spec.score, forcefield=spec.forcefield),
            select_maker=SelectMaker(settings=spec.selection),
            label_maker=LabelMaker(settings=spec.labeller),
            train_maker=TrainMaker(settings=spec.training, type_map=spec.chemical_system.elements),
            evaluate_maker=EvaluateMaker(selection=spec.selection, convergence=spec.convergence,
                                         training=spec.training),
            finetune_generator_maker=finetune,
        )

    def make(self, spec: ExplorationSpec, run_id: str | None = None, seeds=None) -> Flow:
        """The whole exploration as one dynamic Flow; its output is the final LoopState."""
        from cscflow.references import initial_candidates

        run_id = run_id or uuidlib.uuid4().hex[:12]
        seeds = initial_candidates(spec) if seeds is None else seeds
        jobs = initial_jobs(spec, run_id, seeds, self)
        state = LoopState(
            run_id=run_id,
            spec=spec.model_dump(mode="json"),
            reference_uuid=jobs["references"].uuid,
            labelled_uuids=[jobs["label"].uuid],
        )
        trigger = exploration_step(state, after=jobs["label"].output.labeller, maker=self)
        tag_trigger(trigger, spec, run_id, 0)
        return Flow([*jobs.values(), trigger], output=trigger.output, name=self.name)


def exploration_flow(spec: ExplorationSpec, run_id: str | None = None, seeds=None) -> Flow:
    """The whole exploration as one dynamic Flow, with the stage Makers the spec describes."""
    return ExplorationMaker.from_spec(spec).make(spec, run_id, seeds)
