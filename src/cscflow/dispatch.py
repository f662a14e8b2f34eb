"""FireWorks dispatch: `cscflow submit` turns an exploration into a FireWorks workflow.

The flow from :func:`cscflow.loop.exploration_flow` is converted with jobflow's
``flow_to_workflow`` *without* a store, so every worker writes to the JobStore of its own
jobflow configuration (``JOBFLOW_CONFIG_FILE``). Each stage carries a FireWorks
``_category`` from ``spec.dispatch`` (GPU stages to GPU workers, DFT and analysis to CPU
workers); the loop sets it per job with ``dynamic=False`` so that iterations added at run
time keep their own categories.

Laptop mode (``--local``) uses FireWorks' mongomock persistence: the LaunchPad lives in one
JSON file in the run directory that a FireWorks process reads at start and writes back at
exit. That file is single-writer: run one ``rlaunch`` at a time (two at once run jobs twice
and the last to exit overwrites the other's work), and only open ``lpad webgui`` on a copy.
"""

from __future__ import annotations

import json
import os
import sys
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import yaml

from cscflow.config import ExplorationSpec, load_spec
from cscflow.user_errors import user_errors

__all__ = [
    "DispatchError",
    "Submission",
    "connect_launchpad",
    "describe_launchpad",
    "fworker_categories",
    "missing_categories",
    "read_launchpad_file",
    "submit",
    "submit_command",
    "workflow_for_run",
    "write_local_configs",
    "write_worker_jobflow_config",
]

LOCAL_DIR = "fireworks"  # run_dir/fireworks holds the laptop-mode FireWorks files
LOCAL_DB_NAME = "cscflow_fireworks"
SINGLE_WRITER_NOTE = (
    "laptop mode: the LaunchPad is one mongomock file, written back when a FireWorks process exits; "
    "run ONE rlaunch at a time and open `lpad webgui` only on a copy of the file"
)


class DispatchError(RuntimeError):
    """The workflow cannot be submitted as asked (LaunchPad file, MongoDB, run directory)."""


@dataclass
class Submission:
    """What `submit` did: enough to start workers and find the results."""

    run_id: str
    run_dir: Path
    workflow_name: str
    fw_ids: list[int]
    categories: dict[str, int]
    launchpad: str
    local: bool
    worker_env: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- workflow


def workflow_for_run(spec: ExplorationSpec, run_id: str, seeds=None):
    """The exploration as a FireWorks Workflow; no store is baked in (workers use their own)."""
    from jobflow.managers.fireworks import flow_to_workflow

    from cscflow.loop import exploration_flow

    flow = exploration_flow(spec, run_id, seeds=seeds)
    return flow_to_workflow(
        flow, store=None, name=f"cscflow {spec.name} {run_id}", metadata={"cscflow_run_id": run_id, "cscflow_spec": spec.name}
    )


def missing_categories(workflow, spec: ExplorationSpec) -> list[str]:
    """Names of Fireworks whose `_category` differs from the spec's category for their stage."""
    wrong = []
    for fw in workflow.fws:
        stage = fw.spec.get("stage")
        if stage is None:
            continue
        want = spec.dispatch.category(stage)
        if fw.spec.get("_category") != want:
            wrong.append(f"{fw.name} ({stage}: {fw.spec.get('_category')!r} != {want!r})")
    return wrong


def fworker_categories(spec: ExplorationSpec) -> list[str | None]:
    """Every category the spec uses, plus None (uncategorised jobs): the laptop worker takes all."""
    cats = sorted({c for c in spec.dispatch.categories.values() if c})
    return [*cats, None]


# --------------------------------------------------------------------------- LaunchPad


def read_launchpad_file(path: str | Path) -> dict:
    """A LaunchPad YAML file as a dict, `${VAR}` expanded from the environment, checked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DispatchError(f"LaunchPad file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise DispatchError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise DispatchError(f"{path}: a LaunchPad file must be a YAML mapping (host, port, name, ...)")
    if not raw.get("host"):
        raise DispatchError(f"{path}: no `host` (a hostname, or a mongodb:// URI with uri_mode: true)")
    known = {
        "host", "port", "name", "username", "password", "logdir", "strm_lvl", "user_indices",
        "wf_user_indices", "authsource", "uri_mode", "mongoclient_kwargs",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DispatchError(f"{path}: unknown LaunchPad setting(s): {', '.join(unknown)}")
    if raw.get("port") is not None and not isinstance(raw["port"], int):
        raise DispatchError(f"{path}: port must be an integer")
    from cscflow.stores import expand_env

    return expand_env(raw, str(path), DispatchError)


def describe_launchpad(config: dict) -> str:
    """host:port/name with credentials removed: safe for logs and error messages."""
    from cscflow.stores import redact_uri

    if config.get("uri_mode"):
        return redact_uri(str(config["host"]))
    return f"{config.get('host')}:{config.get('port') or 27017}/{config.get('name') or 'fireworks'}"


def _default_launchpad_file() -> str | None:
    from fireworks.fw_config import LAUNCHPAD_LOC

    return LAUNCHPAD_LOC


def connect_launchpad(path: str | Path | None = None, timeout_ms: int = 5000):
    """A connected LaunchPad from `path` (or FireWorks' usual lookup); fails fast and clearly."""
    from fireworks import LaunchPad

    if path is None:
        path = _default_launchpad_file()
        if path is None:
            raise DispatchError(
                "no LaunchPad file: pass --launchpad FILE, or put my_launchpad.yaml in ~/.fireworks "
                "(or set LAUNCHPAD_LOC in FW_config.yaml), or use --local"
            )
    config = read_launchpad_file(path)
    where = describe_launchpad(config)
    kwargs = dict(config.get("mongoclient_kwargs") or {})
    kwargs.setdefault("serverSelectionTimeoutMS", timeout_ms)
    kwargs.setdefault("connectTimeoutMS", timeout_ms)
    config["mongoclient_kwargs"] = kwargs
    try:
        lp = LaunchPad.from_dict(config)
    except Exception as exc:  # pymongo.errors.ConfigurationError, InvalidURI, TypeError...
        raise DispatchError(f"{path}: cannot configure the LaunchPad for {where} ({type(exc).__name__})") from None
    try:
        lp.db.list_collection_names()  # forces server selection and authentication
    except Exception as exc:
        name = type(exc).__name__
        hint = "check username/password/authsource" if "Operation" in name or "Auth" in name else "check host/port/TLS and that MongoDB is running"
        raise DispatchError(f"cannot use the LaunchPad MongoDB at {where} within {timeout_ms / 1000:g} s ({name}); {hint}") from None
    return lp


def _flush_local(lp) -> None:
    """Write a mongomock LaunchPad to its file now (it is also written at process exit)."""
    store = getattr(lp.connection, "_store", None)
    if store is not None and hasattr(store, "_to_file") and getattr(store, "_filename", None):
        store._to_file()


# --------------------------------------------------------------------------- config files


def write_worker_jobflow_config(spec: ExplorationSpec, run_dir: Path) -> Path | None:
    """run_dir/jobflow.yaml: the run's embedded JobStore for workers (None with a MongoDB store)."""
    if spec.store.uri:
        return None
    from cscflow.stores import build_job_store

    store = build_job_store(spec.store, run_dir, run_lock=True)  # one worker process at a time
    path = run_dir / "jobflow.yaml"
    path.write_text(yaml.safe_dump({"JOB_STORE": json.loads(json.dumps(store.as_dict()))}, sort_keys=False))
    return path


def write_local_configs(spec: ExplorationSpec, run_dir: Path) -> dict[str, Path]:
    """Laptop-mode FireWorks files in run_dir/fireworks: mongomock file, FW_config, LaunchPad, one worker."""
    fw_dir = run_dir / LOCAL_DIR
    fw_dir.mkdir(parents=True, exist_ok=True)
    db_file = fw_dir / "launchpad.json"
    if not db_file.exists():
        db_file.write_text("{}")
    launchpad = fw_dir / "my_launchpad.yaml"
    launchpad.write_text(yaml.safe_dump({"host": "localhost", "port": 27017, "name": LOCAL_DB_NAME, "logdir": None}))
    fworker = fw_dir / "my_fworker.yaml"
    fworker.write_text(
        yaml.safe_dump({"name": "laptop", "category": fworker_categories(spec), "query": "{}"}, sort_keys=False)
    )
    fw_config = fw_dir / "FW_config.yaml"
    fw_config.write_text(
        "# Laptop mode: single-writer mongomock LaunchPad. Run ONE FireWorks process at a time.\n"
        + yaml.safe_dump(
            {"MONGOMOCK_SERVERSTORE_FILE": str(db_file), "LAUNCHPAD_LOC": str(launchpad), "FWORKER_LOC": str(fworker)}
        )
    )
    return {"db": db_file, "launchpad": launchpad, "fworker": fworker, "fw_config": fw_config}


def _use_mongomock(db_file: Path) -> None:
    """Point FireWorks at the mongomock file; must happen before FireWorks is first imported."""
    os.environ["MONGOMOCK_SERVERSTORE_FILE"] = str(db_file)
    fw_config = sys.modules.get("fireworks.fw_config")
    if fw_config is not None and fw_config.MONGOMOCK_SERVERSTORE_FILE != str(db_file):
        raise DispatchError(
            "FireWorks was already loaded in this process with another LaunchPad; "
            "run `cscflow submit --local` as its own command"
        )


def _write_env_file(run_dir: Path, env: dict[str, str]) -> Path:
    path = run_dir / "worker_env.sh"
    lines = ["# source this before rlaunch/qlaunch/lpad for this run"]
    lines += [f"export {k}={v}" for k, v in env.items()]
    if (run_dir / LOCAL_DIR).is_dir():
        lines.append(f"# {SINGLE_WRITER_NOTE}")
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- submit


def submit(
    spec_path: str | Path,
    run_dir: str | Path | None = None,
    launchpad: str | Path | None = None,
    local: bool = False,
    seeds=None,
) -> Submission:
    """Build the exploration workflow and add it to a LaunchPad (or a laptop-mode mongomock file)."""
    spec = load_spec(spec_path)
    from cscflow.prerequisites import check_prerequisites

    check_prerequisites(spec, labeller=False)  # store, credentials, seeds: before anything is written
    run_dir = Path(run_dir or Path("runs") / spec.name).resolve()
    if (run_dir / "run.json").exists():
        raise DispatchError(f"{run_dir} already holds a run: choose another --run-dir")
    if local and launchpad is not None:
        raise DispatchError("--local and --launchpad exclude each other")
    if local and spec.store.uri:
        raise DispatchError("--local uses the embedded store; remove store.uri from the spec")

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "jobs").mkdir(exist_ok=True)
    env: dict[str, str] = {}
    if local:
        files = write_local_configs(spec, run_dir)
        _use_mongomock(files["db"])
        launchpad = files["launchpad"]
        env["FW_CONFIG_FILE"] = str(files["fw_config"])
    jobflow_config = write_worker_jobflow_config(spec, run_dir)
    if jobflow_config is not None:
        env["JOBFLOW_CONFIG_FILE"] = str(jobflow_config)

    lp = connect_launchpad(launchpad, timeout_ms=spec.store.timeout_ms)
    where = "mongomock file " + str(run_dir / LOCAL_DIR / "launchpad.json") if local else describe_launchpad(
        read_launchpad_file(launchpad or _default_launchpad_file())
    )
    if local and lp.fw_id_assigner.count_documents({}) == 0:
        lp.reset("", require_password=False)  # a fresh file: create FireWorks' id counters

    run_id = uuidlib.uuid4().hex[:12]
    wf = workflow_for_run(spec, run_id, seeds=seeds)
    wrong = missing_categories(wf, spec)
    if wrong:  # would wait forever on category-bound workers
        raise DispatchError("Fireworks with the wrong _category: " + "; ".join(wrong))
    from cscflow.runner import record_run

    record_run(run_dir, run_id, spec, spec_path, "fireworks-local" if local else "fireworks", launchpad=where)
    wf.to_file(str(run_dir / "workflow.json"))
    id_map = lp.add_wf(wf)
    if local:
        _flush_local(lp)
    _write_env_file(run_dir, env)
    return Submission(
        run_id=run_id,
        run_dir=run_dir,
        workflow_name=wf.name,
        fw_ids=sorted(id_map.values()),
        categories=dict(Counter(str(fw.spec.get("_category")) for fw in wf.fws)),
        launchpad=where,
        local=local,
        worker_env=env,
    )


# --------------------------------------------------------------------------- CLI


@click.command("submit")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--launchpad", "-l", type=click.Path(dir_okay=False), default=None,
              help="LaunchPad YAML (default: FireWorks' lookup: FW_config.yaml, ~/.fireworks/my_launchpad.yaml).")
@click.option("--local", is_flag=True, help="Laptop mode: mongomock LaunchPad file in the run dir, one worker.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<spec name>); holds run.json and the embedded store.")
@click.option("--jobflow-remote", "remote_project", default=None, metavar="PROJECT",
              help="Submit to this jobflow-remote project instead of FireWorks (workers from dispatch.remote_workers).")
@user_errors
def submit_command(spec, launchpad, local, run_dir, remote_project):
    """Submit SPEC.yaml as a FireWorks workflow; run it with rlaunch/qlaunch workers."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if remote_project is not None:
        if local or launchpad:
            raise DispatchError("--jobflow-remote excludes --local and --launchpad")
        from cscflow.remote import submit_remote

        rsub = submit_remote(spec, remote_project, run_dir=run_dir)
        workers = ", ".join(f"{k}: {v}" for k, v in sorted(rsub.workers.items()))
        click.echo(f"submitted run {rsub.run_id}: {len(rsub.job_ids)} jobs ({workers}) to jobflow-remote project "
                   f"{remote_project}")
        click.echo(f"run directory: {rsub.run_dir}")
        click.echo(f"run it:  jf -p {remote_project} runner start ; watch: jf -p {remote_project} job list")
        return
    sub = submit(spec, run_dir=run_dir, launchpad=launchpad, local=local)
    cats = ", ".join(f"{k}: {v}" for k, v in sorted(sub.categories.items()))
    click.echo(f"submitted run {sub.run_id}: {len(sub.fw_ids)} Fireworks ({cats}) to {sub.launchpad}")
    click.echo(f"run directory: {sub.run_dir}")
    env_file = sub.run_dir / "worker_env.sh"
    if sub.local:
        click.echo(f"note: {SINGLE_WRITER_NOTE}")
        click.echo(f"run it:  source {env_file} && cd {sub.run_dir / 'jobs'} && rlaunch rapidfire")
    else:
        if sub.worker_env:
            click.echo(f"workers need: source {env_file}   (embedded store: one worker at a time)")
        click.echo("run it:  qlaunch -c fworker_configs/gpu rapidfire ; qlaunch -c fworker_configs/cpu rapidfire")
