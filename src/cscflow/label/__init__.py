"""Labelling: energies, forces and stresses of selected candidates for training.

``LabelMaker`` dispatches on ``LabelSettings.backend`` through ``LABELLERS``:
backend name -> ``function(selected, iteration, seed, settings) -> LabelOutput | Response``.
A DFT backend may return ``Response(replace=Flow([...per-structure jobs..., collect]))``
whose output is a LabelOutput. ``teacher`` (a pretrained MLFF standing in for DFT) is
built in; ``cp2k`` and ``vasp`` register themselves from ``cscflow/label/cp2k.py`` and
``cscflow/label/vasp.py`` (imported on demand here).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from jobflow import Maker, Response, job
from pydantic import BaseModel, Field

from cscflow.checkpoint import resumable
from cscflow.config import LabelSettings
from cscflow.schemas import Candidate, Frame

__all__ = ["LABELLERS", "LabelMaker", "LabelOutput", "get_labeller", "label_candidates"]

logger = logging.getLogger(__name__)


class LabelOutput(BaseModel):
    """Labelled frames and the structures that could not be labelled."""

    frames: list[Frame] = Field(default_factory=list)
    failures: list[dict[str, Any]] = Field(
        default_factory=list, description="{'candidate_id', 'frame_id', 'error'} per failed label"
    )
    labeller: str = ""
    seconds: float = 0.0


Labeller = Callable[[list[Candidate], int, int, LabelSettings], "LabelOutput | Response"]


def _teacher(selected, iteration, seed, settings):
    from cscflow.label.teacher import teacher_label

    return teacher_label(selected, iteration, seed, settings)


#: backend -> labeller; cp2k / vasp add themselves when their modules are imported.
LABELLERS: dict[str, Labeller] = {"teacher": _teacher}


def get_labeller(backend: str) -> Labeller:
    """The labeller registered for ``backend`` (tries ``cscflow.label.<backend>`` first)."""
    if backend not in LABELLERS:
        try:
            importlib.import_module(f"cscflow.label.{backend}")
        except ImportError as exc:
            if exc.name != f"cscflow.label.{backend}":
                raise  # the module exists but one of its own imports failed: say so
    if backend not in LABELLERS:
        raise NotImplementedError(
            f"labeller backend {backend!r} is not available yet: cscflow/label/{backend}.py must "
            f"register it in cscflow.label.LABELLERS (available: {', '.join(sorted(LABELLERS))}); "
            "use labeller.backend: teacher meanwhile"
        )
    return LABELLERS[backend]


def label_candidates(
    selected: list[Candidate], iteration: int, seed: int, settings: LabelSettings
) -> LabelOutput | Response:
    """Plain-function entry point of LabelMaker (usable without jobflow)."""
    return get_labeller(settings.backend)(list(selected), iteration, seed, settings)


@dataclass
class LabelMaker(Maker):
    """Label the selected candidates with the configured labeller."""

    name: str = "label"
    settings: LabelSettings = field(default_factory=LabelSettings)

    @job(data=["frames"])
    @resumable
    def make(self, selected: list[Candidate], iteration: int, seed: int) -> LabelOutput:
        return label_candidates(selected, iteration, seed, self.settings)
