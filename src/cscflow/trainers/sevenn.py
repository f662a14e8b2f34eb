"""SevenNet with the ``sevenn`` command: fine-tunes the wheel's 7net-0 offline.

Defaults follow sevenn's ``fine_tune`` preset (Huber loss δ 0.01, Adam lr 0.004 × 0.99
per epoch, force weight 1, stress weight 0.01). A fine-tune takes the architecture of
its checkpoint (the wheel's 7net-0, training.pretrained or the previous run's) from the
checkpoint's own config, so one code path continues any SevenNet model; a model from
scratch uses the small sizes in ``training.sevenn``. ``train_shift_scale`` lets the
per-element energy shift follow labels of another code. The last epoch's checkpoint is
exported; ``SevenNetCalculator`` (and so ``cscflow.forcefields``) loads it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cscflow.config import TrainingSettings
from cscflow.datasets import frames_to_extxyz
from cscflow.forcefields import SEVENN_MODELS, resolve_device
from cscflow.schemas import Frame
from cscflow.trainers.base import TrainedModel, Trainer, TrainError, start_point

__all__ = ["SevenNetTrainer", "make_input"]

logger = logging.getLogger(__name__)

MODEL_FILE = "sevenn_model.pth"


def _checkpoint_file(source: str) -> str:
    if source in SEVENN_MODELS:
        from sevenn.util import pretrained_name_to_path

        return pretrained_name_to_path(source)
    return source


def _model_config(checkpoint: str | None, settings: TrainingSettings, type_map: list[str]) -> dict:
    from sevenn._const import DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG

    s = settings.sevenn
    if checkpoint is None:
        return {
            "chemical_species": list(type_map), "cutoff": s.cutoff, "channel": s.channel, "lmax": s.lmax,
            "num_convolution_layer": s.num_convolution_layer, "is_parity": False,
            "train_shift_scale": True, "train_denominator": False,
        }
    from sevenn.util import load_checkpoint

    try:
        config = load_checkpoint(checkpoint).config
    except Exception as exc:
        raise ValueError(f"{checkpoint} is not a SevenNet checkpoint ({type(exc).__name__}: {exc})") from None
    model = {k: config[k] for k in DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG if k in config}
    model.update(chemical_species="auto", train_shift_scale=True)
    return model


def make_input(settings: TrainingSettings, type_map, train_file: Path, checkpoint: str | None, seed: int,
               device: str) -> dict:
    """The input.yaml of ``sevenn`` (train_v2)."""
    s = settings.sevenn
    train = {
        "random_seed": seed, "is_train_stress": True, "epoch": s.epochs,
        "loss": "Huber", "loss_param": {"delta": 0.01},
        "optimizer": "adam", "optim_param": {"lr": s.learning_rate},
        "scheduler": "exponentiallr", "scheduler_param": {"gamma": s.lr_gamma},
        "force_loss_weight": s.force_loss_weight, "stress_loss_weight": s.stress_loss_weight,
        "per_epoch": s.epochs, "device": device,
        "error_record": [["Energy", "RMSE"], ["Force", "RMSE"], ["Stress", "RMSE"], ["TotalLoss", "None"]],
    }
    if checkpoint is not None:
        train["continue"] = {"checkpoint": checkpoint, "reset_optimizer": True,
                             "reset_scheduler": True, "reset_epoch": True}
    data = {"batch_size": s.batch_size, "data_format_args": {"index": ":"},
            "load_trainset_path": [str(train_file)]}
    if s.validation_fraction > 0:
        data["data_divide_ratio"] = s.validation_fraction
    return {"model": _model_config(checkpoint, settings, type_map), "train": train, "data": data}


class SevenNetTrainer(Trainer):
    name = "sevenn"

    def _train(self, frames: list[Frame], work_dir: Path, settings: TrainingSettings, type_map, previous_model, seed):
        start = start_point(settings, previous_model, settings.sevenn.pretrained)
        checkpoint = None if start.kind == "scratch" else _checkpoint_file(start.source)
        train_file = frames_to_extxyz(frames, work_dir / "train.extxyz")
        config = make_input(settings, type_map, train_file, checkpoint, seed, resolve_device(settings.device))
        (work_dir / "input.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for stale in work_dir.glob("checkpoint_*.pth"):
            stale.unlink()
        exe = shutil.which("sevenn", path=str(Path(sys.executable).parent)) or shutil.which("sevenn")
        if exe is None:
            raise TrainError("the sevenn command is not installed next to this Python (pip install sevenn)")
        log = work_dir / "sevenn.out"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        logger.info("training SevenNet (%s) for %d epochs in %s", start.label, settings.sevenn.epochs, work_dir)
        with open(log, "w") as fh:
            proc = subprocess.run([exe, "input.yaml", "-w", str(work_dir)], cwd=work_dir,
                                  stdout=fh, stderr=subprocess.STDOUT, env=env)
        last = work_dir / f"checkpoint_{settings.sevenn.epochs}.pth"
        if proc.returncode != 0 or not last.is_file():
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise TrainError(f"sevenn failed (exit {proc.returncode}) in {work_dir} (log: {log}). Last lines:\n{tail}")
        out = work_dir / MODEL_FILE
        shutil.copyfile(last, out)
        return TrainedModel(
            backend=self.name, model_path=str(out), checkpoint_path=str(out),
            start_from=start.label, numb_steps=settings.sevenn.epochs, work_dir=str(work_dir),
        )
