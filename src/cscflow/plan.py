"""`cscflow plan SPEC`: one iteration's FireWorks workflow, built and sized, nothing run.

What a cluster operator needs before submitting a paper-size exploration: how many
Fireworks of each category one iteration makes (including the DFT jobs the Label stage
adds at run time), the largest document it will store (MongoDB refuses > 16 MB), and the
GPU- and CPU-hours from measured per-structure costs (``COSTS``: every number says where
it came from; override with ``--cost NAME=VALUE``).

Nothing runs: no generator, force field, DFT code or Materials Project query. Model paths
that do not exist yet (a cluster's checkpoints seen from a laptop) are listed and replaced
by placeholders so the workflow can still be built. Iteration 0 uses the prototypes (and
seed files) as stand-ins for the MP query; the Label fan-out is built for stand-in
candidates (prototype structures), one per selected slot.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cscflow.config import ExplorationSpec, SpecError, load_spec, read_spec_mapping
from cscflow.schemas import Candidate, Frame, LoopState, MatchKey, Provenance

__all__ = ["COSTS", "Cost", "IterationPlan", "format_plan", "load_plan_spec", "plan_command", "plan_iteration"]

MB = 1024 * 1024
BSON_LIMIT = 16 * MB

# (setting, is a list) of every path a spec may name
PATH_SETTINGS = [
    (("generator", "checkpoint"), False),
    (("forcefield", "model_path"), False),
    (("training", "pretrained"), False),
    (("seeds",), True),
]


@dataclass(frozen=True)
class Cost:
    value: float
    unit: str
    source: str


#: Per-structure (or per-step) costs. "measured" entries were timed on this project's
#: machines; "estimate"/"assumed" ones were not and say so. Override with --cost NAME=VALUE.
COSTS: dict[str, Cost] = {
    "generate_gpu_s": Cost(
        0.5, "GPU s per generated structure",
        "assumed (no MatterGen GPU timing yet): measure with benchmarks/mattergen_throughput.py",
    ),
    "relax_gpu_s": Cost(
        6.0, "GPU s per relaxed structure",
        "estimate, issue 13: ~150 FIRE steps x ~40 ms, sequential ASE on one GPU",
    ),
    "score_cpu_s": Cost(
        0.04, "CPU s per scored candidate",
        "measured, benchmarks/results/scale.txt: incremental score, N=10^3 with 10^3 earlier candidates "
        "(real MP Li-P-S + rattled copies) in 40.6 s on 2 overloaded cores, 2026-12-01",
    ),
    "select_cpu_s": Cost(
        0.005, "CPU s per scored candidate",
        "measured, benchmarks/results/scale.txt: select (QUESTS dH vs 100 frames), N=10^3 in 4.8 s, 2026-12-01",
    ),
    "dft_relax_cpu_h": Cost(
        32.0, "CPU core-hours per DFT relaxation",
        "assumed (no VASP here): ~30-atom PBE relaxation, 520 eV, 64 A^-1 k-mesh, ~1 h on 32 cores",
    ),
    "dft_static_cpu_h": Cost(
        8.0, "CPU core-hours per DFT static", "assumed (no VASP here): ~1/4 of a relaxation",
    ),
    "train_gpu_s_per_step": Cost(
        0.1, "GPU s per DPA-3 training step",
        "assumed (DPA-3.1-3M fine-tune; the tiny DPA-3 measured 0.05 s/step on CPU, docs/stack notes)",
    ),
    "finetune_generator_gpu_s_per_step": Cost(
        0.5, "GPU s per MatterGen fine-tune step", "assumed (no GPU timing yet)",
    ),
}


@dataclass
class IterationPlan:
    """What `plan_iteration` found; `format_plan` prints it."""

    spec_name: str
    iteration: int
    missing_paths: list[str] = field(default_factory=list)
    n_candidates: int = 0
    n_selected: int = 0
    jobs_by_category: dict[str, int] = field(default_factory=dict)
    jobs_by_stage: dict[str, int] = field(default_factory=dict)
    iteration0_jobs: dict[str, int] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)  # name -> BSON bytes
    notes: list[str] = field(default_factory=list)
    gpu_hours: dict[str, float] = field(default_factory=dict)
    cpu_hours: dict[str, float] = field(default_factory=dict)
    costs: dict[str, Cost] = field(default_factory=dict)

    @property
    def largest_document(self) -> tuple[str, int]:
        return max(self.documents.items(), key=lambda kv: kv[1]) if self.documents else ("", 0)


# --------------------------------------------------------------------------- spec


def _get(raw: dict, keys: tuple[str, ...]):
    """raw[k1][k2]... of the raw spec mapping, None where the path stops (a nested path, unlike
    schemas.field_of, which reads one field of a stage output)."""
    node = raw
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(raw: dict, keys: tuple[str, ...], value) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def load_plan_spec(path: str | Path, workdir: str | Path) -> tuple[ExplorationSpec, list[str]]:
    """The spec, with every missing model/seed path listed and replaced by a placeholder
    under `workdir` (seed files: dropped). Other errors are the usual SpecError."""
    path = Path(path)
    raw = read_spec_mapping(path)
    base = path.resolve().parent
    workdir = Path(workdir)
    missing: list[str] = []

    def resolve(value) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else base / p

    for keys, is_list in PATH_SETTINGS:
        value = _get(raw, keys)
        if value in (None, "", []):
            continue
        setting = ".".join(keys)
        if is_list and isinstance(value, list):
            kept = []
            for v in value:
                p = resolve(v)
                if p.exists():
                    kept.append(str(p))
                else:
                    missing.append(f"{setting}: {p}")
            _set(raw, keys, kept)
            continue
        p = resolve(value)
        if p.exists():
            _set(raw, keys, str(p))
            continue
        missing.append(f"{setting}: {p}")
        placeholder = workdir / setting / p.name
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        placeholder.touch()
        _set(raw, keys, str(placeholder))
    resolved = workdir / path.name
    resolved.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        spec = load_spec(resolved)
    except SpecError as exc:
        raise SpecError(str(exc).replace(str(resolved), str(path))) from None
    return spec, missing


# --------------------------------------------------------------------------- stand-ins


def _stand_in_structures(spec: ExplorationSpec):
    """Prototype structures of the system, made into supercells of about the mean cell size."""
    from cscflow.prototypes import prototype_structures

    target = (spec.chemical_system.min_atoms + spec.chemical_system.max_atoms) / 2
    out = []
    for _, s in prototype_structures(spec.chemical_system.elements):
        s = s.copy()
        for axis in (0, 1, 2):
            if len(s) * 2 <= max(target, len(s)) and len(s) * 2 <= spec.chemical_system.max_atoms:
                scale = [1, 1, 1]
                scale[axis] = 2
                s.make_supercell(scale)
        out.append(s)
    if not out:
        raise SpecError("no prototype structure for this chemical system: nothing to stand in for candidates")
    return out


def _stand_in_candidates(spec: ExplorationSpec, n: int, iteration: int) -> list[Candidate]:
    from cscflow.score import match_key

    structures = _stand_in_structures(spec)
    keys = [match_key(s) for s in structures]
    out = []
    for i in range(n):
        j = i % len(structures)
        s = structures[j]
        out.append(
            Candidate(
                provenance=Provenance(
                    candidate_id=f"it{iteration}-standin-{i:05d}", iteration=iteration, generator="stand-in",
                    condition={"e_hull": spec.generator.conditions[i % len(spec.generator.conditions)]},
                    sample_index=i, seed=spec.seed,
                ),
                structure=s, status="relaxed", energy=-4.0 * len(s), energy_per_atom=-4.0,
                max_force=0.04, stress=[[0.0] * 3] * 3, relax_steps=150, converged=True, model="stand-in",
                e_hull=0.02, is_stable=True, is_unique=True, is_novel=True,
                match_key=MatchKey.model_validate(keys[j].model_dump()), delta_entropy=1.0, selected=True,
            )
        )
    return out


def _stand_in_frame(cand: Candidate) -> Frame:
    n = len(cand.structure)
    return Frame(
        frame_id=f"{cand.id}-relax0-s000", structure=cand.structure, energy=-4.0 * n,
        forces=[[0.1, -0.2, 0.3]] * n, stress=[[0.1] * 3] * 3, kind="relax_step",
        labeller="vasp", provenance=cand.provenance, label_seed=1, delta_entropy=0.5,
    )


def _bson_size(obj) -> int:
    """Size of `obj` as jobflow stores it (jsanitize strict, allow_bson) encoded as BSON."""
    import bson
    from monty.json import jsanitize

    doc = jsanitize(obj, strict=True, allow_bson=True, enum_values=True)
    return len(bson.encode(doc if isinstance(doc, dict) else {"value": doc}))


# --------------------------------------------------------------------------- plan


def _structure_flow(spec: ExplorationSpec, one: Candidate, iteration: int):
    """What one structure's label job puts in its place at run time (None: CP2K runs the
    protocol inside that job)."""
    if spec.labeller.backend == "vasp":
        from cscflow.label.vasp import vasp_flow

        return vasp_flow([one], iteration, spec.seed, spec.labeller)
    return None


def _n_selected(spec: ExplorationSpec, n_candidates: int) -> int:
    """Every bin's quota filled (the most the Label stage can get), at most every candidate."""
    from cscflow.select import bin_quota

    return min(sum(bin_quota(b, spec.selection.quota_scale) for b in spec.selection.bins), n_candidates)


def _frames_per_structure(spec: ExplorationSpec) -> float:
    lab = spec.labeller
    if lab.backend == "teacher":
        return lab.copies_per_structure + int(lab.include_unperturbed)
    return lab.copies_per_structure * sum(lab.relax_frames_kept) / 2 + lab.statics_per_structure


def plan_iteration(
    spec: ExplorationSpec,
    iteration: int = 1,
    costs: dict[str, float] | None = None,
    run_id: str = "plan",
) -> IterationPlan:
    """Build iteration `iteration`'s workflow (and iteration 0's) and size it; runs nothing.

    The Label fan-out is built for every selected slot (one job per structure; for VASP
    one structure's atomate2 calculations are built and counted per structure).
    """
    import uuid as uuidlib

    from fireworks import FWAction
    from jobflow import Flow
    from jobflow.managers.fireworks import flow_to_workflow

    from cscflow.dispatch import missing_categories, workflow_for_run
    from cscflow.loop import iteration_jobs
    from cscflow.references import initial_candidates

    if iteration < 1:
        raise SpecError("plan: --iteration must be >= 1 (iteration 0 is planned with every iteration)")
    plan = IterationPlan(spec_name=spec.name, iteration=iteration)
    plan.costs = {k: Cost(float(costs[k]), c.unit, "--cost (user)") if costs and k in costs else c
                  for k, c in COSTS.items()}
    unknown = sorted(set(costs or {}) - set(COSTS))
    if unknown:
        raise SpecError(f"plan: unknown cost(s) {', '.join(unknown)}; known: {', '.join(COSTS)}")

    # iteration 0: the workflow `cscflow submit` adds (dispatch builds it)
    stand_in_spec = spec.model_copy(update={"materials_project": False, "use_prototypes": True})
    seeds = initial_candidates(stand_in_spec)
    if spec.materials_project:
        plan.notes.append(f"iteration 0: {len(seeds)} prototype/seed structures stand in for the MP query")
    wf0 = workflow_for_run(spec, run_id, seeds=seeds)
    plan.iteration0_jobs = dict(Counter(str(fw.spec.get("_category")) for fw in wf0.fws))
    wrong = missing_categories(wf0, spec)

    # iteration k: the stage jobs the trigger creates at run time
    stage_uuid = {fw.spec.get("stage"): fw for fw in wf0.fws}
    ref_uuid = _job_uuid(stage_uuid.get("references")) or uuidlib.uuid4().hex
    label0 = _job_uuid(stage_uuid.get("label")) or uuidlib.uuid4().hex
    state = LoopState(
        run_id=run_id, spec=spec.model_dump(mode="json"), iteration=iteration - 1, reference_uuid=ref_uuid,
        scored_uuids=[uuidlib.uuid4().hex for _ in range(iteration - 1)],
        labelled_uuids=[label0, *(uuidlib.uuid4().hex for _ in range(iteration - 1))],
        train_uuid=uuidlib.uuid4().hex if iteration > 1 else None,
    )
    jobs = iteration_jobs(spec, state, iteration)
    wf = flow_to_workflow(Flow(list(jobs.values()), name=f"iteration {iteration}"), store=None)
    wrong += missing_categories(wf, spec)
    if wrong:
        plan.notes.append("Fireworks with the wrong _category: " + "; ".join(wrong))
    by_cat = Counter(str(fw.spec.get("_category")) for fw in wf.fws)
    by_stage = Counter(str(fw.spec.get("stage")) for fw in wf.fws)
    trigger_cat = str(spec.dispatch.category("trigger"))
    by_cat[trigger_cat] += 1  # the trigger that appends the next iteration
    by_stage["trigger"] += 1
    for fw in wf.fws:
        plan.documents[f"Firework '{fw.name}'"] = _bson_size(fw.to_db_dict())
    plan.documents["iteration workflow document"] = _bson_size(wf.to_db_dict())

    # stage outputs at this size: sets of store keys; one document per candidate / frame
    # in the run's collections (cscflow.structure_store)
    from cscflow.structure_store import CandidateSet, FrameSet

    n = spec.generator.num_per_condition * len(spec.generator.conditions)
    plan.n_candidates = n
    plan.n_selected = n_sel = _n_selected(spec, n)
    n_frames = int(n_sel * _frames_per_structure(spec))
    sample = _stand_in_candidates(spec, min(n, 64), iteration)
    job_uuid = str(uuidlib.uuid4())

    def key_set(set_type, ids):
        return set_type(keys=[f"{job_uuid}/{i}" for i in ids], ids=list(ids))

    cand_ids = [f"it{iteration}-mattergen-e0.00-{i:05d}" for i in range(n)]
    for stage in ("generate", "relax", "score"):
        plan.documents[f"{stage} output ({n} candidate keys)"] = _bson_size({"candidates": key_set(CandidateSet, cand_ids)})
    plan.documents[f"select output ({n_sel} candidate keys)"] = _bson_size({"selected": key_set(CandidateSet, cand_ids[:n_sel])})
    frame_ids = [f"{c}-relax0-s{k:03d}" for c in cand_ids[:max(n_sel, 1)] for k in range(16)][:n_frames]
    plan.documents[f"label output ({n_frames} frame keys)"] = _bson_size({"frames": key_set(FrameSet, frame_ids)})
    plan.documents["one candidate document (largest stand-in)"] = max(_bson_size(c) for c in sample)
    plan.documents["one frame document (largest stand-in)"] = max(_bson_size(_stand_in_frame(c)) for c in sample)

    # the generation batches and relax shards the stages fan out into at run time (each with
    # a collect job, in the stage's category)
    import math

    from cscflow.generators import generation_batches

    n_batches = len(generation_batches(spec.generator))
    by_cat[str(spec.dispatch.category("generate"))] += n_batches + 1
    by_stage["generate batches (added at run time)"] += n_batches + 1
    n_shards = max(1, math.ceil(n / spec.relax.shard_size))
    by_cat[str(spec.dispatch.category("relax"))] += n_shards + 1
    by_stage["relax shards (added at run time)"] += n_shards + 1

    # the DFT fan-out the Label stage returns at run time: one job per structure (its
    # candidate as one store key), each of which VASP replaces by its atomate2 calculations
    label_cat = str(spec.dispatch.category("label"))
    if spec.labeller.backend in ("vasp", "cp2k") and n_sel:
        from cscflow.label import label_fanout_flow

        label_flow = label_fanout_flow(key_set(CandidateSet, cand_ids[:n_sel]), iteration, spec.seed, spec.labeller)
        label_wf = flow_to_workflow(label_flow, store=None)
        n_fws = len(label_wf.fws)
        by_cat[label_cat] += n_fws
        by_stage["label structures (added at run time)"] += n_fws
        plan.documents[f"Label FWAction ({n_fws} Fireworks)"] = _bson_size(FWAction(detours=[label_wf]).to_dict())
        one_flow = _structure_flow(spec, _stand_in_candidates(spec, 1, iteration)[0], iteration)
        if one_flow is not None:
            one_wf = flow_to_workflow(one_flow, store=None)
            added = n_sel * len(one_wf.fws)
            by_cat[label_cat] += added
            by_stage["label calculations (added per structure)"] += added
            plan.documents["one structure's label FWAction"] = _bson_size(FWAction(detours=[one_wf]).to_dict())
            if spec.labeller.backend == "vasp":  # each structure's statics: another replace at run time
                added = n_sel * spec.labeller.statics_per_structure
                by_cat[label_cat] += added
                by_stage["label statics (added later)"] += added
    plan.jobs_by_category = dict(sorted(by_cat.items()))
    plan.jobs_by_stage = dict(sorted(by_stage.items()))

    # hours
    c = {k: v.value for k, v in plan.costs.items()}
    plan.gpu_hours = {
        "generate": n * c["generate_gpu_s"] / 3600,
        "relax": n * c["relax_gpu_s"] / 3600,
        "train": _train_steps(spec) * c["train_gpu_s_per_step"] / 3600,
    }
    if spec.generator.backend == "mattergen" and spec.generator.finetune:
        plan.gpu_hours["finetune_generator"] = spec.generator.finetune_steps * c["finetune_generator_gpu_s_per_step"] / 3600
    plan.cpu_hours = {"score": n * c["score_cpu_s"] / 3600, "select": n * c["select_cpu_s"] / 3600}
    if spec.labeller.backend in ("vasp", "cp2k"):
        plan.cpu_hours["dft relaxations"] = n_sel * spec.labeller.copies_per_structure * c["dft_relax_cpu_h"]
        plan.cpu_hours["dft statics"] = n_sel * spec.labeller.statics_per_structure * c["dft_static_cpu_h"]
    return plan


def _job_uuid(fw) -> str | None:
    if fw is None:
        return None
    for task in fw.tasks:
        job_ = task.get("job")
        if job_ is not None:
            return getattr(job_, "uuid", None) or (job_.get("uuid") if isinstance(job_, dict) else None)
    return None


def _train_steps(spec: ExplorationSpec) -> int:
    t = spec.training
    if t.backend == "none":
        return 0
    return t.numb_steps or int(t.epochs * t.n_train)


def format_plan(plan: IterationPlan) -> str:
    lines = [f"plan: {plan.spec_name}, iteration {plan.iteration} (built, nothing run)"]
    if plan.missing_paths:
        lines.append(f"missing paths ({len(plan.missing_paths)}; placeholders used to build the workflow):")
        lines += [f"  {m}" for m in plan.missing_paths]
    lines.append(f"candidates: {plan.n_candidates}   selected for labels: {plan.n_selected}")
    lines.append("iteration 0 Fireworks by category: " + ", ".join(f"{k}: {v}" for k, v in plan.iteration0_jobs.items()))
    total = sum(plan.jobs_by_category.values())
    lines.append(f"iteration {plan.iteration} jobs by category ({total} in all):")
    lines += [f"  {k:8s} {v:7d}" for k, v in plan.jobs_by_category.items()]
    lines.append("  by stage: " + ", ".join(f"{k}: {v}" for k, v in plan.jobs_by_stage.items()))
    name, size = plan.largest_document
    flag = "  OVER the 16 MB BSON limit" if size > BSON_LIMIT else ""
    lines.append(f"largest document: {name}: {size / MB:.1f} MB{flag}")
    over = [k for k, v in plan.documents.items() if v > BSON_LIMIT]
    if over:
        lines.append(f"documents over 16 MB: {', '.join(over)}")
    top = sorted(plan.documents.items(), key=lambda kv: -kv[1])[:6]
    lines += [f"  {v / MB:8.2f} MB  {k}" for k, v in top]
    lines.append(f"GPU-hours: {sum(plan.gpu_hours.values()):.1f}  (" + ", ".join(f"{k} {v:.1f}" for k, v in plan.gpu_hours.items()) + ")")
    lines.append(f"CPU-hours: {sum(plan.cpu_hours.values()):.1f}  (" + ", ".join(f"{k} {v:.1f}" for k, v in plan.cpu_hours.items()) + ")")
    lines.append("costs used:")
    lines += [f"  {k} = {c.value:g} {c.unit}  [{c.source}]" for k, c in plan.costs.items()]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_command():
    """The click command (registered by cscflow.cli)."""
    import click

    from cscflow.user_errors import user_errors

    @click.command("plan")
    @click.argument("spec", type=click.Path(dir_okay=False))
    @click.option("--iteration", type=int, default=1, show_default=True, help="Which iteration to build.")
    @click.option("--cost", "cost_overrides", multiple=True, metavar="NAME=VALUE",
                  help=f"Override a per-structure cost ({', '.join(COSTS)}).")
    @user_errors
    def plan(spec, iteration, cost_overrides):
        """Build one iteration's FireWorks workflow of SPEC without running it: jobs per
        category, largest document, estimated GPU/CPU hours (missing checkpoints are listed)."""
        costs = {}
        for item in cost_overrides:
            name, sep, value = item.partition("=")
            try:
                costs[name.strip()] = float(value)
            except ValueError:
                raise SpecError(f"--cost {item!r}: expected NAME=NUMBER") from None
            if not sep:
                raise SpecError(f"--cost {item!r}: expected NAME=NUMBER")
        with tempfile.TemporaryDirectory(prefix="cscflow-plan-") as tmp:
            resolved, missing = load_plan_spec(spec, tmp)
            result = plan_iteration(resolved, iteration=iteration, costs=costs)
            result.missing_paths = missing
            click.echo(format_plan(result))

    return plan
