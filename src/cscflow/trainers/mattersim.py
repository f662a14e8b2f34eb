"""MatterSim (M3GNet) fine-tuning with mattersim's own training code, in a subprocess.

The same steps as mattersim's ``training/finetune_mattersim.py`` (``build_dataloader``,
``Potential.from_checkpoint``, ``Potential.train_model`` with a Huber loss δ 0.01), run
by a small driver instead of ``torchrun``: the script cannot set the StepLR factor
(its 0.95 is fixed), and the paper's schedule needs 0.8 every 4 epochs (200 epochs,
lr 1e-3, cutoff 6 Å). Fine-tuning starts from a checkpoint file (training.mattersim.pretrained,
e.g. MatterSim-v1.0.0-5M, or the previous run's); a model from scratch is a random
M3GNet saved as a checkpoint first (notes/stack.md). The last epoch's
checkpoint is exported; ``MatterSimCalculator`` (and so ``cscflow.forcefields``) loads it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from cscflow.config import TrainingSettings
from cscflow.datasets import frames_to_extxyz
from cscflow.forcefields import resolve_device
from cscflow.schemas import Frame
from cscflow.trainers.base import TrainedModel, Trainer, TrainError, start_point

__all__ = ["MatterSimTrainer"]

logger = logging.getLogger(__name__)

MODEL_FILE = "mattersim_model.pth"

_DRIVER = """
import json, random, sys
import numpy as np, torch
from ase.io import read
from ase.units import GPa
from mattersim.datasets.utils.build import build_dataloader
from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
from mattersim.forcefield.m3gnet.scaling import AtomScaling
from mattersim.forcefield.potential import Potential

job = json.loads(sys.argv[1])
random.seed(job["seed"]); np.random.seed(job["seed"]); torch.manual_seed(job["seed"])
dev, kw = job["device"], job["kwargs"]
if job["scratch"]:
    model = M3Gnet(num_blocks=job["num_blocks"], units=job["units"], cutoff=kw["cutoff"],
                   threebody_cutoff=kw["threebody_cutoff"], device=dev)
    Potential(model, device=dev).save(job["init"])
def load(path):
    atoms = read(path, index=":")
    return (atoms, [a.get_potential_energy() for a in atoms], [a.get_forces() for a in atoms],
            [a.get_stress(voigt=False) / GPa for a in atoms])
train = load(job["train"])
loader = build_dataloader(*train, shuffle=True, **kw)
val_loader = build_dataloader(*load(job["valid"]), **kw) if job["valid"] else None
potential = Potential.from_checkpoint(load_path=job["init"], load_training_state=False, device=dev,
                                      lr=job["lr"], step_size=job["step_size"], gamma=job["gamma"])
if job["re_normalize"]:
    scale = AtomScaling(atoms=train[0], total_energy=train[1], forces=train[2], verbose=False,
                        scale_key="per_species_forces_rms", shift_key="per_species_energy_mean_linear_reg",
                        device=dev).to(dev)
    potential.model.set_normalizer(scale)
potential.train_model(loader, val_loader, loss=torch.nn.HuberLoss(delta=0.01), include_energy=True,
                      include_forces=True, include_stresses=True, force_loss_ratio=job["force_loss_ratio"],
                      stress_loss_ratio=job["stress_loss_ratio"], epochs=job["epochs"],
                      early_stop_patience=job["early_stop_patience"], save_checkpoint=True,
                      save_path=job["save_path"], ckpt_interval=job["epochs"], is_distributed=False)
"""


class MatterSimTrainer(Trainer):
    name = "mattersim"

    def _train(self, frames: list[Frame], work_dir: Path, settings: TrainingSettings, type_map, previous_model, seed):
        import numpy as np

        m = settings.mattersim
        start = start_point(previous_model, settings.mattersim.pretrained)
        order = np.random.default_rng(seed).permutation(len(frames))
        n_val = int(round(m.validation_fraction * len(frames))) if len(frames) > 1 else 0
        train_file = frames_to_extxyz([frames[i] for i in order[n_val:]], work_dir / "train.extxyz")
        valid_file = frames_to_extxyz([frames[i] for i in order[:n_val]], work_dir / "valid.extxyz") if n_val else None
        scratch = start.kind == "scratch"
        save_path = work_dir / "results"
        for stale in save_path.glob("*.pth") if save_path.is_dir() else ():
            stale.unlink()
        job = {
            "seed": seed, "device": resolve_device(settings.device), "scratch": scratch,
            "init": str(work_dir / "init_model.pth") if scratch else start.source,
            "train": str(train_file), "valid": str(valid_file) if valid_file else None,
            "kwargs": {"cutoff": m.cutoff, "threebody_cutoff": m.threebody_cutoff, "batch_size": m.batch_size},
            "num_blocks": m.num_blocks, "units": m.units, "lr": m.lr, "step_size": m.step_size, "gamma": m.lr_gamma,
            "re_normalize": scratch if m.re_normalize is None else m.re_normalize,
            "force_loss_ratio": m.force_loss_ratio, "stress_loss_ratio": m.stress_loss_ratio,
            "epochs": m.epochs, "early_stop_patience": m.early_stop_patience, "save_path": str(save_path),
        }
        (work_dir / "mattersim_job.json").write_text(json.dumps(job, indent=2))
        log = work_dir / "mattersim.out"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled"}
        logger.info("training MatterSim (%s) for %d epochs in %s", start.label, m.epochs, work_dir)
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(job)], cwd=work_dir,
                                  stdout=fh, stderr=subprocess.STDOUT, env=env)
        last = save_path / "last_model.pth"
        if proc.returncode != 0 or not last.is_file():
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise TrainError(f"MatterSim training failed (exit {proc.returncode}) in {work_dir} (log: {log}). "
                             f"Last lines:\n{tail}")
        out = work_dir / MODEL_FILE
        out.write_bytes(last.read_bytes())
        return TrainedModel(
            backend=self.name, model_path=str(out), checkpoint_path=str(out),
            start_from=start.label, numb_steps=m.epochs, work_dir=str(work_dir),
        )
