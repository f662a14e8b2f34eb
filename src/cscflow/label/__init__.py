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

from jobflow import Flow, JobConfig, Maker, OnMissing, Response, job
from pydantic import BaseModel, Field

from cscflow.checkpoint import resumable
from cscflow.config import LabelSettings
from cscflow.schemas import Candidate
from cscflow.structure_store import FrameSet, load_candidates

__all__ = [
    "FAN_OUT",
    "LABELLERS",
    "LabelMaker",
    "LabelOutput",
    "collect_labels",
    "get_labeller",
    "label_candidates",
    "label_fanout_flow",
    "label_structure",
    "protocol_labeller",
]

logger = logging.getLogger(__name__)


class LabelOutput(BaseModel):
    """Labelled frames and the structures that could not be labelled."""

    frames: FrameSet = Field(default_factory=FrameSet, description="one stored document each")
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
    return get_labeller(settings.backend)(load_candidates(selected), iteration, seed, settings)


@dataclass
class LabelMaker(Maker):
    """Label the selected candidates with the configured labeller."""

    name: str = "label"
    settings: LabelSettings = field(default_factory=LabelSettings)

    @job(data=["frames"])
    @resumable
    def make(self, selected, iteration: int, seed: int) -> LabelOutput:
        if self.settings.backend in FAN_OUT and len(selected):
            get_labeller(self.settings.backend)  # a missing code fails here, before the fan-out
            return Response(replace=label_fanout_flow(selected, iteration, seed, self.settings))
        return label_candidates(selected, iteration, seed, self.settings)


#: backends whose Label stage fans out into one job per selected structure (DFT codes)
FAN_OUT = ("cp2k", "vasp")


@job(data=["frames"])
@resumable
def label_structure(candidate, iteration: int, seed: int, settings: LabelSettings):
    """One selected structure's protocol: CP2K runs it here; VASP replaces this job by the
    structure's atomate2 calculations (one Firework per DFT calculation, custodian each)."""
    return label_candidates(candidate, iteration, seed, settings)


@job(data=["frames"])
def collect_labels(outputs: list, candidate_ids: list[str]) -> LabelOutput:
    """The Label stage's output: every structure's frames (store keys) and failures; a
    structure whose job died is one failure, the others are kept."""
    from cscflow.structure_store import merge_sets

    sets, failures, labellers, seconds = [], [], [], 0.0
    for cid, out in zip(candidate_ids, outputs):
        if out is None:
            failures.append({"candidate_id": cid, "frame_id": f"{cid}-*", "error": "label job did not finish"})
            continue
        out = out if isinstance(out, LabelOutput) else LabelOutput.model_validate(out)
        sets.append(out.frames)
        failures.extend(out.failures)
        labellers.append(out.labeller)
        seconds += out.seconds
    frames = merge_sets(sets, FrameSet) if sets else FrameSet()
    return LabelOutput(frames=frames, failures=failures, labeller=labellers[0] if labellers else "", seconds=seconds)


def label_fanout_flow(selected, iteration: int, seed: int, settings: LabelSettings) -> Flow:
    """One job per selected structure (its candidate travels as one store key) and a collector.

    Granularity (issue 13, paper scale: 600 structures per iteration, 7 iterations): one
    Firework per structure's protocol keeps the Label FWAction to store keys (~1 MB at 600,
    instead of 20-35 MB of structures) and the workflow at ~600 Fireworks per iteration
    instead of ~4,800 (CP2K, one per calculation), so FireWorks' workflow document, rewritten
    on every completion, stays small over 7 iterations. VASP keeps atomate2's one job per
    calculation below that level (custodian restarts one calculation), in a replace of its
    own structure job, so no single action holds more than one structure's jobs.
    """
    from cscflow.checkpoint import fan_out
    from cscflow.structure_store import shards

    jobs, ids = [], []
    for one in shards(selected, 1):
        cid = one.ids[0] if hasattr(one, "ids") else one[0].id
        j = label_structure(one, iteration, seed, settings)
        j.name = f"label {cid}"
        j.metadata["candidate_id"] = cid
        jobs.append(j)
        ids.append(cid)
    collector = collect_labels([j.output for j in jobs], ids)
    collector.name = "collect labels"
    collector.config = JobConfig(on_missing_references=OnMissing.NONE)  # a dead structure job is one failure
    return fan_out(jobs, collector, "label", "structure", "label structures", unit_keys=ids)
