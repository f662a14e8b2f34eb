"""One writing process per run directory.

``explore``, ``resume`` and the laptop-mode FireWorks workers (their embedded store takes
it when it connects) hold ``run_dir/run.lock``: an exclusive ``flock`` that the kernel
drops when the holder exits or is killed, so a stale lock never needs cleaning up. The
file also records the holder (pid, host, start time, command) for the refusal message.
Read-only commands (``status``, ``report``) take no lock and work while a run goes on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["LOCK_FILE", "RunLocked", "acquire", "holder", "release", "run_lock"]

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"

# run directory -> [open lock file, depth]: re-entrant within one process.
_held: dict[Path, list] = {}


class RunLocked(RuntimeError):
    """Another process is writing to this run directory (or it cannot be locked)."""


def _describe(info: dict) -> str:
    what = f" ({info['command']})" if info.get("command") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}{what}"


def _read(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}


def holder(run_dir: str | Path) -> dict | None:
    """Who holds the lock of `run_dir` now (None: nobody)."""
    path = Path(run_dir) / LOCK_FILE
    if Path(run_dir).resolve() in _held:
        return _read(_held[Path(run_dir).resolve()][0])
    try:
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read(handle)
            return None
    except FileNotFoundError:
        return None


def acquire(run_dir: str | Path, command: str = "") -> None:
    """Take the run directory's lock or raise RunLocked naming its holder."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        _held[run_dir][1] += 1
        return
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as exc:
        raise RunLocked(f"{run_dir}: cannot write to the run directory ({exc.strerror}); "
                        "commands that compute need a writable run directory (status and report do not)") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _read(handle)
        handle.close()
        raise RunLocked(f"{run_dir} is in use by {_describe(info)}: wait for it to finish, "
                        "or stop that process, then try again") from None
    previous = _read(handle)
    if previous:  # the file outlived a holder that was killed: the kernel dropped its lock
        logger.info("taking over the lock of %s (no longer running)", _describe(previous))
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }))
    handle.flush()
    _held[run_dir] = [handle, 1]


def release(run_dir: str | Path) -> None:
    run_dir = Path(run_dir).resolve()
    entry = _held.get(run_dir)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    handle = entry[0]
    del _held[run_dir]
    handle.seek(0)
    handle.truncate()  # an empty file: nobody holds it
    handle.flush()
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


@contextmanager
def run_lock(run_dir: str | Path, command: str = ""):
    acquire(run_dir, command)
    try:
        yield
    finally:
        release(run_dir)
