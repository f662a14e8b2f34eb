"""Labelling: energies, forces and stresses of selected candidates for training.

``LabelMaker`` dispatches on ``LabelSettings.backend`` through ``LABELLERS``:
backend name -> ``function(selected, iteration, seed, settings) -> LabelOutput | Response``.
A DFT backend may return ``Response(replace=Flow([...per-structure jobs..., collect]))``
whose output is a LabelOutput. Every backend runs the paper's protocol (Methods 4.2,
:mod:`cscflow.label.protocol`) and differs only in the energy engine
(:mod:`cscflow.label.engines`): ``teacher`` (a pretrained force field standing in for DFT)
and ``cp2k`` through the protocol's ASE code, ``vasp`` with atomate2 jobs
(``cscflow/label/vasp.py``, registers itself when imported on demand here).
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

__all__ = ["LABELLERS", "LabelMaker", "LabelOutput", "get_labeller", "label_candidates", "protocol_labeller"]

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


def protocol_labeller(selected, iteration, seed, settings):
    """teacher and cp2k: the paper's protocol (cscflow.label.protocol) with their engine."""
    from cscflow.label.protocol import protocol_label

    return protocol_label(selected, iteration, seed, settings)


#: backend -> labeller; vasp adds itself when cscflow.label.vasp is imported.
LABELLERS: dict[str, Labeller] = {"teacher": protocol_labeller, "cp2k": protocol_labeller}


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
