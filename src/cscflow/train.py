"""DPA-3 training / fine-tuning with deepmd-kit (PyTorch backend), run as a subprocess.

Schedule from paper 000 (Methods 4.3): ~50 epochs, lr 1e-3 -> 3e-5 exponential decay
every `decay_steps`, loss prefactors energy:force:virial 0.2:100:0.02 -> 20:60:1, rcut 6 Å.

Where a run starts from (first match wins):

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
A), so models are trained and frozen without it; the frozen ``.pth`` loads in
``deepmd.calculator.DP`` and ``deepmd.infer.DeepPot``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel, Field

from cscflow.checkpoint import resumable
from cscflow.config import TrainingSettings
from cscflow.datasets import flatten_frames, frames_to_deepmd, frames_to_extxyz, split_frames
from cscflow.schemas import Frame

__all__ = [
    "TrainError",
    "TrainMaker",
    "TrainOutput",
    "estimate_numb_steps",
    "evaluate_extxyz",
    "evaluate_model",
    "make_input",
    "run_dp",
    "train_model",
]

logger = logging.getLogger(__name__)

AUTO_BATCH_RULE = 32  # deepmd's "auto": smallest batch with batch * natoms >= 32


class TrainError(RuntimeError):
    """deepmd-kit failed; the message carries the tail of its log."""


class TrainOutput(BaseModel):
    """What one Train stage produced; paths are absolute."""

    model_path: str | None = Field(None, description="frozen model (.pth) for deepmd.calculator.DP")
    checkpoint_path: str | None = Field(None, description="training checkpoint (.pt) to continue from")
    energy_rmse: float | None = Field(None, description="eV/atom on the test frames")
    force_rmse: float | None = Field(None, description="eV/Å on the test frames")
    n_train: int = 0
    n_test: int = 0
    train_frame_ids: list[str] = Field(default_factory=list)
    test_frame_ids: list[str] = Field(default_factory=list)
    numb_steps: int = 0
    start_from: str = Field("none", description="scratch | pretrained:<file> | previous:<file> | none")
    work_dir: str | None = None
    seconds: float = 0.0


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
if job.get("evaluate"):
    from cscflow.train import evaluate_extxyz
    metrics = evaluate_extxyz(job["evaluate"]["model"], job["evaluate"]["frames"])
    print("test metrics:", metrics, flush=True)
    with open(job["evaluate"]["output"], "w") as fh:
        json.dump(metrics, fh)
"""


def run_dp(
    commands: Sequence[Sequence[str]],
    work_dir: Path,
    log_name: str = "dp.log",
    evaluate: dict | None = None,
) -> Path:
    """Run ``dp --pt ...`` commands (then an optional test) in one Python subprocess.

    One subprocess for train + freeze + test because importing deepmd.pt takes 10-30 s
    here; a subprocess still isolates the loop from crashes and from the memory of the
    training run. `evaluate` = {"model", "frames" (extxyz), "output" (json)}. The combined
    log goes to work_dir/log_name; a failure raises TrainError with the log's tail.
    """
    log_path = work_dir / log_name
    payload = {"commands": [["--pt", *map(str, args)] for args in commands], "evaluate": evaluate}
    cmd = [sys.executable, "-c", _DRIVER, json.dumps(payload)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in log_path.read_text().splitlines() if "Triton not available" not in ln]
        tail = "\n".join(lines[-30:])
        names = ", ".join(c[1] for c in payload["commands"]) + (", test" if evaluate else "")
        raise TrainError(
            f"deepmd-kit ({names}) failed with exit code {proc.returncode} in {work_dir} "
            f"(full log: {log_path}). Last lines:\n{tail}"
        )
    return log_path


def _rmse(pot, items) -> dict:
    """items: (symbols, positions, cell, energy, forces) tuples; one DeepPot call each."""
    index = {el: i for i, el in enumerate(pot.get_type_map())}
    de, df = [], []
    for name, symbols, positions, cell, energy, forces in items:
        try:
            types = [index[s] for s in symbols]
        except KeyError as err:
            raise ValueError(f"frame {name}: element {err} not in the model's type map") from None
        e, f, _ = pot.eval(np.reshape(positions, (1, -1)), np.reshape(cell, (1, -1)), types)
        de.append((float(np.ravel(e)[0]) - energy) / len(symbols))
        df.append((np.reshape(f, (-1, 3)) - np.asarray(forces)).ravel())
    if not de:
        return {"energy_rmse": None, "force_rmse": None, "n": 0}
    return {
        "energy_rmse": float(np.sqrt(np.mean(np.square(de)))),
        "force_rmse": float(np.sqrt(np.mean(np.square(np.concatenate(df))))),
        "n": len(de),
    }


def evaluate_model(model_path: str | Path, frames: Sequence[Frame]) -> dict:
    """Energy RMSE (eV/atom) and force RMSE (eV/Å) of a frozen model on labelled frames."""
    from deepmd.infer import DeepPot

    frames = flatten_frames(frames)
    if not frames:
        return {"energy_rmse": None, "force_rmse": None, "n": 0}
    items = [
        (
            f.frame_id,
            [site.specie.symbol for site in f.structure],
            f.structure.cart_coords,
            f.structure.lattice.matrix,
            f.energy,
            f.forces,
        )
        for f in frames
    ]
    return _rmse(DeepPot(str(model_path)), items)


def evaluate_extxyz(model_path: str | Path, path: str | Path) -> dict:
    """:func:`evaluate_model` on frames written by ``datasets.frames_to_extxyz``."""
    from deepmd.infer import DeepPot

    from cscflow.datasets import read_extxyz_frames

    items = [
        (
            d["frame_id"],
            d["atoms"].get_chemical_symbols(),
            d["atoms"].get_positions(),
            np.asarray(d["atoms"].get_cell()),
            d["energy"],
            d["forces"],
        )
        for d in read_extxyz_frames(path)
    ]
    return _rmse(DeepPot(str(model_path)), items)


def train_model(
    train_frames: Sequence[Frame],
    work_dir: str | Path,
    settings: TrainingSettings,
    type_map: Sequence[str],
    previous_model: str | Path | None = None,
    seed: int | None = None,
    test_frames: Sequence[Frame] = (),
) -> dict:
    """Write data + input.json, train, freeze, test; returns paths, metrics, numb_steps, start_from."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    train_frames = flatten_frames(train_frames)
    systems = frames_to_deepmd(train_frames, work_dir / "data" / "train", type_map)
    numb_steps = estimate_numb_steps(settings, [len(f.structure) for f in train_frames])
    config = make_input(settings, type_map, systems, numb_steps, seed=seed)
    (work_dir / "input.json").write_text(json.dumps(config, indent=2))

    args = ["train", "input.json", "--skip-neighbor-stat"]
    if settings.pretrained is not None:
        args += ["--finetune", str(settings.pretrained), "--use-pretrain-script"]
        if settings.model_branch:
            args += ["--model-branch", settings.model_branch]
        start_from = f"pretrained:{settings.pretrained}"
    elif previous_model is not None:
        previous = Path(previous_model).expanduser().resolve()
        if not previous.is_file():
            raise FileNotFoundError(f"previous_model {previous} does not exist")
        if previous.suffix != ".pt":
            raise ValueError(
                f"previous_model must be a training checkpoint (.pt), got {previous.name}: "
                "pass TrainOutput.checkpoint_path, not the frozen model_path"
            )
        args += ["--finetune", str(previous), "--use-pretrain-script"]
        start_from = f"previous:{previous}"
    else:
        start_from = "scratch"
    logger.info("training DPA-3 (%s) for %d steps in %s", start_from, numb_steps, work_dir)
    for stale in ("checkpoint", "frozen_model.pth", "test_metrics.json"):  # from an interrupted attempt
        (work_dir / stale).unlink(missing_ok=True)
    test_frames = flatten_frames(test_frames)
    evaluate = None
    if test_frames:
        frames_to_extxyz(test_frames, work_dir / "data" / "test.extxyz")
        evaluate = {
            "model": str(work_dir / "frozen_model.pth"),
            "frames": str(work_dir / "data" / "test.extxyz"),
            "output": str(work_dir / "test_metrics.json"),
        }
    run_dp([args, ["freeze", "-c", str(work_dir), "-o", "frozen_model.pth"]], work_dir, "dp.log", evaluate)

    ckpt_name = (work_dir / "checkpoint").read_text().strip() if (work_dir / "checkpoint").is_file() else ""
    checkpoint = (work_dir / ckpt_name).resolve() if ckpt_name else None
    if checkpoint is None or not checkpoint.is_file():
        raise TrainError(f"dp train finished but left no checkpoint in {work_dir}")
    frozen = work_dir / "frozen_model.pth"
    if not frozen.is_file():
        raise TrainError(f"dp freeze left no frozen_model.pth in {work_dir}")
    metrics = {"energy_rmse": None, "force_rmse": None}
    if evaluate:
        metrics = json.loads((work_dir / "test_metrics.json").read_text())
    return {
        "energy_rmse": metrics["energy_rmse"],
        "force_rmse": metrics["force_rmse"],
        "model_path": str(frozen),
        "checkpoint_path": str(checkpoint),
        "numb_steps": numb_steps,
        "start_from": start_from,
        "work_dir": str(work_dir),
    }


# --------------------------------------------------------------------------- Maker
@dataclass
class TrainMaker(Maker):
    """Split the labelled frames (top-δH train, rest test), train DPA-3, freeze, test."""

    name: str = "train"
    settings: TrainingSettings = field(default_factory=TrainingSettings)
    type_map: list[str] = field(default_factory=list)
    # QUESTS descriptor settings for the δH ranking (SelectionSettings has the same names)
    entropy_k: int = 32
    entropy_cutoff: float = 5.0
    bandwidth: float = 0.015

    @job
    @resumable
    def make(
        self,
        frames: list[Frame] | list[list[Frame]],
        iteration: int,
        previous_model: str | None = None,
    ) -> TrainOutput:
        start = time.perf_counter()
        if self.settings.backend == "none":
            return TrainOutput(start_from="none", seconds=time.perf_counter() - start)
        if not self.type_map:
            raise ValueError("TrainMaker.type_map is empty: pass the chemical system's elements")
        split = split_frames(
            frames,
            n_train=self.settings.n_train,
            train_iterations_max=self.settings.train_iterations_max,
            test_fraction=self.settings.test_fraction,
            seed=self.settings.seed,  # one seed for every iteration: the holdout stays put
            k=self.entropy_k,
            cutoff=self.entropy_cutoff,
            bandwidth=self.bandwidth,
        )
        work_dir = Path.cwd() / f"train_iter{iteration}"
        result = train_model(
            split.train,
            work_dir,
            self.settings,
            self.type_map,
            previous_model=previous_model,
            seed=self.settings.seed + iteration,
            test_frames=split.test,
        )
        return TrainOutput(
            **result,
            n_train=len(split.train),
            n_test=len(split.test),
            train_frame_ids=split.train_ids,
            test_frame_ids=split.test_ids,
            seconds=time.perf_counter() - start,
        )
