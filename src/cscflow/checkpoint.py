"""Stage checkpoints: a finished stage is never computed twice in one run.

The loop tags every stage job with ``metadata["cscflow_key"] = "<run_id>/<iteration>/<stage>"``.
A stage function wrapped in :func:`resumable` looks that key up in the JobStore it runs
against; when an earlier attempt of the same run already finished the stage (the run was
interrupted later, or a FireWorks node died after the job finished), the stored output is
returned instead of recomputing. Jobs without a key (used outside the loop) always run.

Every computed stage runs with the user's thread count (:func:`cscflow.threads.pinned`),
whatever ran before it in the same process, so explore, resume and workers agree.
"""

from __future__ import annotations

import functools
import logging

from cscflow.threads import pinned

__all__ = ["current_key", "fan_out", "resumable", "stage_key", "stage_metadata", "find_checkpoint"]

logger = logging.getLogger(__name__)

KEY = "cscflow_key"


def stage_key(run_id: str, iteration: int, stage: str) -> str:
    return f"{run_id}/{iteration}/{stage}"


def current_key() -> str | None:
    """The checkpoint key of the running job (None outside a job or for an untagged one)."""
    from jobflow import CURRENT_JOB

    current = CURRENT_JOB.job
    return (current.metadata or {}).get(KEY) if current is not None else None


def stage_metadata() -> dict:
    """The running stage job's metadata (run, iteration, stage) without its checkpoint key:
    for the jobs a stage fans out into, so their documents and outputs are found by run and
    stage while each keeps its own checkpoint."""
    from jobflow import CURRENT_JOB

    current = CURRENT_JOB.job
    meta = dict((current.metadata or {}) if current is not None else {})
    meta.pop(KEY, None)
    return meta


def fan_out(units: list, collect, stage: str, unit: str, name: str, unit_keys: list[str] | None = None):
    """The Flow a stage job replaces itself with: `units` run concurrently, `collect` joins them.

    Every unit gets the stage's run and iteration, stage ``<stage>_<unit>`` (its category is
    the stage's, :meth:`cscflow.config.DispatchSettings.category`) and its own checkpoint key
    ``<stage key>/<unit key>`` (default ``<unit><i>``), so a resumed fan-out recomputes only
    the units that did not finish; units and collect see the run's store (documents by key).
    """
    from jobflow import Flow

    key = current_key()
    meta = stage_metadata()
    for i, job_ in enumerate(units):
        own = unit_keys[i] if unit_keys else f"{unit}{i}"
        job_.metadata.update({**meta, "stage": f"{stage}_{unit}", **({KEY: f"{key}/{own}"} if key else {})})
        job_.config.expose_store = True
    collect.metadata.update({**meta, "stage": f"{stage}_collect"})
    collect.config.expose_store = True
    return Flow([*units, collect], output=collect.output, name=name)


def find_checkpoint(store, key: str):
    """The decoded output of a finished job tagged `key`, or None."""
    from monty.json import MontyDecoder

    doc = store.query_one(
        {f"metadata.{KEY}": key, "output": {"$ne": None}},
        properties=["output", "uuid", "index"],
        sort={"completed_at": -1},
        load=True,
    )
    if doc is None:
        return None
    from jobflow.core.reference import find_and_resolve_references

    # A stage that replaced itself (DFT labelling flows) may have stored references to
    # the outputs of its replacement jobs: hand back the data, not the reference.
    output = find_and_resolve_references(doc["output"], store)
    return MontyDecoder().process_decoded(output)


def resumable(function):
    """Return a finished stage's stored output instead of running it again."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from jobflow import CURRENT_JOB

        store = CURRENT_JOB.store
        key = current_key()
        if key and store is not None:
            cached = find_checkpoint(store, key)
            if cached is not None:
                logger.info("stage %s already finished: reusing its stored output", key)
                return cached
        if key:
            logger.info("stage %s: computing", key)
        with pinned():
            return function(*args, **kwargs)

    return wrapper
