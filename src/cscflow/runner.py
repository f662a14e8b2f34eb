"""Running an exploration on this machine: explore, resume, status.

A run directory holds ``run.json`` (run id and the resolved spec), ``spec.yaml``, the
embedded store (``store/``) unless a MongoDB URI is configured, and one folder per job
(``jobs/``). Everything needed to resume is in the store: finished stages are found by
their checkpoint keys, so ``resume`` rebuilds the loop state and recomputes nothing.

``explore`` checks the spec's prerequisites before it writes anything; ``explore`` and
``resume`` hold the run directory's lock (:mod:`cscflow.runlock`) while they compute;
``status`` only reads (it works on a read-only run directory).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid as uuidlib
from datetime import datetime, timezone
from pathlib import Path

from jobflow import run_locally

from cscflow.config import ExplorationSpec, SpecError, load_spec
from cscflow.prerequisites import check_prerequisites
from cscflow.runlock import run_lock
from cscflow.schemas import field_of, IterationDocument, LoopState
from cscflow.stores import StoreError, build_job_store

__all__ = ["RunError", "explore", "latest_by_stage", "load_run", "rebuild_state", "resume", "status_rows", "format_status"]

logger = logging.getLogger(__name__)

FULL_DISK_BYTES = 16 * 2**20  # less free space than this after a failed stage: say the disk is full


class RunError(RuntimeError):
    """A run directory that cannot be used as asked."""


def _store_problem(store) -> str | None:
    """The StoreError a job hit in `store` (damaged file, full disk), if any."""
    for part in (store.docs_store, *store.additional_stores.values()):
        if getattr(part, "problem", None):
            return part.problem
    return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def record_run(run_dir: Path, run_id: str, spec: ExplorationSpec, spec_path, dispatch: str, **extra) -> None:
    """run.json + spec.yaml: what `cscflow status/report/resume/downstream` read to find a run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / "run.json", {
        "run_id": run_id,
        "spec_file": str(Path(spec_path).resolve()),
        "created": datetime.now(timezone.utc).isoformat(),
        "dispatch": dispatch,
        **extra,
        "spec": spec.model_dump(mode="json"),
    })
    (run_dir / "spec.yaml").write_text(spec.to_yaml())


def load_run(run_dir: str | Path) -> tuple[str, ExplorationSpec]:
    run_dir = Path(run_dir)
    meta = run_dir / "run.json"
    if not meta.is_file():
        raise RunError(f"{run_dir}: not a cscflow run directory (no run.json)")
    data = json.loads(meta.read_text())
    try:
        spec = ExplorationSpec.model_validate(data["spec"])
    except Exception as exc:
        raise SpecError(f"{meta}: stored spec no longer valid: {exc}") from None
    return data["run_id"], spec


def _run(flow, spec: ExplorationSpec, run_dir: Path) -> LoopState | None:
    store = build_job_store(spec.store, run_dir)
    jobs_dir = run_dir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    # log=False: jobflow's messages reach the root logger the CLI configured (no duplicates).
    try:
        responses = run_locally(flow, store=store, root_dir=jobs_dir, create_folders=True, log=False)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC outside the store (job folders, models)
            raise RunError(f"the disk holding {run_dir} is full: free space, then run cscflow resume {run_dir}") from None
        raise
    final = _final_state(responses)
    if final is None:
        problem = _store_problem(store)
        if problem:
            raise StoreError(problem)
        if shutil.disk_usage(run_dir).free < FULL_DISK_BYTES:  # e.g. deepmd's c10::Error writing a model
            raise RunError(f"the disk holding {run_dir} is full: free space, then run cscflow resume {run_dir}")
        raise RunError(
            f"the exploration stopped before finishing (see the log above); "
            f"fix the cause and run: cscflow resume {run_dir}"
        )
    _write_json(run_dir / "final_state.json", final.model_dump(mode="json", exclude={"spec"}))
    return final


def _final_state(responses) -> LoopState | None:
    for by_index in responses.values():
        for response in by_index.values():
            out = getattr(response, "output", None)
            if isinstance(out, LoopState) and out.converged:
                return out
    return None


def _refuse_existing(run_dir: Path) -> None:
    if (run_dir / "run.json").exists():
        raise RunError(f"{run_dir} already holds a run: use `cscflow resume {run_dir}` or another --run-dir")


def explore(spec_path: str | Path, run_dir: str | Path, seeds=None) -> LoopState:
    """Start a new exploration in `run_dir` and run it to the end.

    Nothing is written before the spec's prerequisites pass (store, labeller, seeds)."""
    from cscflow.loop import exploration_flow

    spec = load_spec(spec_path)
    run_dir = Path(run_dir).resolve()
    _refuse_existing(run_dir)
    check_prerequisites(spec)  # its warnings (skipped seeds) are logged once, when the flow is built
    run_id = uuidlib.uuid4().hex[:12]
    flow = exploration_flow(spec, run_id, seeds=seeds)  # reads the seeds: fails before anything is written
    with run_lock(run_dir, "cscflow explore"):
        _refuse_existing(run_dir)  # another explore may have started meanwhile
        record_run(run_dir, run_id, spec, spec_path, "local")
        return _run(flow, spec, run_dir)


def latest_by_stage(store, run_id: str, load: bool = False) -> dict[tuple[int, str], dict]:
    """(iteration, stage) -> the newest finished job document of this run (`load`: blobs too)."""
    docs = store.query(
        {"metadata.run_id": run_id, "output": {"$ne": None}},
        properties=["uuid", "index", "metadata", "completed_at", "output"],
        load=load,
    )
    latest: dict[tuple[int, str], dict] = {}
    for doc in docs:
        meta = doc.get("metadata") or {}
        key = (int(meta.get("iteration", -1)), str(meta.get("stage")))
        if key not in latest or str(doc.get("completed_at")) > str(latest[key].get("completed_at")):
            latest[key] = doc
    return latest


def rebuild_state(store, run_id: str, spec: ExplorationSpec) -> LoopState | None:
    """The loop state after the last fully evaluated iteration, from the store alone."""
    from monty.json import MontyDecoder

    latest = latest_by_stage(store, run_id)
    if (0, "references") not in latest or (0, "label") not in latest:
        return None
    state = LoopState(
        run_id=run_id,
        spec=spec.model_dump(mode="json"),
        reference_uuid=latest[(0, "references")]["uuid"],
        labelled_uuids=[latest[(0, "label")]["uuid"]],
    )
    from cscflow.loop import advance_state

    decode = MontyDecoder().process_decoded

    def output(k, stage):
        return decode(latest[(k, stage)]["output"]) if (k, stage) in latest else None

    k = 1
    while (k, "evaluate") in latest:
        evaluation = IterationDocument.model_validate(_plain(output(k, "evaluate")))
        state = state.model_copy(
            update={
                "iteration": k,
                "scored_uuids": [*state.scored_uuids, latest[(k, "score")]["uuid"]],
                "labelled_uuids": [*state.labelled_uuids, latest[(k, "label")]["uuid"]],
                "train_uuid": latest[(k, "train")]["uuid"] if (k, "train") in latest else state.train_uuid,
            }
        )
        state = advance_state(state, evaluation, output(k, "train"), output(k, "finetune_generator"))
        k += 1
    if (state.iteration, "trigger") in latest:
        out = decode(latest[(state.iteration, "trigger")]["output"])
        if field_of(out, "converged"):
            return LoopState.model_validate(_plain(out))
    return state




def _plain(obj):
    return obj.model_dump() if hasattr(obj, "model_dump") else obj


def resume(run_dir: str | Path) -> LoopState:
    """Finish an interrupted run; finished stages are reused from the store."""
    from cscflow.loop import tag_trigger, exploration_flow, exploration_step

    run_dir = Path(run_dir).resolve()
    run_id, spec = load_run(run_dir)
    state = _stored_state(run_dir, run_id, spec)
    if state is not None and state.converged:  # read only: works on an archived run
        logger.info("run %s already finished: %s", run_id, state.stop_reason)
        return state
    with run_lock(run_dir, "cscflow resume"):
        state = _stored_state(run_dir, run_id, spec)  # what the lock's last holder left
        if state is not None and state.converged:
            logger.info("run %s already finished: %s", run_id, state.stop_reason)
            return state
        if state is None:
            flow = exploration_flow(spec, run_id)
        else:
            flow = exploration_step(state)
            tag_trigger(flow, spec, run_id, state.iteration)
        return _run(flow, spec, run_dir)


def _stored_state(run_dir: Path, run_id: str, spec: ExplorationSpec) -> LoopState | None:
    store = build_job_store(spec.store, run_dir)
    store.connect()
    try:
        return rebuild_state(store, run_id, spec)
    finally:
        store.close()


STATUS_COLUMNS = [
    ("iter", "iteration"),
    ("generated", "n_generated"),
    ("relaxed", "n_relaxed"),
    ("rejected", "n_rejected"),
    ("S.U.N.", "n_sun"),
    ("selected", "n_selected"),
    ("labelled", "n_labelled"),
    ("N_train", "n_train"),
    ("H", "entropy_candidates"),
    ("H_train", "entropy_training"),
    ("dH/dN", "dh_dn"),
    ("E_RMSE", "energy_rmse"),
    ("F_RMSE", "force_rmse"),
]


def status_rows(run_dir: str | Path) -> tuple[list[IterationDocument], LoopState | None, list[str]]:
    """Finished iterations, the final state if any, and stages done in the current one."""
    run_dir = Path(run_dir)
    run_id, spec = load_run(run_dir)
    store = build_job_store(spec.store, run_dir)
    store.connect()
    try:
        state = rebuild_state(store, run_id, spec)
        latest = latest_by_stage(store, run_id)
    finally:
        store.close()
    history = state.history if state else []
    done = history[-1].iteration if history else 0
    current = sorted(
        (stage for (k, stage) in latest if k == done + 1 and stage != "trigger"),
    )
    return history, (state if state and state.converged else None), current


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def format_status(run_dir: str | Path) -> str:
    history, final, current = status_rows(run_dir)
    header = [name for name, _ in STATUS_COLUMNS]
    rows = [[_fmt(getattr(doc, attr)) for _, attr in STATUS_COLUMNS] for doc in history]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    if not history:
        lines.append("(no finished iteration yet)")
    if final is not None:
        lines.append(f"finished: {final.stop_reason}")
    elif current:
        lines.append(f"iteration {len(history) + 1} in progress: done {', '.join(current)}")
    return "\n".join(lines)
