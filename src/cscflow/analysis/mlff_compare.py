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
    "CompareRow",
    "CompareTrainMaker",
    "comparison_split",
    "entropy_rate",
    "plot_comparison",
    "run_compare",
]

STAGE = "mlff_compare"


class CompareRow(BaseModel):
    """One family trained on the top-N frames, measured on the fixed test set."""

    backend: str
    n_train: int
    n_test: int
    energy_rmse: float | None = Field(None, description="eV/atom")
    force_rmse: float | None = Field(None, description="eV/Å")
    stress_rmse: float | None = Field(None, description="GPa")
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

    @job
    @resumable
    def make(self, train_frames: list[Frame], test_frames: list[Frame]) -> CompareRow:
        from cscflow.trainers import evaluate_model, get_trainer

        model = get_trainer(self.settings.backend).train(train_frames, self.work_dir, self.settings, self.type_map)
        metrics = evaluate_model(model.model_path, test_frames, predictions=True)
        return CompareRow(
            backend=model.backend, n_train=len(train_frames), n_test=len(test_frames),
            energy_rmse=metrics["energy_rmse"], force_rmse=metrics["force_rmse"],
            stress_rmse=metrics["stress_rmse"], model_path=model.model_path, start_from=model.start_from,
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
                 bandwidth: float = 0.015) -> list[float]:
    """dH/dN (nats per frame) of the ranked set at each size: (H(N) - H(N - Δ)) / Δ, Δ ≈ N/5."""
    from cscflow.entropy import dataset_entropy, stack_descriptors, structure_descriptors

    desc = structure_descriptors([f.structure for f in ranked], k=k, cutoff=cutoff)
    out = []
    for n in sizes:
        delta = max(1, n // 5)
        h = [dataset_entropy(stack_descriptors(desc[:m], k=k), bandwidth=bandwidth) if m > 0 else 0.0
             for m in (n - delta, n)]
        out.append((h[1] - h[0]) / delta)
    return out


def plot_comparison(rows: Sequence[CompareRow], sizes: Sequence[int], dh_dn: Sequence[float],
                    path: str | Path) -> tuple[Path, dict[str, list[int]]]:
    """Fig. 3a: log10 dH/dN, energy RMSE (meV/atom) and force RMSE (meV/Å) vs N_train, one
    line per family; returns the image and the N_train points of each family's curve."""
    plt = pyplot()

    fig, axes = plt.subplots(3, 1, figsize=(5, 8), sharex=True)
    rate = np.asarray(dh_dn, float)
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


def _training_settings(base: TrainingSettings, backend: str, epochs: int | None) -> TrainingSettings:
    """The run's training block with `backend` chosen; `epochs` overrides every family's length."""
    settings = base.model_copy(update={"backend": backend})
    if epochs is None:
        return settings
    blocks = {b: getattr(settings, b).model_copy(update={"epochs": epochs}) for b in ("chgnet", "sevenn", "mace", "mattersim")}
    blocks["mace"] = blocks["mace"].model_copy(update={"swa_epochs": min(blocks["mace"].swa_epochs, epochs)})
    return settings.model_copy(update={**blocks, "epochs": float(epochs), "numb_steps": None})


def run_compare(
    run_dir: str | Path,
    backends: Sequence[str] = ("deepmd", "mace", "mattersim"),
    n_train: Sequence[int] = (50, 100, 200),
    train_iterations_max: int | None = None,
    epochs: int | None = None,
) -> dict:
    """Train every family on every N_train prefix, evaluate, draw; returns the metrics dict."""
    from jobflow import run_locally

    from cscflow.analysis.figures import plot_parity
    from cscflow.analysis.report import load_run_data
    from cscflow.checkpoint import find_checkpoint, stage_key
    from cscflow.runner import RunError
    from cscflow.stores import build_job_store
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
    out_dir = Path(data.run_dir) / STAGE
    type_map = list(spec.chemical_system.elements)

    jobs = []
    for backend in backends:
        settings = _training_settings(spec.training, backend, epochs)
        digest = hashlib.sha1(json.dumps([settings.model_dump(mode="json"), [f.frame_id for f in test]],
                                         sort_keys=True).encode()).hexdigest()[:10]
        for n in sizes:
            maker = CompareTrainMaker(settings=settings, type_map=type_map, work_dir=str(out_dir / backend / f"n{n}"))
            j = maker.make(ranked[:n], test)
            j.name = f"{STAGE} {backend} n{n}"
            j.metadata.update({"run_id": data.run_id, "iteration": -1, "stage": STAGE,
                               "cscflow_key": stage_key(data.run_id, -1, f"{STAGE}/{backend}/n{n}/{digest}")})
            j.update_config({"manager_config": spec.dispatch.manager_config("train")})
            jobs.append((backend, n, j))

    store = build_job_store(spec.store, data.run_dir)
    rows: dict[tuple[str, int], CompareRow] = {}
    store.connect()
    try:
        todo = []
        for backend, n, j in jobs:
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

    ordered = [rows[(b, n)] for b in backends for n in sizes]
    rate = entropy_rate(ranked, sizes, sel.entropy_k, sel.entropy_cutoff, sel.bandwidth)
    figure, curves = plot_comparison(ordered, sizes, rate, out_dir / "fig3a_mlff_compare.png")
    parity = {}
    for backend in backends:
        row = rows[(backend, sizes[-1])]
        path, _ = plot_parity(row.energy_ref, row.energy_pred, row.force_ref, row.force_pred,
                              out_dir / f"parity_{backend}.png", title=f"{backend}, N_train = {row.n_train}")
        parity[backend] = str(path)
    result = {
        "run_id": data.run_id, "train_iterations_max": t_max, "n_test": len(test),
        "test_frame_ids": [f.frame_id for f in test], "n_train": sizes, "dh_dn": rate,
        "rows": [r.model_dump(exclude={"energy_ref", "energy_pred", "force_ref", "force_pred"}) for r in ordered],
        "figure": str(figure), "curves": curves, "parity": parity,
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    """The RMSE-vs-N_train table, one line per (family, N_train)."""
    lines = [f"test set: {result['n_test']} frames (iterations > {result['train_iterations_max']} "
             "and the pool frames outside the largest training set)",
             f"{'backend':<10} {'N_train':>7} {'E RMSE meV/atom':>16} {'F RMSE meV/Å':>13} {'s':>7}  start"]
    for r in result["rows"]:
        e = "-" if r["energy_rmse"] is None else f"{1000 * r['energy_rmse']:.1f}"
        f = "-" if r["force_rmse"] is None else f"{1000 * r['force_rmse']:.1f}"
        lines.append(f"{r['backend']:<10} {r['n_train']:>7} {e:>16} {f:>13} {r['seconds']:>7.1f}  {r['start_from']}")
    lines.append(f"figure: {result['figure']}")
    return "\n".join(lines)
