"""FireWorks dispatch: `cscflow submit` turns an exploration into a FireWorks workflow.

The flow from :func:`cscflow.loop.exploration_flow` is converted with jobflow's
``flow_to_workflow`` *without* a store, so every worker writes to the JobStore of its own
jobflow configuration (``JOBFLOW_CONFIG_FILE``). Each stage carries a FireWorks
``_category`` from ``spec.dispatch`` (GPU stages to GPU workers, DFT and analysis to CPU
workers); the loop sets it per job with ``dynamic=False`` so that iterations added at run
time keep their own categories.

Laptop mode (``--local``) starts (or reuses) a local MongoDB-wire server in the run
directory (:mod:`cscflow.localserver`): the LaunchPad and the results store (MongoStore +
GridFS) live on it, so several ``rlaunch`` workers may run at once, one per category.
Every LaunchPad and JobStore cscflow writes or opens uses a journaled write concern.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cscflow.config import ExplorationSpec, load_spec
from cscflow.stores import JOURNALED

__all__ = [
    "DispatchError",
    "Submission",
    "connect_launchpad",
    "describe_launchpad",
    "fworker_categories",
    "missing_categories",
    "read_launchpad_file",
    "local_worker_commands",
    "submit",
    "submit_flow",
    "workflow_for_run",
    "write_local_configs",
    "write_worker_jobflow_config",
]

LOCAL_DIR = "fireworks"  # run_dir/fireworks holds the laptop-mode FireWorks files
LOCAL_DB_NAME = "cscflow_fireworks"
SERVER_DIR = "db"  # run_dir/db: the laptop-mode server's data, log and server.json
WORKER_TIMEOUT_MS = 60_000  # laptop-mode workers: how long a store call waits for the server to be back
# laptop-mode workers ping their running job every 10 s, so `lpad detect_lostruns --rerun` finds a
# job whose worker died after 40 s without pinging (FireWorks' defaults: 1 h and 4 h, for clusters)
PING_TIME_SECS, RUN_EXPIRATION_SECS = 10, 40


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
    if not {"w", "j", "journal"} & set(kwargs):
        kwargs.update(JOURNALED)  # add_wf is acknowledged only once it is in the journal
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


# --------------------------------------------------------------------------- config files


def write_worker_jobflow_config(spec: ExplorationSpec, run_dir: Path, force: bool = False) -> Path | None:
    """run_dir/jobflow.yaml: the run's JobStore for workers. Written for the embedded store and
    (`force`) for laptop mode's local server; with a user's MongoDB URI, workers bring their
    own config (the URI may hold ${VAR} credentials that must not land in a file)."""
    if spec.store.uri and not force:
        return None
    from cscflow.stores import build_job_store

    settings = spec.store
    if settings.uri:  # workers wait out a server restart instead of failing the job
        settings = settings.model_copy(update={"timeout_ms": max(settings.timeout_ms, WORKER_TIMEOUT_MS)})
    store = build_job_store(settings, run_dir, run_lock=True)  # embedded store: one worker process at a time
    path = run_dir / "jobflow.yaml"
    path.write_text(yaml.safe_dump({"JOB_STORE": json.loads(json.dumps(store.as_dict()))}, sort_keys=False))
    return path


def _fworker_file(category: str | None) -> str:
    return f"fworker_{category or 'uncategorised'}.yaml"


def write_local_configs(spec: ExplorationSpec, run_dir: Path, host: str, port: int) -> dict[str, Path]:
    """Laptop-mode FireWorks files in run_dir/fireworks: LaunchPad on the local server, FW_config,
    and one fworker per category (plus one for uncategorised stages if the spec has any)."""
    fw_dir = run_dir / LOCAL_DIR
    fw_dir.mkdir(parents=True, exist_ok=True)
    launchpad = fw_dir / "my_launchpad.yaml"
    launchpad.write_text(yaml.safe_dump({
        "host": host, "port": port, "name": LOCAL_DB_NAME, "logdir": None, "strm_lvl": "INFO",
        "mongoclient_kwargs": dict(JOURNALED),
    }, sort_keys=False))
    files = {"launchpad": launchpad}
    used = {spec.dispatch.category(stage) for stage in (*spec.dispatch.categories, "link")}
    for category in sorted(used, key=lambda c: (c is None, c or "")):
        path = fw_dir / _fworker_file(category)
        path.write_text(yaml.safe_dump(
            {"name": f"laptop_{category or 'uncategorised'}", "category": category or "__none__", "query": "{}"},
            sort_keys=False))
        files[f"fworker:{category}"] = path
    fw_config = fw_dir / "FW_config.yaml"
    fw_config.write_text(
        "# Laptop mode: the LaunchPad is on the run's local server (cscflow server stop/start RUN).\n"
        + yaml.safe_dump({"LAUNCHPAD_LOC": str(launchpad), "PING_TIME_SECS": PING_TIME_SECS,
                          "RUN_EXPIRATION_SECS": RUN_EXPIRATION_SECS})
    )
    files["fw_config"] = fw_config
    return files


def local_worker_commands(run_dir: str | Path) -> list[str]:
    """One shell line per laptop-mode worker; run each in its own terminal (they may run at once)."""
    run_dir = Path(run_dir).resolve()
    env_file = run_dir / "worker_env.sh"
    return [
        f"source {env_file} && cd {run_dir / 'jobs'} && rlaunch -w {path} rapidfire --nlaunches infinite --sleep 5"
        for path in sorted((run_dir / LOCAL_DIR).glob("fworker_*.yaml"))
    ]


def _write_env_file(run_dir: Path, env: dict[str, str]) -> Path:
    path = run_dir / "worker_env.sh"
    lines = ["# source this before rlaunch/qlaunch/lpad for this run"]
    lines += [f"export {k}={v}" for k, v in env.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- submit


def _start_local_server(run_dir: Path):
    from cscflow.localserver import LocalServer, LocalServerError

    try:
        return LocalServer(run_dir / SERVER_DIR).start()
    except LocalServerError as exc:
        raise DispatchError(f"--local: {exc}") from None


def _open_launchpad(spec: ExplorationSpec, run_dir: Path, launchpad, local: bool, server=None):
    """The connected LaunchPad of a run, where it is, and the workers' environment: laptop mode's
    files on the run's server (started unless given), the workers' jobflow config, id counters
    on a fresh server."""
    env: dict[str, str] = {}
    if local:
        server = server or _start_local_server(run_dir)
        files = write_local_configs(spec, run_dir, server.host, server.port)
        launchpad = files["launchpad"]
        env["FW_CONFIG_FILE"] = str(files["fw_config"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "jobs").mkdir(exist_ok=True)
    jobflow_config = write_worker_jobflow_config(spec, run_dir, force=local)
    if jobflow_config is not None:
        env["JOBFLOW_CONFIG_FILE"] = str(jobflow_config)
    lp = connect_launchpad(launchpad, timeout_ms=spec.store.timeout_ms)
    where = describe_launchpad(read_launchpad_file(launchpad or _default_launchpad_file()))
    if local and lp.fw_id_assigner.count_documents({}) == 0:
        lp.reset("", require_password=False)  # a fresh server: create FireWorks' id counters
    return lp, where, env


def submit(
    spec_path: str | Path,
    run_dir: str | Path | None = None,
    launchpad: str | Path | None = None,
    local: bool = False,
    seeds=None,
) -> Submission:
    """Build the exploration workflow and add it to a LaunchPad (or the run's local server)."""
    spec = load_spec(spec_path)
    from cscflow.prerequisites import check_prerequisites

    check_prerequisites(spec, labeller=False)  # store, credentials, seeds: before anything is written
    run_dir = Path(run_dir or Path("runs") / spec.name).resolve()
    if (run_dir / "run.json").exists():
        raise DispatchError(f"{run_dir} already holds a run: choose another --run-dir")
    if local and launchpad is not None:
        raise DispatchError("--local and --launchpad exclude each other")
    if local and spec.store.uri:
        raise DispatchError("--local keeps the results on the run's own server; remove store.uri from the spec")

    server = None
    if local:
        server = _start_local_server(run_dir)  # creates run_dir
        # The recorded spec points at the local server, so `cscflow status/report RUN` read it.
        spec = spec.model_copy(update={"store": spec.store.model_copy(update={"uri": server.uri})})
    lp, where, env = _open_launchpad(spec, run_dir, launchpad, local, server)

    run_id = uuidlib.uuid4().hex[:12]
    wf = workflow_for_run(spec, run_id, seeds=seeds)
    wrong = missing_categories(wf, spec)
    if wrong:  # would wait forever on category-bound workers
        raise DispatchError("Fireworks with the wrong _category: " + "; ".join(wrong))
    from cscflow.runner import record_run

    extra = {"launchpad": where}
    if server is not None:
        extra["server"] = str(server.storage)
    record_run(run_dir, run_id, spec, spec_path, "fireworks-local" if local else "fireworks", **extra)
    wf.to_file(str(run_dir / "workflow.json"))
    id_map = lp.add_wf(wf)
    lp.connection.close()
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


def submit_flow(flow, spec: ExplorationSpec, run_id: str, run_dir: str | Path, launchpad: str | Path | None = None,
                local: bool = False) -> Submission:
    """Add a further Flow of an existing run (e.g. ``cscflow compare-mlff --submit``) to a LaunchPad.

    Workers store into the run's own JobStore: with ``local`` the run's local server holds the
    LaunchPad (started if the run has none; a run made by ``cscflow explore`` keeps its embedded
    store, so one worker at a time), otherwise ``launchpad`` (or FireWorks' lookup) does."""
    from jobflow.managers.fireworks import flow_to_workflow

    run_dir = Path(run_dir).resolve()
    if local and launchpad is not None:
        raise DispatchError("--local and --launchpad exclude each other")
    lp, where, env = _open_launchpad(spec, run_dir, launchpad, local)
    wf = flow_to_workflow(flow, store=None, name=f"{flow.name} ({spec.name})", metadata={"cscflow_run_id": run_id})
    id_map = lp.add_wf(wf)
    lp.connection.close()
    _write_env_file(run_dir, env)
    return Submission(
        run_id=run_id, run_dir=run_dir, workflow_name=wf.name, fw_ids=sorted(id_map.values()),
        categories=dict(Counter(str(fw.spec.get("_category")) for fw in wf.fws)), launchpad=where, local=local,
        worker_env=env,
    )
