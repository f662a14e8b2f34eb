"""The Train stage: choose frames, train the configured MLFF family, measure it.

Orchestration only: the entropy-ranked split (``datasets.split_frames``), the family's
trainer (``cscflow.trainers``: deepmd, mace, mattersim, chgnet, sevenn; chosen by
``training.backend``) and one evaluation for every family
(``trainers.evaluate_model``: ASE single points through ``cscflow.forcefields``). The
exported model is what the loop relaxes and scores with next: ``forcefields`` reads its
family from the file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jobflow import Maker, job
from pydantic import BaseModel, Field

from cscflow.checkpoint import resumable
from cscflow.config import TrainingSettings
from cscflow.datasets import flatten_frames, split_frames
from cscflow.schemas import Frame
from cscflow.trainers import TrainError, evaluate_model, get_trainer
from cscflow.trainers.deepmd import estimate_numb_steps, make_input, run_dp

__all__ = [
    "TrainError",
    "TrainMaker",
    "TrainOutput",
    "estimate_numb_steps",
    "evaluate_model",
    "make_input",
    "run_dp",
    "train_model",
]

logger = logging.getLogger(__name__)


class TrainOutput(BaseModel):
    """What one Train stage produced; paths are absolute."""

    backend: str = Field("deepmd", description="family that trained model_path")
    model_path: str | None = Field(None, description="exported model; cscflow.forcefields loads it")
    checkpoint_path: str | None = Field(None, description="training checkpoint to continue from")
    energy_rmse: float | None = Field(None, description="eV/atom on the test frames")
    force_rmse: float | None = Field(None, description="eV/Å on the test frames")
    stress_rmse: float | None = Field(None, description="GPa on the test frames")
    n_train: int = 0
    n_test: int = 0
    train_frame_ids: list[str] = Field(default_factory=list)
    test_frame_ids: list[str] = Field(default_factory=list)
    numb_steps: int = Field(0, description="optimiser steps (deepmd) or epochs (the others)")
    start_from: str = Field("none", description="scratch | pretrained:<file> | previous:<file> | none")
    work_dir: str | None = None
    seconds: float = 0.0


def train_model(
    train_frames: Sequence[Frame],
    work_dir: str | Path,
    settings: TrainingSettings,
    type_map: Sequence[str],
    previous_model: str | Path | None = None,
    seed: int | None = None,
    test_frames: Sequence[Frame] = (),
) -> dict:
    """Train `settings.backend` on the frames, then test; paths, metrics, numb_steps, start_from."""
    if not type_map:
        raise ValueError("type_map is empty: pass the chemical system's elements")
    trainer = get_trainer(settings.backend)
    model = trainer.train(flatten_frames(train_frames), work_dir, settings, type_map, previous_model, seed)
    metrics = evaluate_model(model.model_path, test_frames) if test_frames else {}
    return {
        **model.model_dump(exclude={"seconds"}),
        "energy_rmse": metrics.get("energy_rmse"),
        "force_rmse": metrics.get("force_rmse"),
        "stress_rmse": metrics.get("stress_rmse"),
    }


# --------------------------------------------------------------------------- Maker
@dataclass
class TrainMaker(Maker):
    """Split the labelled frames (top-δH train, rest test), train `settings.backend`, test."""

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
        previous_train_ids: list[str] = (),
    ) -> TrainOutput:
        """`previous_train_ids`: the last Train's ``train_frame_ids``; they are ranked first,
        so training sets are nested (one ranking, as along Fig. 3a's N_train axis) and no
        frame an earlier model trained on enters a later test set."""
        start = time.perf_counter()
        if self.settings.backend == "none":
            return TrainOutput(start_from="none", seconds=time.perf_counter() - start)
        if not self.type_map:
            raise ValueError("TrainMaker.type_map is empty: pass the chemical system's elements")
        split = split_frames(
            frames,
            n_train=self.settings.n_train_at(iteration),
            train_iterations_max=self.settings.train_iterations_max,
            test_fraction=self.settings.test_fraction,
            seed=self.settings.seed,  # one seed for every iteration: the holdout stays put
            k=self.entropy_k,
            cutoff=self.entropy_cutoff,
            bandwidth=self.bandwidth,
            previous_train_ids=list(previous_train_ids or ()),
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
