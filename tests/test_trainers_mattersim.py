"""MatterSim trainer: the backend cycle on a tiny M3GNet from scratch, then a fine-tune
from its own checkpoint (the path a MatterSim-5M checkpoint takes)."""

from __future__ import annotations

import pytest

from cscflow.config import TrainingSettings
from test_datasets import make_labelled_frames
from trainer_checks import check_cycle

pytest.importorskip("mattersim")

TINY = {"num_blocks": 2, "units": 16, "batch_size": 4, "lr": 2e-3, "validation_fraction": 0.0}


@pytest.fixture(scope="module")
def frames(lips_structures):
    return make_labelled_frames(lips_structures)


@pytest.mark.slow
def test_mattersim_scratch_cycle(frames, tmp_path):
    first = TrainingSettings(backend="mattersim", n_train=1000, device="cpu", mattersim={**TINY, "epochs": 2})
    again = first.model_copy(update={"mattersim": first.mattersim.model_copy(update={"epochs": 20})})
    out, _, _, _ = check_cycle("mattersim", first, again, frames, tmp_path)
    assert out.start_from == "scratch"
