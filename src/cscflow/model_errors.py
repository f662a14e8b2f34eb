"""Errors of every model of a run on ONE fixed test set: does the student improve?

The status table's RMSEs are each iteration's own test split, which grows as frames are
added. Here every model is measured on the same frames: the test frames of the last
Train's split (frames never trained on by that model; earlier models may have trained on
a few of them only if they were in an earlier training set, which the rows say). Rows: the
untuned starting force field (``forcefield``, e.g. CHGNet from its wheel), then the model
trained in each iteration. One evaluation code for all (``trainers.base.evaluate_model``).

    cscflow model-errors RUN_DIR      (or: python -m cscflow.model_errors RUN_DIR)
"""

from __future__ import annotations

import sys

from pydantic import BaseModel

from cscflow.schemas import field_of

__all__ = ["ModelErrors", "fixed_test_errors", "format_errors"]


class ModelErrors(BaseModel):
    model: str
    iteration: int | None = None
    n_test: int = 0
    n_trained_on_test: int = 0
    energy_rmse: float | None = None
    force_rmse: float | None = None




def fixed_test_errors(run_dir) -> list[ModelErrors]:
    """Untuned force field + every iteration's trained model on the last split's test frames;
    `run_dir` is a run directory or its already loaded ``RunData``."""
    from cscflow.analysis.run_data import RunData, load_run_data
    from cscflow.forcefields import model_tag
    from cscflow.trainers.base import evaluate_model

    data = run_dir if isinstance(run_dir, RunData) else load_run_data(run_dir)
    run_dir = data.run_dir
    trains = {k: data.output(k, "train") for k in data.iterations if data.output(k, "train") is not None}
    trains = {k: t for k, t in trains.items() if field_of(t, "model_path")}
    if not trains:
        from cscflow.runner import RunError

        raise RunError(f"{run_dir}: no trained model yet")
    last = trains[max(trains)]
    test_ids = set(field_of(last, "test_frame_ids", []))
    test = [f for f in data.all_frames() if f.frame_id in test_ids]
    rows = []
    base = evaluate_model(None, test, data.spec.forcefield)
    rows.append(ModelErrors(model=f"untuned {model_tag(data.spec.forcefield)}", n_test=len(test),
                            energy_rmse=base["energy_rmse"], force_rmse=base["force_rmse"]))
    for k, t in sorted(trains.items()):
        m = evaluate_model(field_of(t, "model_path"), test, data.spec.forcefield)
        overlap = len(test_ids & set(field_of(t, "train_frame_ids", [])))
        rows.append(ModelErrors(model=f"{field_of(t, 'backend', 'model')} it{k}", iteration=k, n_test=len(test),
                                n_trained_on_test=overlap, energy_rmse=m["energy_rmse"], force_rmse=m["force_rmse"]))
    return rows


def format_errors(rows: list[ModelErrors]) -> str:
    head = f"{'model':<28} {'E RMSE (meV/atom)':>18} {'F RMSE (eV/Å)':>14} {'test frames':>11} {'trained on':>10}"
    lines = [head]
    for r in rows:
        e = "-" if r.energy_rmse is None else f"{1000 * r.energy_rmse:.1f}"
        f = "-" if r.force_rmse is None else f"{r.force_rmse:.3f}"
        lines.append(f"{r.model:<28} {e:>18} {f:>14} {r.n_test:>11} {r.n_trained_on_test:>10}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_errors(fixed_test_errors(sys.argv[1])))
