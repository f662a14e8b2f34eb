"""A local MongoDB-wire server for laptop mode and tests, run as its own process.

The server is secantusdb's ``secantusd-py`` (GPL-2.0, beta; ``pip install 'cscflow[server]'``).
cscflow never imports it: it only starts the executable and speaks MongoDB to it with
pymongo, so every laptop-mode file also works against a real MongoDB. The data directory
and a ``server.json`` (pid, host, port) live together, so a second ``start`` on the same
directory reuses a live server and a restart after a crash reopens the same data (clients
use ``journal=true``, so an acknowledged write survives a ``kill -9`` of the server).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EXECUTABLE",
    "INSTALL_HINT",
    "LocalServer",
    "LocalServerError",
    "find_executable",
    "free_port",
    "ping",
]

EXECUTABLE = "secantusd-py"
INSTALL_HINT = "pip install 'cscflow[server]'  (secantusdb, a MongoDB-wire server run as its own process)"
STATE_FILE = "server.json"


class LocalServerError(RuntimeError):
    """The local database server cannot be found, started or reached."""


def find_executable() -> str | None:
    """secantusd-py on PATH or next to this Python (a venv that is not activated)."""
    here = Path(sys.executable).parent / EXECUTABLE
    return str(here) if here.is_file() else shutil.which(EXECUTABLE)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ping(uri: str, timeout_ms: int = 1000) -> bool:
    """True when a MongoDB-wire server answers `ping` at `uri`."""
    import pymongo

    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms)
    try:
        client.admin.command("ping")
        return True
    except Exception:  # any pymongo error means "not answering"
        return False
    finally:
        client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie child of this process is not alive
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


@dataclass
class LocalServer:
    """One server on one data directory; `port` is kept across restarts (clients keep their URI)."""

    storage: Path
    host: str = "127.0.0.1"
    port: int | None = None
    pid: int | None = None

    def __post_init__(self):
        self.storage = Path(self.storage).resolve()
        state = self.storage / STATE_FILE
        if self.port is None and state.is_file():
            saved = json.loads(state.read_text())
            self.port, self.pid = int(saved["port"]), saved.get("pid")

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    def running(self) -> bool:
        return self.port is not None and self.pid is not None and _alive(self.pid) and ping(self.uri)

    def start(self, timeout: float = 60.0) -> LocalServer:
        """Start the server, or reuse the live one on this directory; wait until it answers a ping."""
        if self.running():
            return self
        exe = find_executable()
        if exe is None:
            raise LocalServerError(f"{EXECUTABLE} is not installed: {INSTALL_HINT}")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        if ping(self.uri, 300):
            raise LocalServerError(f"port {self.port} is taken by another server; stop it or remove {self.storage / STATE_FILE}")
        log = open(self.storage / "server.log", "ab")
        proc = subprocess.Popen(
            [exe, "--host", self.host, "--port", str(self.port), "--storage-path", str(self.storage / "data"),
             "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.storage,
            start_new_session=True,  # Ctrl-C in the shell that started it does not kill it
        )
        log.close()
        self.pid = proc.pid
        (self.storage / STATE_FILE).write_text(json.dumps({"pid": self.pid, "host": self.host, "port": self.port}))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                tail = (self.storage / "server.log").read_text(errors="replace")[-400:].strip()
                raise LocalServerError(f"{EXECUTABLE} exited with code {proc.returncode}: {tail.splitlines()[-1:] or ''}")
            if ping(self.uri, 500):
                return self
            time.sleep(0.2)
        self.stop()
        raise LocalServerError(f"{EXECUTABLE} did not answer on {self.uri} within {timeout:g} s")

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM (flushes and closes the data files), then SIGKILL after `timeout`. False if not running."""
        if self.pid is None or not _alive(self.pid):
            return False
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline and _alive(self.pid):
            time.sleep(0.1)
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            while _alive(self.pid):
                time.sleep(0.1)
        return True

    def kill(self) -> None:
        """SIGKILL, no shutdown (crash tests)."""
        if self.pid is not None and _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            while _alive(self.pid):
                time.sleep(0.05)
