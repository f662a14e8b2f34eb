"""CHGNet trainer: the backend cycle on a tiny model, and a real transfer from the wheel's
pretrained 0.3.0 to labels of a different model (SevenNet 7net-0)."""

from __future__ import annotations

import pytest

from cscflow.config import ForceFieldSettings, TrainingSettings
from cscflow.forcefields import get_calculator, single_points
from cscflow.train import train_model
from cscflow.trainers import evaluate_model
from test_datasets import TYPE_MAP, make_labelled_frames
from trainer_checks import check_cycle

TINY = {"atom_fea_dim": 16, "bond_fea_dim": 16, "angle_fea_dim": 16, "num_radial": 7, "num_angular": 7,
        "n_conv": 2, "atom_conv_hidden_dim": 16, "bond_conv_hidden_dim": 16, "mlp_hidden_dims": [16, 16]}


@pytest.fixture(scope="module")
def frames(lips_structures):
    return make_labelled_frames(lips_structures)


def relabel(frames, forcefield: ForceFieldSettings, labeller: str):
    results = single_points([f.structure for f in frames], get_calculator(forcefield))
    return [
        f.model_copy(update={"energy": r["energy"], "forces": r["forces"].tolist(),
                             "stress": r["stress"].tolist(), "labeller": labeller})
        for f, r in zip(frames, results, strict=True)
    ]


def test_chgnet_scratch_cycle(frames, tmp_path):
    first = TrainingSettings(backend="chgnet", n_train=1000, device="cpu",
                             chgnet={"pretrained": None, "epochs": 2, "batch_size": 4, "model_args": TINY})
    again = first.model_copy(update={"chgnet": first.chgnet.model_copy(update={"epochs": 12})})
    out, again_out, _, _ = check_cycle("chgnet", first, again, frames, tmp_path)
    assert out.start_from == "scratch" and out.numb_steps == 2


def test_chgnet_finetune_from_wheel_transfers_to_another_models_labels(frames, tmp_path):
    """SevenNet 7net-0 labels: CHGNet 0.3.0 fine-tuned on iterations 0-3 fits the held-out
    iteration-4 frames better than the pretrained model does (not a re-fit of itself)."""
    teacher = relabel(frames, ForceFieldSettings(backend="sevenn"), "teacher:sevenn-7net-0")
    train = [f for f in teacher if f.provenance.iteration <= 3]
    held_out = [f for f in teacher if f.provenance.iteration == 4]
    settings = TrainingSettings(backend="chgnet", device="cpu",
                                chgnet={"epochs": 8, "batch_size": 4, "learning_rate": 3e-4,
                                        "validation_fraction": 0.0})
    result = train_model(train, tmp_path / "ft", settings, TYPE_MAP, test_frames=held_out)
    assert result["start_from"] == "pretrained:0.3.0"
    before = evaluate_model(None, held_out, ForceFieldSettings())  # the wheel's CHGNet 0.3.0
    assert result["force_rmse"] < before["force_rmse"], (before, result)
    assert result["energy_rmse"] < before["energy_rmse"], (before, result)
    assert result["stress_rmse"] < before["stress_rmse"], (before, result)  # stress units/sign


def test_chgnet_last_layers_fine_tune_keeps_lower_layers(frames, tmp_path):
    """trainable: last_layers moves only the last atom convolution and the readout."""
    import torch
    from chgnet.model import CHGNet

    settings = TrainingSettings(backend="chgnet", device="cpu",
                                chgnet={"epochs": 1, "batch_size": 4, "learning_rate": 1e-3,
                                        "criterion": "Huber", "trainable": "last_layers",
                                        "validation_fraction": 0.0})
    result = train_model(frames[:8], tmp_path / "ft", settings, TYPE_MAP)
    tuned = CHGNet.from_file(result["model_path"]).state_dict()
    wheel = CHGNet.load(model_name="0.3.0", verbose=False).state_dict()
    n_conv = 1 + max(int(k.split(".")[1]) for k in wheel if k.startswith("atom_conv_layers."))
    frozen = [k for k in wheel if k.startswith(("atom_embedding", "bond_embedding", "angle_embedding",
                                                "bond_conv_layers", "angle_layers", "atom_conv_layers.0."))]
    moved = [k for k in wheel if k.startswith(("mlp.", f"atom_conv_layers.{n_conv - 1}."))]
    assert frozen and moved
    assert all(torch.equal(tuned[k], wheel[k]) for k in frozen)
    assert any(not torch.equal(tuned[k], wheel[k]) for k in moved)
