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


@pytest.mark.slow  # ~30 s: a tiny foundation model, then a multihead fine-tune from it
def test_mace_multihead_fine_tune_from_a_foundation_file(frames, tmp_path):
    """training.mace.foundation_model + multiheads_finetuning: mace keeps a pt_head on the replay
    data (a plain-keys extxyz, as replay selections are written) and fine-tunes the Default head."""
    import torch

    from cscflow.datasets import frames_to_extxyz
    from cscflow.forcefields import get_calculator
    from cscflow.config import ForceFieldSettings
    from cscflow.trainers import evaluate_model, get_trainer

    trainer = get_trainer("mace")
    # every structure on both sides, so that the foundation's E0s (which the new head keeps) know every element
    found, tune = frames[::2], frames[1::2]
    base = trainer.train(found, tmp_path / "found", TrainingSettings(
        backend="mace", device="cpu", mace={**TINY, "epochs": 2}), ["Li", "P", "S"])
    replay = frames_to_extxyz(found, tmp_path / "replay.extxyz")  # energy/forces/stress in ASE's calculator
    settings = TrainingSettings(backend="mace", device="cpu", mace={
        **TINY, "epochs": 40, "energy_weight": 10.0, "forces_weight": 100.0,
        "foundation_model": base.model_path, "multiheads_finetuning": True,
        "replay_file": str(replay), "num_replay_samples": 12})
    before = evaluate_model(base.model_path, tune)
    out = trainer.train(tune, tmp_path / "ft", settings, ["Li", "P", "S"])
    assert out.start_from == f"pretrained:{base.model_path}"
    args = (Path(out.work_dir) / "mace_args.txt").read_text()
    assert "--multiheads_finetuning=True" in args and "--force_mh_ft_lr=True" in args and "--lr=0.005" in args
    assert "Using heads: ['Default', 'pt_head']" in (Path(out.work_dir) / "mace.out").read_text()
    model = torch.load(out.model_path, map_location="cpu", weights_only=False)
    assert sorted(model.heads) == ["Default", "pt_head"]
    assert get_calculator(ForceFieldSettings(), out.model_path).head == "Default"  # the fine-tuned head
    after = evaluate_model(out.model_path, tune)
    assert after["force_rmse"] < before["force_rmse"] and after["energy_rmse"] < before["energy_rmse"], (before, after)


def test_replay_without_labels_is_one_clear_error(tmp_path):
    from ase.build import bulk
    from ase.io import write

    from cscflow.trainers import TrainError
    from cscflow.trainers.mace import replay_extxyz

    write(tmp_path / "r.extxyz", [bulk("Li")], format="extxyz")
    with pytest.raises(TrainError, match="training.mace.replay_file needs both"):
        replay_extxyz(tmp_path / "r.extxyz", tmp_path / "out.extxyz")
