"""MACE trainer (mace_run_train): the backend cycle on a tiny model from scratch, then a
fine-tune from its own exported model as --foundation_model."""

from __future__ import annotations

from pathlib import Path

import pytest

from cscflow.config import TrainingSettings
from test_datasets import make_labelled_frames
from trainer_checks import check_cycle

pytest.importorskip("mace")

# MACE keeps the best-validation epoch: with 20 frames a 5-frame validation set and an
# energy-heavy loss keep that choice from trading the energies away for the forces.
TINY = {"num_channels": 8, "max_L": 0, "num_interactions": 2, "correlation": 2, "batch_size": 4,
        "swa_epochs": 0, "lr": 0.005, "energy_weight": 100.0, "forces_weight": 10.0, "ema_decay": 0.9,
        "validation_fraction": 0.25, "default_dtype": "float32"}


@pytest.fixture(scope="module")
def frames(lips_structures):
    return make_labelled_frames(lips_structures)


def test_mace_paper_schedule_in_args(tmp_path):
    from cscflow.trainers.mace import make_args

    args = make_args(TrainingSettings(backend="mace"), tmp_path / "t.extxyz", None, 1, "cpu")
    for flag in ("--max_num_epochs=500", "--ema", "--lr=0.01", "--lr_factor=0.8", "--scheduler_patience=20",
                 "--swa", "--start_swa=400", "--swa_lr=0.001", "--valid_fraction=0.05", "--r_max=5.0"):
        assert flag in args, flag


@pytest.mark.slow  # ~75 s: two mace_run_train processes
def test_mace_scratch_cycle(frames, tmp_path):
    first = TrainingSettings(backend="mace", n_train=1000, device="cpu", mace={**TINY, "epochs": 2})
    again = first.model_copy(update={"mace": first.mace.model_copy(update={"epochs": 40})})
    out, again_out, _, _ = check_cycle("mace", first, again, frames, tmp_path)
    assert out.start_from == "scratch"
    assert f"--foundation_model={out.model_path}" in (Path(again_out.work_dir) / "mace_args.txt").read_text()
