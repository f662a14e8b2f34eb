"""What every MLFF trainer provides, and the one evaluation shared by all of them.

A trainer (one module per family in this package) turns labelled frames into a model
file that ``cscflow.forcefields`` loads: ``get_calculator(ForceFieldSettings(), path)``
reads the family from the file. Where it starts from is decided here, the same way for
every family (:func:`start_point`). Errors are measured by :func:`evaluate_model`, the
same ASE single points (``forcefields.single_points``) whatever trained the model, so
numbers of different families compare.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, Field

from cscflow.config import ForceFieldSettings, TrainingSettings
from cscflow.schemas import Frame

__all__ = [
    "StartPoint",
    "TrainError",
    "TrainedModel",
    "Trainer",
    "count_parameters",
    "evaluate_model",
    "start_point",
]


class TrainError(RuntimeError):
    """A training backend failed; the message carries the tail of its log."""


class TrainedModel(BaseModel):
    """One trainer run: the exported model, the checkpoint to continue from, how it started."""

    backend: str
    model_path: str = Field(..., description="file cscflow.forcefields loads (absolute)")
    checkpoint_path: str = Field(..., description="file a later run fine-tunes from (absolute)")
    start_from: str = Field(..., description="scratch | pretrained:<name or file> | previous:<file>")
    numb_steps: int = Field(0, description="optimiser steps (deepmd) or epochs (the others)")
    work_dir: str
    seconds: float = 0.0


class StartPoint(BaseModel):
    """Where a run starts: kind in scratch | pretrained | previous; source a file or wheel name."""

    kind: str
    source: str | None = None

    @property
    def label(self) -> str:
        return self.kind if self.source is None else f"{self.kind}:{self.source}"


def start_point(previous_model: str | Path | None, foundation: str | Path | None = None) -> StartPoint:
    """First match wins: the family's foundation model (a file or a wheel's model name) >
    previous_model > scratch.

    A foundation model (file or wheel) is re-fine-tuned every iteration on the cumulative
    training set, as the paper does, so errors do not pile up across iterations;
    previous_model (last iteration's checkpoint) is used only without one.
    """
    if foundation is not None:
        return StartPoint(kind="pretrained", source=str(foundation))
    if previous_model is not None:
        previous = Path(previous_model).expanduser().resolve()
        if not previous.is_file():
            raise FileNotFoundError(f"previous_model {previous} does not exist")
        return StartPoint(kind="previous", source=str(previous))
    return StartPoint(kind="scratch")


class Trainer(ABC):
    """One MLFF family: train from scratch or fine-tune, export a model forcefields loads."""

    name: ClassVar[str]

    def train(
        self,
        train_frames: Sequence[Frame],
        work_dir: str | Path,
        settings: TrainingSettings,
        type_map: Sequence[str],
        previous_model: str | Path | None = None,
        seed: int | None = None,
    ) -> TrainedModel:
        """Train on `train_frames` in `work_dir`; `previous_model` is a checkpoint_path."""
        if not type_map:
            raise ValueError("type_map is empty: pass the chemical system's elements")
        if not train_frames:
            raise ValueError("no training frames: nothing to train on")
        work = Path(work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model = self._train(
            list(train_frames), work, settings, list(type_map), previous_model,
            settings.seed if seed is None else seed,
        )
        return model.model_copy(update={"seconds": time.perf_counter() - start})

    @abstractmethod
    def _train(
        self,
        frames: list[Frame],
        work_dir: Path,
        settings: TrainingSettings,
        type_map: list[str],
        previous_model: str | Path | None,
        seed: int,
    ) -> TrainedModel: ...


def count_parameters(calculator) -> int | None:
    """Trainable-size of the torch model(s) behind an ASE calculator (every family's calculator
    holds its torch modules a few attributes deep); None when none is found."""
    try:
        import torch
    except ImportError:  # pragma: no cover - every backend needs torch
        return None
    params: dict[int, int] = {}
    seen: set[int] = set()

    def walk(obj, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            params.update((id(p), p.numel()) for p in obj.parameters())
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for value in vars(obj).values():
                walk(value, depth + 1)

    walk(calculator, 0)
    return sum(params.values()) or None


def _stress_rmse(pred: list[np.ndarray], ref: list) -> float | None:
    pairs = [(p, np.asarray(r, dtype=float)) for p, r in zip(pred, ref, strict=True) if r is not None]
    if not pairs:
        return None
    return float(np.sqrt(np.mean([np.mean(np.square(p - r)) for p, r in pairs])))


def evaluate_model(
    model_path: str | Path | None,
    frames: Sequence[Frame],
    forcefield: ForceFieldSettings | None = None,
    predictions: bool = False,
) -> dict:
    """Energy (eV/atom), force (eV/Å) and stress (GPa) RMSE of a model file on labelled frames.

    The model is loaded by ``forcefields.get_calculator`` (family read from the file;
    ``model_path=None``: the model `forcefield` names, e.g. a wheel's pretrained) and
    evaluated with ``forcefields.single_points``: one code path for every backend.
    ``n_parameters``: the model's size (:func:`count_parameters`). With ``predictions`` the per-frame energies per atom and all force components
    (predicted and labelled) come back too, for parity plots.
    """
    from cscflow.datasets import flatten_frames
    from cscflow.forcefields import get_calculator, single_points

    frames = flatten_frames(frames)
    if not frames:
        return {"energy_rmse": None, "force_rmse": None, "stress_rmse": None, "n": 0}
    calculator = get_calculator(forcefield or ForceFieldSettings(), model_path)
    results = single_points([f.structure for f in frames], calculator)
    n_atoms = np.array([len(f.structure) for f in frames])
    e_pred = np.array([r["energy"] for r in results]) / n_atoms
    e_ref = np.array([f.energy for f in frames]) / n_atoms
    f_pred = np.concatenate([np.asarray(r["forces"]).ravel() for r in results])
    f_ref = np.concatenate([np.asarray(f.forces, dtype=float).ravel() for f in frames])
    out = {
        "energy_rmse": float(np.sqrt(np.mean(np.square(e_pred - e_ref)))),
        "force_rmse": float(np.sqrt(np.mean(np.square(f_pred - f_ref)))),
        "stress_rmse": _stress_rmse([np.asarray(r["stress"]) for r in results], [f.stress for f in frames]),
        "n": len(frames),
        "n_parameters": count_parameters(calculator),
    }
    if predictions:
        out.update(
            energy_pred=e_pred.tolist(), energy_ref=e_ref.tolist(),
            force_pred=f_pred.tolist(), force_ref=f_ref.tolist(),
        )
    return out
