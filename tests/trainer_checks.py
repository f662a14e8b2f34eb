"""The cycle every trainer backend must pass (used by tests/test_trainers_*.py).

Train on teacher-labelled frames of real Li-P-S structures through the Train stage,
reload the exported model through cscflow.forcefields, relax one structure with it,
fine-tune again from its own checkpoint and check the error on the training frames fell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cscflow.config import ForceFieldSettings, RelaxSettings, TrainingSettings
from cscflow.forcefields import get_calculator, model_backend, model_tag
from cscflow.train import TrainMaker, TrainOutput
from cscflow.trainers import evaluate_model


def run_train(settings: TrainingSettings, frames, iteration: int, root: Path, previous_model=None) -> TrainOutput:
    from jobflow import run_locally

    maker = TrainMaker(settings=settings, type_map=["Li", "P", "S"])
    job = maker.make(frames, iteration=iteration, previous_model=previous_model)
    responses = run_locally(job, root_dir=root, create_folders=True, ensure_success=True, log=False)
    return responses[job.uuid][1].output


def relax_one(model_path: str, structure) -> object:
    from cscflow.relax import relax_candidates
    from cscflow.schemas import Candidate, Provenance

    calc = get_calculator(ForceFieldSettings(), model_path)
    tag = model_tag(ForceFieldSettings(), model_path)
    cand = Candidate(provenance=Provenance(candidate_id="t-0", iteration=0, generator="seed"), structure=structure)
    return relax_candidates([cand], calc, RelaxSettings(steps=15), tag, progress=False)[0]


def check_cycle(backend: str, first: TrainingSettings, again: TrainingSettings, frames, tmp_path: Path):
    """Returns (first TrainOutput, fine-tuned TrainOutput, rmse before, rmse after)."""
    train = [f for f in frames if f.provenance.iteration <= 3]
    out = run_train(first, frames, 0, tmp_path / "a")
    assert out.backend == backend and out.n_train == len(train) and out.n_test == len(frames) - len(train)
    assert Path(out.model_path).is_file() and Path(out.checkpoint_path).is_file()
    assert model_backend(out.model_path) == backend
    assert model_tag(ForceFieldSettings(), out.model_path).startswith(f"{backend}:")
    assert np.isfinite(out.energy_rmse) and np.isfinite(out.force_rmse)

    relaxed = relax_one(out.model_path, train[-1].structure)
    assert relaxed.status == "relaxed", relaxed.reject_reason
    assert np.isfinite(relaxed.energy) and relaxed.model.startswith(f"{backend}:")

    before = evaluate_model(out.model_path, train)
    again_out = run_train(again, frames, 1, tmp_path / "b", previous_model=out.checkpoint_path)
    assert again_out.start_from == f"previous:{out.checkpoint_path}"
    after = evaluate_model(again_out.model_path, train)
    assert after["force_rmse"] < before["force_rmse"], (before, after)
    assert after["energy_rmse"] < before["energy_rmse"], (before, after)
    return out, again_out, before, after
