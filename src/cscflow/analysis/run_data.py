"""The documents of one run, read back from its store for reports and downstream screens.

Newest document per (iteration, stage), as `cscflow resume` does, so a run that is still
going can be read; stage outputs that cannot be decoded stay plain dicts. Candidates and
frames are read from the run's per-structure collections (cscflow.structure_store) only
when asked for, one iteration at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cscflow.config import ExplorationSpec
from cscflow.schemas import Candidate, Frame, IterationDocument, LoopState, ReferenceEntry, field_of, flatten_documents
from cscflow.structure_store import load_candidates, load_frames

__all__ = ["DOWNSTREAM_STAGES", "RunData", "load_run_data"]

logger = logging.getLogger(__name__)

DOWNSTREAM_STAGES = ("qha", "conductivity")


@dataclass
class RunData:
    """The newest output of every (iteration, stage) of one run, decoded."""

    run_dir: Path
    run_id: str
    spec: ExplorationSpec
    outputs: dict[tuple[int, str], Any] = field(default_factory=dict)
    completed: dict[tuple[int, str], str] = field(default_factory=dict)
    store: Any = None  # the run's JobStore: per-structure documents are read from it

    @property
    def iterations(self) -> list[int]:
        """Loop iterations (>= 1) with at least one finished stage."""
        return sorted({k for k, stage in self.outputs if k >= 1 and stage not in DOWNSTREAM_STAGES})

    def stages(self, k: int) -> list[str]:
        return sorted(stage for it, stage in self.outputs if it == k)

    def output(self, k: int, stage: str):
        return self.outputs.get((k, stage))

    def references(self) -> list[ReferenceEntry]:
        return flatten_documents(field_of(self.output(0, "references"), "references", []), ReferenceEntry)

    def candidates(self, k: int) -> tuple[list[Candidate], str | None]:
        """The most processed candidates of iteration k (score > relax > generate) and their stage."""
        order = ("references", "relax") if k == 0 else ("score", "relax", "generate")
        for stage in order:
            out = self.output(k, stage)
            if out is not None and field_of(out, "candidates") is not None:
                return load_candidates(field_of(out, "candidates"), self.store), stage
        return [], None

    def scored(self) -> dict[int, list[Candidate]]:
        return {k: load_candidates(field_of(self.output(k, "score"), "candidates", []), self.store)
                for k in self.iterations if self.output(k, "score") is not None}

    def selected(self, k: int) -> list[Candidate]:
        return load_candidates(field_of(self.output(k, "select"), "selected", []), self.store)

    def frames(self, k: int) -> list[Frame]:
        return load_frames(field_of(self.output(k, "label"), "frames", []), self.store)

    def all_frames(self) -> list[Frame]:
        return [f for k in sorted({k for k, s in self.outputs if s == "label"}) for f in self.frames(k)]

    def evaluation(self, k: int) -> IterationDocument | None:
        out = self.output(k, "evaluate")
        if out is None:
            return None
        return out if isinstance(out, IterationDocument) else IterationDocument.model_validate(
            {a: b for a, b in dict(out).items() if not a.startswith("@")})

    def final_state(self) -> LoopState | None:
        triggers = sorted(k for k, s in self.outputs if s == "trigger")
        for k in reversed(triggers):
            out = self.output(k, "trigger")
            if field_of(out, "converged"):
                return out if isinstance(out, LoopState) else LoopState.model_validate(
                    {a: b for a, b in dict(out).items() if not a.startswith("@")})
        return None


def load_run_data(run_dir: str | Path) -> RunData:
    """Read the newest finished document of every stage of the run in `run_dir`."""
    from monty.json import MontyDecoder

    from cscflow.runner import latest_by_stage, load_run
    from cscflow.stores import build_job_store

    run_dir = Path(run_dir).resolve()
    run_id, spec = load_run(run_dir)
    store = build_job_store(spec.store, run_dir)
    store.connect()
    try:
        raw = latest_by_stage(store, run_id, load=True)
        # a stage that fanned out (relax shards, DFT labelling) stored a reference to its
        # collect job's output: read the output itself
        from jobflow.core.reference import find_and_resolve_references

        for doc in raw.values():
            if "OutputReference" in str(doc.get("output"))[:200]:
                doc["output"] = find_and_resolve_references(doc["output"], store)
    finally:
        store.close()
    data = RunData(run_dir=run_dir, run_id=run_id, spec=spec, store=store)
    decoder = MontyDecoder()
    for key, doc in raw.items():
        try:
            data.outputs[key] = decoder.process_decoded(doc["output"])
        except Exception as exc:  # a stage module that cannot be imported: keep the plain dict
            logger.warning("stage %s of iteration %s not decoded (%s): using its raw form", key[1], key[0], exc)
            data.outputs[key] = doc["output"]
        data.completed[key] = str(doc.get("completed_at"))
    return data
