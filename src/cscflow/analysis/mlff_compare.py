"""`cscflow compare-mlff RUN`: MLFF families trained side by side on one run's frames (Fig. 3a).

Paper split (§2.3, Methods 4.3): the frames of iterations 0..``train_iterations_max``
are ranked once by entropy gain (``datasets.split_frames``); every training set is a
prefix of that ranking (the top N_train frames), so all families and all sizes see the
same frames; the test set is fixed: the pool frames outside the largest training set
plus every frame of later iterations. Each (family, N_train) is one jobflow job (stage
``mlff_compare``, category of ``train`` so FireWorks sends it to a GPU worker), run
against the run's own store and tagged with a checkpoint key: a second call reuses the
finished trainings. Models go to RUN_DIR/mlff_compare/<family>/n<N>/; the figure
(log10 dH/dN, energy and force RMSE vs N_train, one line per family), one parity plot
per family (its largest model) and metrics.json go to RUN_DIR/mlff_compare/.

``--submit`` (:func:`compare_flow`, :func:`submit_compare`) puts the same trainings on a
FireWorks LaunchPad: a CPU job reads the split frames from the run (by id, the split is
made at submit time), the training jobs get them through the JobStore, a CPU job draws the
figures. The checkpoint keys are the same, so the local command afterwards only draws.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jobflow import Flow, Maker, job
from pydantic import BaseModel, Field

from cscflow.analysis.plotting import pyplot, save_figure
from cscflow.checkpoint import resumable
from cscflow.config import TrainingSettings
from cscflow.schemas import Frame

__all__ = [
    "CompareFrames",
    "CompareRow",
    "CompareTrainMaker",
    "compare_flow",
    "compare_report",
    "comparison_split",
    "entropy_rate",
    "format_table",
    "load_compare_frames",
    "load_training_overrides",
    "plot_comparison",
    "run_compare",
    "submit_compare",
    "untuned_errors",
]

STAGE = "mlff_compare"
TRAIN_STAGE = "train"  # trainings run where the loop's training runs (GPU workers)
CPU_STAGE = "evaluate"  # reading frames and drawing run where evaluation runs


class CompareRow(BaseModel):
    """One family trained on the top-N frames, measured on the fixed test set."""

    backend: str
    n_train: int
    n_test: int
    energy_rmse: float | None = Field(None, description="eV/atom")
    force_rmse: float | None = Field(None, description="eV/Å")
    stress_rmse: float | None = Field(None, description="GPa")
    n_parameters: int | None = Field(None, description="size of the trained model")
    model_path: str
    start_from: str
    numb_steps: int = 0
    seconds: float = 0.0
    energy_ref: list[float] = Field(default_factory=list)
    energy_pred: list[float] = Field(default_factory=list)
    force_ref: list[float] = Field(default_factory=list)
    force_pred: list[float] = Field(default_factory=list)


@dataclass
class CompareTrainMaker(Maker):
    """Train one family on given frames and evaluate it on the fixed test frames."""

    name: str = STAGE
    settings: TrainingSettings = field(default_factory=TrainingSettings)
    type_map: list[str] = field(default_factory=list)
    work_dir: str = "."

    @job(data=["energy_ref", "energy_pred", "force_ref", "force_pred"])
    @resumable
    def make(self, train_frames: list[Frame], test_frames: list[Frame], n_train: int | None = None) -> CompareRow:
        """`n_train`: train on the first n frames only (the ranked pool's prefix)."""
        from cscflow.trainers import evaluate_model, get_trainer

        train_frames = list(train_frames)[:n_train] if n_train else list(train_frames)
        model = get_trainer(self.settings.backend).train(train_frames, self.work_dir, self.settings, self.type_map)
        metrics = evaluate_model(model.model_path, test_frames, predictions=True)
        return CompareRow(
            backend=model.backend, n_train=len(train_frames), n_test=len(test_frames),
            energy_rmse=metrics["energy_rmse"], force_rmse=metrics["force_rmse"],
            stress_rmse=metrics["stress_rmse"], n_parameters=metrics["n_parameters"], model_path=model.model_path,
            start_from=model.start_from,
            numb_steps=model.numb_steps, seconds=model.seconds,
            energy_ref=metrics["energy_ref"], energy_pred=metrics["energy_pred"],
            force_ref=metrics["force_ref"], force_pred=metrics["force_pred"],
        )


def comparison_split(frames: Sequence[Frame], n_max: int, train_iterations_max: int = 3, seed: int = 0,
                     k: int = 32, cutoff: float = 5.0, bandwidth: float = 0.015):
    """(ranked training frames, fixed test frames): entropy-ranked top n_max of the pool."""
    from cscflow.datasets import split_frames

    split = split_frames(frames, n_train=n_max, train_iterations_max=train_iterations_max, test_fraction=0.1,
                         seed=seed, k=k, cutoff=cutoff, bandwidth=bandwidth)
    if not split.test:
        raise ValueError("the split left no test frame: lower the largest N_train")
    return split.train, split.test


def entropy_rate(ranked: Sequence[Frame], sizes: Sequence[int], k: int = 32, cutoff: float = 5.0,
                 bandwidth: float = 0.015, window: int = 10) -> list[float | None]:
    """dH/dN (nats per frame) of the ranked set at each size, as the loop measures it
    (``entropy.dh_dn`` over the last `window` frames of H along the ranking)."""
    from cscflow.entropy import dh_dn, entropy_along, structure_descriptors

    curve = entropy_along(structure_descriptors([f.structure for f in ranked[:max(sizes)]], k=k, cutoff=cutoff),
                          bandwidth=bandwidth)
    rates = dh_dn(curve, window)
    return [rates[n - 1] for n in sizes]


def plot_comparison(rows: Sequence[CompareRow], sizes: Sequence[int], dh_dn: Sequence[float],
                    path: str | Path) -> tuple[Path, dict[str, list[int]]]:
    """Fig. 3a: log10 dH/dN, energy RMSE (meV/atom) and force RMSE (meV/Å) vs N_train, one
    line per family; returns the image and the N_train points of each family's curve."""
    plt = pyplot()

    fig, axes = plt.subplots(3, 1, figsize=(5, 8), sharex=True)
    rate = np.asarray([np.nan if r is None else r for r in dh_dn], float)
    axes[0].plot(sizes, np.log10(np.where(rate > 0, rate, np.nan)), "k.-")
    axes[0].set_ylabel("log10 dH/dN")
    curves = {}
    for backend in sorted({r.backend for r in rows}):
        mine = sorted((r for r in rows if r.backend == backend), key=lambda r: r.n_train)
        n = curves[backend] = [r.n_train for r in mine]
        axes[1].plot(n, [np.nan if r.energy_rmse is None else 1000 * r.energy_rmse for r in mine], "o-", label=backend)
        axes[2].plot(n, [np.nan if r.force_rmse is None else 1000 * r.force_rmse for r in mine], "o-", label=backend)
    axes[1].set_ylabel("E RMSE (meV/atom)")
    axes[2].set_ylabel("F RMSE (meV/Å)")
    axes[2].set_xlabel("N_train (frames)")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path, dpi=120), curves


# training settings that name a file; chgnet/sevenn `pretrained` may also be a wheel's model name
_FILE_KEYS = (("pretrained",), ("mace", "foundation_model"), ("mace", "replay_file"), ("mattersim", "pretrained"),
              ("chgnet", "pretrained"), ("sevenn", "pretrained"))


def load_training_overrides(path: str | Path) -> dict:
    """A YAML mapping of `training` settings (per-family blocks, e.g. tiny sizes) laid over the
    run's own; relative file paths are taken relative to the file. Bad input is a SpecError."""
    from cscflow.config import SpecError, read_spec_mapping

    path = Path(path)
    try:
        raw = read_spec_mapping(path)
    except SpecError as exc:
        raise SpecError(f"--training: {exc}") from None
    if isinstance(raw.get("training"), dict):  # a spec-like file with a `training:` block works too
        raw = raw["training"]
    for keys in _FILE_KEYS:
        node = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and not Path(value).expanduser().is_absolute() and (path.parent / value).exists():
            node[keys[-1]] = str((path.parent / value).resolve())
    return raw


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_overrides(base: TrainingSettings, overrides: dict | None) -> TrainingSettings:
    """`base` with `overrides` merged in block by block, validated as a whole."""
    from pydantic import ValidationError

    from cscflow.config import SpecError

    if not overrides:
        return base
    try:
        return TrainingSettings.model_validate(_merge(base.model_dump(), overrides))
    except ValidationError as err:
        msgs = [f"training.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise SpecError("--training: " + "; ".join(msgs)) from None


def _training_settings(base: TrainingSettings, backend: str, epochs: int | None) -> TrainingSettings:
    """The run's training block with `backend` chosen; `epochs` overrides every family's length."""
    settings = base.model_copy(update={"backend": backend})
    if epochs is None:
        return settings
    blocks = {b: getattr(settings, b).model_copy(update={"epochs": epochs}) for b in ("chgnet", "sevenn", "mace", "mattersim")}
    blocks["mace"] = blocks["mace"].model_copy(update={"swa_epochs": min(blocks["mace"].swa_epochs, epochs)})
    return settings.model_copy(update={**blocks, "epochs": float(epochs), "numb_steps": None})


@dataclass
class _Plan:
    """What every (family, N_train) training of one comparison is made of."""

    data: object  # RunData
    backends: list[str]
    sizes: list[int]
    t_max: int
    ranked: list[Frame]
    test: list[Frame]
    rate: list[float]
    base: TrainingSettings
    epochs: int | None

    @property
    def settings(self) -> dict[str, dict]:
        return {b: _family_settings(_training_settings(self.base, b, self.epochs)) for b in self.backends}

    @property
    def out_dir(self) -> Path:
        return Path(self.data.run_dir) / STAGE


def _plan(run_dir, backends, n_train, train_iterations_max, epochs, training) -> _Plan:
    """Check the request and split the run's frames once (entropy-ranked pool, fixed test set)."""
    from cscflow.analysis.report import load_run_data
    from cscflow.runner import RunError
    from cscflow.trainers import BACKENDS

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise RunError(f"unknown backend(s) {', '.join(unknown)}: use {', '.join(BACKENDS)}")
    sizes = sorted({int(n) for n in n_train})
    if not sizes or sizes[0] < 1:
        raise RunError("--n-train needs positive frame counts, e.g. 50,100,200")
    data = load_run_data(run_dir)
    frames = data.all_frames()
    if not frames:
        raise RunError(f"{run_dir}: the run has no labelled frames yet; nothing to compare on")
    spec = data.spec
    t_max = spec.training.train_iterations_max if train_iterations_max is None else train_iterations_max
    sel = spec.selection
    ranked, test = comparison_split(frames, sizes[-1], t_max, spec.seed, sel.entropy_k, sel.entropy_cutoff, sel.bandwidth)
    sizes = [n for n in sizes if n <= len(ranked)] or [len(ranked)]
    rate = entropy_rate(ranked, sizes, sel.entropy_k, sel.entropy_cutoff, sel.bandwidth,
                        spec.convergence.dh_dn_window)
    return _Plan(data=data, backends=list(backends), sizes=sizes, t_max=t_max, ranked=ranked[:sizes[-1]], test=test,
                 rate=rate, base=_with_overrides(spec.training, training), epochs=epochs)


def _train_jobs(plan: _Plan, train_frames, test_frames) -> list[tuple[str, int, object]]:
    """One training job per (family, N_train), (family, N_train, Job); the frames are the plan's
    own (run here) or a job's output references (FireWorks). The checkpoint key names the
    settings and the test set, so a later call with the same request reuses the training."""
    from cscflow.checkpoint import stage_key

    data, spec = plan.data, plan.data.spec
    type_map = list(spec.chemical_system.elements)
    jobs = []
    for backend in plan.backends:
        settings = _training_settings(plan.base, backend, plan.epochs)
        digest = hashlib.sha1(json.dumps([settings.model_dump(mode="json"), [f.frame_id for f in plan.test]],
                                         sort_keys=True).encode()).hexdigest()[:10]
        for n in plan.sizes:
            maker = CompareTrainMaker(settings=settings, type_map=type_map,
                                      work_dir=str(plan.out_dir.resolve() / backend / f"n{n}"))
            j = maker.make(train_frames, test_frames, n_train=n)
            j.name = f"{STAGE} {backend} n{n}"
            j.metadata.update({"run_id": data.run_id, "iteration": -1, "stage": STAGE, "backend": backend, "n_train": n,
                               "cscflow_key": stage_key(data.run_id, -1, f"{STAGE}/{backend}/n{n}/{digest}")})
            j.update_config({"manager_config": spec.dispatch.manager_config(TRAIN_STAGE)})
            jobs.append((backend, n, j))
    return jobs


def untuned_errors(settings: TrainingSettings, test: Sequence[Frame]) -> dict | None:
    """E/F RMSE on the test set of the wheel model a family fine-tunes from (CHGNet, SevenNet),
    the N_train = 0 point of its curve; None for families that start from scratch or a file."""
    from cscflow.config import ForceFieldSettings
    from cscflow.trainers import evaluate_model

    name = getattr(settings, settings.backend).pretrained if settings.backend in ("chgnet", "sevenn") else None
    if name is None or Path(str(name)).expanduser().is_file():
        return None
    key = "chgnet_version" if settings.backend == "chgnet" else "sevenn_model"
    m = evaluate_model(None, test, ForceFieldSettings(backend=settings.backend, **{key: str(name)}))
    return {"model": f"{settings.backend}:{name}", "energy_rmse": m["energy_rmse"], "force_rmse": m["force_rmse"],
            "n_parameters": m["n_parameters"]}


def _finish(rows: Sequence[CompareRow], backends: Sequence[str], sizes: Sequence[int], rate: Sequence[float],
            meta: dict, out_dir: Path, untuned: dict | None = None) -> dict:
    """Fig. 3a, one parity plot per family (its largest training set) and metrics.json."""
    from cscflow.analysis.figures import plot_parity

    by_key = {(r.backend, r.n_train): r for r in rows}
    ordered = [by_key[(b, n)] for b in backends for n in sizes]
    figure, curves = plot_comparison(ordered, sizes, rate, out_dir / "fig3a_mlff_compare.png")
    parity = {}
    for backend in backends:
        row = by_key[(backend, sizes[-1])]
        path, _ = plot_parity(row.energy_ref, row.energy_pred, row.force_ref, row.force_pred,
                              out_dir / f"parity_{backend}.png", title=f"{backend}, N_train = {row.n_train}")
        parity[backend] = str(path)
    result = {
        **meta, "n_train": list(sizes), "dh_dn": list(rate),
        "rows": [r.model_dump(exclude={"energy_ref", "energy_pred", "force_ref", "force_pred"}) for r in ordered],
        "figure": str(figure), "curves": curves, "parity": parity, "untuned": untuned or {},
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _untuned(plan: _Plan, test: Sequence[Frame]) -> dict:
    out = {}
    for backend in plan.backends:
        errors = untuned_errors(_training_settings(plan.base, backend, plan.epochs), test)
        if errors is not None:
            out[backend] = errors
    return out


def _meta(plan: _Plan) -> dict:
    return {"run_id": plan.data.run_id, "train_iterations_max": plan.t_max, "n_test": len(plan.test),
            "test_frame_ids": [f.frame_id for f in plan.test], "settings": plan.settings}


def run_compare(
    run_dir: str | Path,
    backends: Sequence[str] = ("deepmd", "mace", "mattersim"),
    n_train: Sequence[int] = (50, 100, 200),
    train_iterations_max: int | None = None,
    epochs: int | None = None,
    training: dict | None = None,
) -> dict:
    """Train every family on every N_train prefix here, evaluate, draw; returns the metrics dict.

    `training` (see :func:`load_training_overrides`) is laid over the run's training block.
    Trainings already in the run's store (this call's or a submitted workflow's) are reused."""
    from jobflow import run_locally

    from cscflow.checkpoint import find_checkpoint
    from cscflow.stores import build_job_store

    plan = _plan(run_dir, backends, n_train, train_iterations_max, epochs, training)
    data = plan.data
    store = build_job_store(data.spec.store, data.run_dir)
    rows: dict[tuple[str, int], CompareRow] = {}
    store.connect()
    try:
        todo = []
        for backend, n, j in _train_jobs(plan, plan.ranked, plan.test):
            cached = find_checkpoint(store, j.metadata["cscflow_key"])
            if cached is not None and Path(cached.model_path).is_file():
                rows[(backend, n)] = cached
            else:
                todo.append((backend, n, j))
    finally:
        store.close()
    if todo:
        jobs_dir = Path(data.run_dir) / "jobs"
        jobs_dir.mkdir(exist_ok=True)
        responses = run_locally(Flow([j for _, _, j in todo], name=STAGE), store=store, root_dir=jobs_dir,
                                create_folders=True, log=False)
        for backend, n, j in todo:
            response = responses.get(j.uuid, {})
            if not response:
                raise RuntimeError(f"training {backend} on {n} frames failed (see the log above)")
            rows[(backend, n)] = response[max(response)].output
    return _finish(list(rows.values()), plan.backends, plan.sizes, plan.rate, _meta(plan), plan.out_dir,
                   _untuned(plan, plan.test))


class CompareFrames(BaseModel):
    """The comparison's frames, read from the run by a CPU worker: ranked training pool, test set."""

    train: list[Frame]
    test: list[Frame]


@job(data=["train", "test"])
def load_compare_frames(run_dir: str, train_ids: list[str], test_ids: list[str]) -> CompareFrames:
    """The run's frames with these ids, in this order (the split was made at submit time)."""
    from cscflow.analysis.report import load_run_data

    by_id = {f.frame_id: f for f in load_run_data(run_dir).all_frames()}
    missing = [i for i in (*train_ids, *test_ids) if i not in by_id]
    if missing:
        raise ValueError(f"{run_dir}: {len(missing)} frame(s) of the comparison are gone from the run, e.g. {missing[0]}")
    return CompareFrames(train=[by_id[i] for i in train_ids], test=[by_id[i] for i in test_ids])


@job
def compare_report(rows: list[CompareRow], backends: list[str], sizes: list[int], rate: list[float], meta: dict,
                   out_dir: str, untuned: dict | None = None) -> dict:
    """The last job of a submitted comparison: the figures and metrics.json in the run directory."""
    from monty.json import MontyDecoder

    rows = [r if isinstance(r, CompareRow) else CompareRow.model_validate(MontyDecoder().process_decoded(r))
            for r in rows]
    return _finish(rows, backends, sizes, rate, meta, Path(out_dir), untuned)


def compare_flow(
    run_dir: str | Path,
    backends: Sequence[str] = ("deepmd", "mace", "mattersim"),
    n_train: Sequence[int] = (50, 100, 200),
    train_iterations_max: int | None = None,
    epochs: int | None = None,
    training: dict | None = None,
) -> tuple[Flow, _Plan]:
    """The comparison as one jobflow Flow for FireWorks: a CPU job reads the split frames from
    the run, one training job per (family, N_train) in the `train` stage's category (GPU
    workers; they get the frames through the JobStore), a CPU job draws the figures."""
    plan = _plan(run_dir, backends, n_train, train_iterations_max, epochs, training)
    data, spec = plan.data, plan.data.spec
    cpu = spec.dispatch.manager_config(CPU_STAGE)
    loader = load_compare_frames(str(Path(data.run_dir).resolve()), [f.frame_id for f in plan.ranked],
                                 [f.frame_id for f in plan.test])
    loader.name = f"{STAGE} frames"
    loader.metadata.update({"run_id": data.run_id, "iteration": -1, "stage": f"{STAGE}_frames"})
    loader.update_config({"manager_config": cpu})
    jobs = [j for _, _, j in _train_jobs(plan, loader.output.train, loader.output.test)]
    report = compare_report([j.output for j in jobs], plan.backends, plan.sizes, plan.rate, _meta(plan),
                            str(plan.out_dir.resolve()), _untuned(plan, plan.test))
    report.name = f"{STAGE} report"
    report.metadata.update({"run_id": data.run_id, "iteration": -1, "stage": f"{STAGE}_report"})
    report.update_config({"manager_config": cpu})
    return Flow([loader, *jobs, report], name=f"{STAGE} {data.run_id}"), plan


def submit_compare(run_dir: str | Path, launchpad: str | Path | None = None, local: bool = False, **request):
    """`compare-mlff --submit`: the comparison's Flow on a LaunchPad (dispatch.submit_flow);
    returns (Submission, plan). `request`: run_compare's backends, n_train, ... ."""
    from cscflow.dispatch import submit_flow

    flow, plan = compare_flow(run_dir, **request)
    sub = submit_flow(flow, plan.data.spec, plan.data.run_id, plan.data.run_dir, launchpad=launchpad, local=local)
    return sub, plan


def _family_settings(settings: TrainingSettings) -> dict:
    """The settings that say what a family's numbers were measured on (its block; deepmd's are flat)."""
    if settings.backend == "deepmd":
        keys = ("pretrained", "model_branch", "epochs", "numb_steps", "start_lr", "stop_lr", "decay_steps", "rcut",
                "n_dim", "e_dim", "a_dim", "nlayers", "batch_size", "seed")
        return {k: v for k, v in settings.model_dump(mode="json").items() if k in keys}
    return getattr(settings, settings.backend).model_dump(mode="json")


def format_table(result: dict) -> str:
    """The RMSE-vs-N_train table, one line per (family, N_train), dH/dN of the training set at N."""
    rate = dict(zip(result["n_train"], result["dh_dn"]))
    lines = [f"test set: {result['n_test']} frames (iterations > {result['train_iterations_max']} "
             "and the pool frames outside the largest training set)",
             f"{'backend':<10} {'N_train':>7} {'E RMSE meV/atom':>16} {'F RMSE eV/Å':>12} {'dH/dN':>9} "
             f"{'params':>8} {'steps':>6} {'train s':>8}  start"]
    for r in result["rows"]:
        e = "-" if r["energy_rmse"] is None else f"{1000 * r['energy_rmse']:.1f}"
        f = "-" if r["force_rmse"] is None else f"{r['force_rmse']:.3f}"
        d = rate.get(r["n_train"])
        d = "-" if d is None else f"{d:.2e}"
        size = r.get("n_parameters") or "-"
        lines.append(f"{r['backend']:<10} {r['n_train']:>7} {e:>16} {f:>12} {d:>9} {size:>8} {r['numb_steps']:>6} "
                     f"{r['seconds']:>8.1f}  {r['start_from']}")
    for backend, u in result.get("untuned", {}).items():
        lines.append(f"{backend:<10} {0:>7} {1000 * u['energy_rmse']:>16.1f} {u['force_rmse']:>12.3f} {'-':>9} "
                     f"{u['n_parameters'] or '-':>8} {0:>6} {0:>8.1f}  untuned {u['model']}")
    lines.append("steps: optimiser steps (deepmd) or epochs (the others); dH/dN in nats per frame; "
                 "N_train 0: the wheel model before fine-tuning")
    lines.append(f"figure: {result['figure']}")
    return "\n".join(lines)
