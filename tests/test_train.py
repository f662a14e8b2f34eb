"""DPA-3 training with deepmd-kit: input, train + freeze + test, continuation, failures.

Real labelled frames (CHGNet on rattled MP structures, see test_datasets) and a tiny
DPA-3; training runs through jobflow so the Maker, @job and the work dir are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cscflow.config import TrainingSettings
from cscflow.train import TrainError, TrainMaker, TrainOutput, estimate_numb_steps, make_input, train_model
from test_datasets import TYPE_MAP, make_labelled_frames

TINY = dict(n_dim=16, e_dim=8, a_dim=8, nlayers=1, decay_steps=5, seed=3)


def _run(maker: TrainMaker, frames, iteration: int, root: Path, previous_model=None) -> TrainOutput:
    from jobflow import run_locally

    job = maker.make(frames, iteration=iteration, previous_model=previous_model)
    responses = run_locally(job, root_dir=root, create_folders=True, ensure_success=True, log=False)
    return responses[job.uuid][1].output


@pytest.fixture(scope="module")
def frames(lips_structures):
    return make_labelled_frames(lips_structures)


@pytest.fixture(scope="module")
def first_model(frames, tmp_path_factory):
    # pool = iterations 0-3 (20 frames, all trained on); iteration 4 (5 frames) is the test set
    settings = TrainingSettings(numb_steps=20, n_train=1000, train_iterations_max=3, **TINY)
    out = _run(TrainMaker(settings=settings, type_map=TYPE_MAP), frames, 0, tmp_path_factory.mktemp("it0"))
    return out


def test_input_follows_paper_schedule_and_passes_argcheck():
    from deepmd.utils.argcheck import normalize

    settings = TrainingSettings()
    config = make_input(settings, TYPE_MAP, ["sys_a", "sys_b"], numb_steps=1234)
    normalize(json.loads(json.dumps(config)))  # deepmd-kit's own schema check
    d = config["model"]["descriptor"]
    assert d["type"] == "dpa3" and d["repflow"]["e_rcut"] == 6.0
    assert config["model"]["type_map"] == TYPE_MAP
    lr = config["learning_rate"]
    assert (lr["type"], lr["start_lr"], lr["stop_lr"], lr["decay_steps"]) == ("exp", 1e-3, 3e-5, 2000)
    loss = config["loss"]
    starts = (loss["start_pref_e"], loss["start_pref_f"], loss["start_pref_v"])
    limits = (loss["limit_pref_e"], loss["limit_pref_f"], loss["limit_pref_v"])
    assert starts == (0.2, 100.0, 0.02) and limits == (20.0, 60.0, 1.0)
    assert config["training"]["numb_steps"] == 1234 and config["training"]["seed"] == 1


def test_numb_steps_from_epochs():
    settings = TrainingSettings(epochs=50)
    # auto batch: 32 atoms per batch -> 8-atom frames batch 4, 32-atom frames batch 1
    assert estimate_numb_steps(settings, [8] * 100) == 50 * 100 // 4
    assert estimate_numb_steps(settings, [32] * 10) == 500
    assert estimate_numb_steps(TrainingSettings(batch_size=2, epochs=2), [5] * 7) == 7
    assert estimate_numb_steps(TrainingSettings(numb_steps=9), [5] * 7) == 9
    with pytest.raises(ValueError, match="no training frames"):
        estimate_numb_steps(settings, [])


def test_backend_none_trains_nothing(frames, tmp_path):
    out = _run(TrainMaker(settings=TrainingSettings(backend="none"), type_map=TYPE_MAP), frames, 0, tmp_path)
    assert out.model_path is None and out.n_train == 0
    assert not list(tmp_path.rglob("input.json"))


def test_tiny_dpa3_trains_freezes_and_loads(first_model, frames):
    from deepmd.calculator import DP
    from pymatgen.io.ase import AseAtomsAdaptor

    out = first_model
    assert out.start_from == "scratch" and out.numb_steps == 20
    assert out.n_train == 20 and out.n_test == 5
    assert set(out.test_frame_ids) == {f.frame_id for f in frames if f.provenance.iteration == 4}
    work = Path(out.work_dir)
    assert work.name == "train_iter0" and work.is_absolute()
    assert Path(out.model_path).is_absolute() and out.model_path.endswith(".pth")
    assert Path(out.checkpoint_path).is_file() and out.checkpoint_path.endswith(".pt")
    assert json.loads((work / "input.json").read_text())["model"]["descriptor"]["type"] == "dpa3"
    assert np.isfinite(out.energy_rmse) and np.isfinite(out.force_rmse)
    assert 0 < out.force_rmse < 20 and 0 <= out.energy_rmse < 10

    test_frame = next(f for f in frames if f.frame_id == out.test_frame_ids[0])
    atoms = AseAtomsAdaptor.get_atoms(test_frame.structure)
    atoms.calc = DP(model=out.model_path)
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    assert np.isfinite(energy) and forces.shape == (len(atoms), 3)
    # the model has learnt at least the energy scale (per-element bias) of the labels
    assert abs(energy - test_frame.energy) / len(atoms) < 2.0


def test_continue_from_previous_model(first_model, frames, tmp_path):
    from deepmd.calculator import DP
    from pymatgen.io.ase import AseAtomsAdaptor

    settings = TrainingSettings(numb_steps=10, n_train=1000, train_iterations_max=3, **TINY)
    out = _run(
        TrainMaker(settings=settings, type_map=TYPE_MAP), frames, 1, tmp_path,
        previous_model=first_model.checkpoint_path,
    )
    assert out.start_from == f"previous:{first_model.checkpoint_path}"
    assert Path(out.work_dir).name == "train_iter1"
    log = (Path(out.work_dir) / "dp.log").read_text()
    assert "--finetune" in log and "Change output bias" in log  # bias refitted on new data
    assert np.isfinite(out.energy_rmse) and np.isfinite(out.force_rmse)
    atoms = AseAtomsAdaptor.get_atoms(frames[-1].structure)
    atoms.calc = DP(model=first_model.model_path)
    e_first = atoms.get_potential_energy()
    atoms.calc = DP(model=out.model_path)
    assert atoms.get_potential_energy() != pytest.approx(e_first, abs=1e-6)


def test_bad_previous_model_is_a_clear_error(frames, tmp_path):
    settings = TrainingSettings(numb_steps=1, **TINY)
    frozen = tmp_path / "model.pth"
    frozen.write_bytes(b"x")
    with pytest.raises(ValueError, match="training checkpoint"):
        train_model(frames[:3], tmp_path / "a", settings, TYPE_MAP, previous_model=frozen)
    with pytest.raises(FileNotFoundError):
        train_model(frames[:3], tmp_path / "b", settings, TYPE_MAP, previous_model=tmp_path / "none.pt")
    with pytest.raises(ValueError, match="type_map is empty"):
        train_model(frames[:3], tmp_path / "c", settings, [])


@pytest.mark.slow
def test_failed_dp_run_raises_with_log_tail(frames, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    settings = TrainingSettings(numb_steps=1, **TINY)
    with pytest.raises(TrainError, match="failed with exit code") as err:
        train_model(frames[:3], tmp_path / "w", settings, TYPE_MAP, previous_model=broken)
    assert "dp.log" in str(err.value) and "Last lines" in str(err.value)


@pytest.mark.slow
def test_more_steps_fit_better(frames, tmp_path):
    """Convergence: training-set force RMSE drops with 10x more steps."""
    from cscflow.train import evaluate_model

    train = [f for f in frames if f.provenance.iteration <= 3]
    rmse = {}
    for steps in (20, 400):
        settings = TrainingSettings(numb_steps=steps, **{**TINY, "decay_steps": max(1, steps // 10)})
        result = train_model(train, tmp_path / f"s{steps}", settings, TYPE_MAP, test_frames=train)
        rmse[steps] = result["force_rmse"]
        assert evaluate_model(result["model_path"], train)["force_rmse"] == pytest.approx(rmse[steps], rel=1e-5)
    assert rmse[400] < rmse[20]


def test_finetuning_a_pretrained_model_absorbs_another_codes_energy_offset(first_model, frames, tmp_path):
    """Energies across codes: labels from a code whose energies sit 3 eV/atom higher are
    absorbed by deepmd-kit's per-element bias change when fine-tuning from a pretrained model
    (the tiny model stands in for DPA-3.1-3M), not by hundreds of gradient steps."""
    from deepmd.calculator import DP
    from pymatgen.io.ase import AseAtomsAdaptor

    shift = 3.0  # eV/atom
    shifted = [f.model_copy(update={"energy": f.energy + shift * len(f.structure)}) for f in frames]
    settings = TrainingSettings(numb_steps=2, n_train=1000, train_iterations_max=3,
                                pretrained=first_model.checkpoint_path, **TINY)
    out = _run(TrainMaker(settings=settings, type_map=TYPE_MAP), shifted, 1, tmp_path)
    assert out.start_from == f"pretrained:{first_model.checkpoint_path}"
    assert "Change output bias" in (Path(out.work_dir) / "dp.log").read_text()
    moved = []
    for f in frames[:5]:
        atoms = AseAtomsAdaptor.get_atoms(f.structure)
        atoms.calc = DP(model=first_model.model_path)
        before = atoms.get_potential_energy()
        atoms.calc = DP(model=out.model_path)
        moved.append((atoms.get_potential_energy() - before) / len(atoms))
    # two optimiser steps alone move energies by far less than 3 eV/atom: the shift is the bias
    assert np.mean(moved) == pytest.approx(shift, abs=0.5), moved


@pytest.mark.slow
def test_deepmd_backend_cycle(frames, tmp_path):
    """The cycle every trainer passes (tests/trainer_checks.py): train, reload through
    forcefields, relax, fine-tune from its own checkpoint, lower training-frame RMSE."""
    from trainer_checks import check_cycle

    first = TrainingSettings(numb_steps=20, n_train=1000, **TINY)
    again = TrainingSettings(numb_steps=300, n_train=1000, **{**TINY, "decay_steps": 30})
    out, _, _, _ = check_cycle("deepmd", first, again, frames, tmp_path)
    assert out.start_from == "scratch"
