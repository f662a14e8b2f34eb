"""DPA-3 training / fine-tuning with deepmd-kit (PyTorch backend), run as a subprocess.

Schedule from paper 000 (Methods 4.3): ~50 epochs, lr 1e-3 -> 3e-5 exponential decay
every `decay_steps`, loss prefactors energy:force:virial 0.2:100:0.02 -> 20:60:1, rcut 6 Å.

Where a run starts from (``trainers.base.start_point``, first match wins):

1. ``settings.pretrained`` (e.g. DPA-3.1-3M): ``dp --pt train --finetune PRETRAINED
   [--model-branch BRANCH] --use-pretrain-script``. Every iteration re-fine-tunes the
   foundation model on the whole cumulative training set, as the paper does, so errors
   do not accumulate across iterations.
2. ``previous_model`` (last iteration's checkpoint ``.pt``): also ``--finetune
   --use-pretrain-script`` rather than ``--init-model``. Both load the weights and
   restart the lr schedule, but only fine-tuning refits the per-element energy bias on
   the new training set; new iterations bring new compositions, so the bias the old
   model learnt is stale (``--init-model`` would also keep the old ``sel``/stat).
3. Neither: a DPA-3 from scratch with the sizes in TrainingSettings.

The custom-op library of deepmd-kit is absent in this environment (notes/stack.md, fix
A), so models are trained and frozen without it; the frozen ``.pth`` (TorchScript) loads
in ``deepmd.calculator.DP`` and so in ``cscflow.forcefields``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cscflow.config import TrainingSettings
from cscflow.datasets import flatten_frames, frames_to_deepmd
from cscflow.schemas import Frame
from cscflow.trainers.base import TrainedModel, Trainer, TrainError, start_point

__all__ = ["DeepMDTrainer", "estimate_numb_steps", "make_input", "run_dp"]

logger = logging.getLogger(__name__)

AUTO_BATCH_RULE = 32  # deepmd's "auto": smallest batch with batch * natoms >= 32


# --------------------------------------------------------------------------- input
def estimate_numb_steps(settings: TrainingSettings, natoms: Sequence[int]) -> int:
    """settings.numb_steps, else epochs × N_train / batch (deepmd's auto batch per frame)."""
    if settings.numb_steps is not None:
        return int(settings.numb_steps)
    if not natoms:
        raise ValueError("no training frames: cannot size the training run")
    if settings.batch_size == "auto":
        batch = float(np.mean([math.ceil(AUTO_BATCH_RULE / n) for n in natoms]))
    else:
        batch = float(settings.batch_size)
    return max(1, math.ceil(settings.epochs * len(natoms) / batch))


def make_input(
    settings: TrainingSettings,
    type_map: Sequence[str],
    train_systems: Sequence[str | Path],
    numb_steps: int,
    seed: int | None = None,
    validation_systems: Sequence[str | Path] = (),
) -> dict:
    """deepmd-kit input.json for an energy model with a DPA-3 descriptor (3.2.0 argcheck keys).

    Edges use rcut / rcut_smth with deepmd's polynomial switch; angles use min(4 Å, rcut)
    as in the DPA-3 examples. ``use_dynamic_sel`` makes e_sel/a_sel upper bounds only, so
    no neighbour statistics pass over the data is needed.
    """
    seed = settings.seed if seed is None else seed
    a_rcut = min(4.0, settings.rcut)
    descriptor = {
        "type": "dpa3",
        "repflow": {
            "n_dim": settings.n_dim,
            "e_dim": settings.e_dim,
            "a_dim": settings.a_dim,
            "nlayers": settings.nlayers,
            "e_rcut": settings.rcut,
            "e_rcut_smth": settings.rcut_smth,
            "e_sel": 120,
            "a_rcut": a_rcut,
            "a_rcut_smth": min(settings.rcut_smth, a_rcut / 2),
            "a_sel": 30,
            "axis_neuron": 4,
            "update_angle": True,
            "update_style": "res_residual",
            "update_residual": 0.1,
            "update_residual_init": "const",
            "smooth_edge_update": True,
            "use_dynamic_sel": True,
            "sel_reduce_factor": 10.0,
            "fix_stat_std": 0.3,
        },
        "activation_function": "silu",
        "precision": "float32",
        "concat_output_tebd": False,
        "seed": seed,
    }
    fitting = {
        "neuron": [2 * settings.n_dim] * 3,
        "resnet_dt": True,
        "precision": "float32",
        "activation_function": "silu",
        "seed": seed,
    }
    training = {
        "training_data": {
            "systems": [str(s) for s in train_systems],
            "batch_size": settings.batch_size,
        },
        "numb_steps": int(numb_steps),
        "seed": seed,
        "disp_file": "lcurve.out",
        "disp_freq": max(1, numb_steps // 20),
        "save_freq": max(1, numb_steps),
        "save_ckpt": "model.ckpt",
    }
    if validation_systems:
        training["validation_data"] = {
            "systems": [str(s) for s in validation_systems],
            "batch_size": 1,
            "numb_btch": 1,
        }
    return {
        "model": {
            "type_map": list(type_map),
            "descriptor": descriptor,
            "fitting_net": fitting,
        },
        "learning_rate": {
            "type": "exp",
            "start_lr": settings.start_lr,
            "stop_lr": settings.stop_lr,
            "decay_steps": settings.decay_steps,
        },
        "loss": {
            "type": "ener",
            "start_pref_e": settings.start_pref_e,
            "limit_pref_e": settings.limit_pref_e,
            "start_pref_f": settings.start_pref_f,
            "limit_pref_f": settings.limit_pref_f,
            "start_pref_v": settings.start_pref_v,
            "limit_pref_v": settings.limit_pref_v,
        },
        "training": training,
    }


# --------------------------------------------------------------------------- dp
_DRIVER = """
import json, sys
from deepmd.main import main
job = json.loads(sys.argv[1])
for args in job["commands"]:
    print("$ dp " + " ".join(args), flush=True)
    main(args)
"""


def run_dp(commands: Sequence[Sequence[str]], work_dir: Path, log_name: str = "dp.log") -> Path:
    """Run ``dp --pt ...`` commands in one Python subprocess.

    One subprocess for train + freeze because importing deepmd.pt takes 10-30 s here; a
    subprocess still isolates the loop from crashes and from the memory of the training
    run. The combined log goes to work_dir/log_name; a failure raises TrainError with the
    log's tail.
    """
    log_path = work_dir / log_name
    payload = {"commands": [["--pt", *map(str, args)] for args in commands]}
    cmd = [sys.executable, "-c", _DRIVER, json.dumps(payload)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in log_path.read_text().splitlines() if "Triton not available" not in ln]
        tail = "\n".join(lines[-30:])
        names = ", ".join(c[1] for c in payload["commands"])
        raise TrainError(
            f"deepmd-kit ({names}) failed with exit code {proc.returncode} in {work_dir} "
            f"(full log: {log_path}). Last lines:\n{tail}"
        )
    return log_path


class DeepMDTrainer(Trainer):
    name = "deepmd"

    def _train(self, frames: list[Frame], work_dir: Path, settings: TrainingSettings, type_map, previous_model, seed):
        if previous_model is not None and settings.pretrained is None:
            previous = Path(previous_model)
            if previous.is_file() and previous.suffix != ".pt":
                raise ValueError(
                    f"previous_model must be a training checkpoint (.pt), got {previous.name}: "
                    "pass TrainOutput.checkpoint_path, not the frozen model_path"
                )
        start = start_point(settings, previous_model)
        frames = flatten_frames(frames)
        systems = frames_to_deepmd(frames, work_dir / "data" / "train", type_map)
        numb_steps = estimate_numb_steps(settings, [len(f.structure) for f in frames])
        config = make_input(settings, type_map, systems, numb_steps, seed=seed)
        (work_dir / "input.json").write_text(json.dumps(config, indent=2))

        args = ["train", "input.json", "--skip-neighbor-stat"]
        if start.kind != "scratch":
            args += ["--finetune", start.source, "--use-pretrain-script"]
            if start.kind == "pretrained" and settings.model_branch:
                args += ["--model-branch", settings.model_branch]
        logger.info("training DPA-3 (%s) for %d steps in %s", start.label, numb_steps, work_dir)
        for stale in ("checkpoint", "frozen_model.pth"):  # from an interrupted attempt
            (work_dir / stale).unlink(missing_ok=True)
        run_dp([args, ["freeze", "-c", str(work_dir), "-o", "frozen_model.pth"]], work_dir, "dp.log")

        ckpt_name = (work_dir / "checkpoint").read_text().strip() if (work_dir / "checkpoint").is_file() else ""
        checkpoint = (work_dir / ckpt_name).resolve() if ckpt_name else None
        if checkpoint is None or not checkpoint.is_file():
            raise TrainError(f"dp train finished but left no checkpoint in {work_dir}")
        frozen = work_dir / "frozen_model.pth"
        if not frozen.is_file():
            raise TrainError(f"dp freeze left no frozen_model.pth in {work_dir}")
        return TrainedModel(
            backend=self.name, model_path=str(frozen), checkpoint_path=str(checkpoint),
            start_from=start.label, numb_steps=numb_steps, work_dir=str(work_dir),
        )
