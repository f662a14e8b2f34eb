"""jobflow-remote dispatch: `cscflow submit SPEC --jobflow-remote PROJECT`.

A second dispatcher next to FireWorks. The flow is the same; every stage job carries a
``manager_config`` with the jobflow-remote ``worker`` (plus ``exec_config``/``resources``)
of its category from ``spec.dispatch.remote_workers``. It is set per job with
``dynamic=False``, as the FireWorks ``_category`` is, so stages a trigger adds at run
time get their own worker, not the trigger's. jobflow-remote keeps its queue in MongoDB
and runs a daemon (``jf runner start``); the project file
(``fworker_configs/jobflow_remote/cscflow.yaml``) defines the workers, the queue store and
the JobStore the workers write to.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from cscflow.config import ExplorationSpec, load_spec
from cscflow.dispatch import DispatchError
from cscflow.runner import record_run
from cscflow.stores import check_no_credentials

__all__ = ["RemoteDispatchError", "RemoteSubmission", "check_remote_workers", "remote_flow", "submit_remote"]


class RemoteDispatchError(DispatchError):
    """The flow cannot go to jobflow-remote as configured."""


@dataclass
class RemoteSubmission:
    run_id: str
    run_dir: Path
    project: str | None
    job_ids: list[str]
    workers: dict[str, int]


def check_remote_workers(spec: ExplorationSpec) -> None:
    """Every category a stage uses needs a jobflow-remote worker, else its jobs would all land
    on the project's default worker (GPU training on a CPU node, DFT on a GPU node)."""
    used = sorted({c for c in spec.dispatch.categories.values() if c})
    missing = [c for c in used if c not in spec.dispatch.remote_workers]
    if missing:
        raise RemoteDispatchError(
            f"dispatch.remote_workers has no worker for categor{'y' if len(missing) == 1 else 'ies'} "
            f"{', '.join(missing)}: add e.g. dispatch: {{remote_workers: {{{missing[0]}: {{worker: {missing[0]}_worker}}}}}}"
        )


def remote_flow(spec: ExplorationSpec, run_id: str, seeds=None):
    """The exploration flow with every job routed to its jobflow-remote worker."""
    from cscflow.loop import exploration_flow

    check_remote_workers(spec)
    return exploration_flow(spec, run_id, seeds=seeds)


def _worker_counts(flow) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job_, _ in flow.iterflow():
        worker = job_.config.manager_config.get("worker", "<project default>")
        counts[worker] = counts.get(worker, 0) + 1
    return counts


def submit_remote(spec_path: str | Path, project: str | None, run_dir: str | Path | None = None,
                  seeds=None) -> RemoteSubmission:
    """Insert the exploration into a jobflow-remote project's queue (the daemon runs it)."""
    spec = load_spec(spec_path)
    check_no_credentials(spec.store)
    try:
        from jobflow_remote import submit_flow
    except ImportError:
        raise DispatchError(
            "jobflow-remote is not installed: pip install 'cscflow[remote]' (or jobflow-remote==1.0.1)"
        ) from None
    run_dir = Path(run_dir or Path("runs") / spec.name).resolve()
    if (run_dir / "run.json").exists():
        raise DispatchError(f"{run_dir} already holds a run: choose another --run-dir")
    run_id = uuidlib.uuid4().hex[:12]
    flow = remote_flow(spec, run_id, seeds=seeds)
    try:
        job_ids = submit_flow(flow, project=project)
    except Exception as exc:  # jobflow-remote's own config / connection errors, one line
        raise DispatchError(f"jobflow-remote project {project or '(default)'}: {type(exc).__name__}: {exc}") from None
    record_run(run_dir, run_id, spec, spec_path, "jobflow-remote", project=project)
    return RemoteSubmission(run_id, run_dir, project, [str(j) for j in job_ids or []], _worker_counts(flow))
