"""SevenNet trainer: the backend cycle on a tiny model, and a real transfer from the
wheel's 7net-0 to labels of a different model (CHGNet 0.3.0, the test frames' labeller)."""

from __future__ import annotations

import pytest

from cscflow.config import ForceFieldSettings, TrainingSettings
from cscflow.train import train_model
from cscflow.trainers import evaluate_model
from test_datasets import TYPE_MAP, make_labelled_frames
from trainer_checks import check_cycle

TINY = {"pretrained": None, "channel": 8, "lmax": 1, "num_convolution_layer": 2, "batch_size": 4,
        "validation_fraction": 0.0, "learning_rate": 0.01}


@pytest.fixture(scope="module")
def frames(lips_structures):
    return make_labelled_frames(lips_structures)


def test_sevenn_scratch_cycle(frames, tmp_path):
    first = TrainingSettings(backend="sevenn", n_train=1000, device="cpu", sevenn={**TINY, "epochs": 2})
    again = first.model_copy(update={"sevenn": first.sevenn.model_copy(update={"epochs": 10})})
    out, _, _, _ = check_cycle("sevenn", first, again, frames, tmp_path)
    assert out.start_from == "scratch" and out.numb_steps == 2


@pytest.mark.slow
def test_sevenn_finetune_from_wheel_transfers_to_another_models_labels(frames, tmp_path):
    """CHGNet labels: 7net-0 fine-tuned on iterations 0-3 fits the held-out iteration-4
    frames better than the wheel's 7net-0 does."""
    train = [f for f in frames if f.provenance.iteration <= 3]
    held_out = [f for f in frames if f.provenance.iteration == 4]
    settings = TrainingSettings(backend="sevenn", device="cpu",
                                sevenn={"epochs": 4, "batch_size": 4, "validation_fraction": 0.0})
    result = train_model(train, tmp_path / "ft", settings, TYPE_MAP, test_frames=held_out)
    assert result["start_from"] == "pretrained:7net-0"
    before = evaluate_model(None, held_out, ForceFieldSettings(backend="sevenn"))
    assert result["force_rmse"] < before["force_rmse"], (before, result)
    assert result["energy_rmse"] < before["energy_rmse"], (before, result)
