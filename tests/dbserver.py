"""A real MongoDB-wire server for the tests: secantusdb's ``secantusd-py`` as its own process.

Started through :class:`cscflow.localserver.LocalServer` (the same code as laptop mode:
free port, data directory, ping-polled start, SIGTERM then SIGKILL). secantusdb is GPL-2.0:
it is only ever run as an executable, never imported. Tests that need a server are skipped,
with the reason, only when the executable is missing.
"""

from __future__ import annotations

import pytest

from cscflow.localserver import EXECUTABLE, INSTALL_HINT, LocalServer, find_executable


def require_server_executable() -> str:
    exe = find_executable()
    if exe is None:
        pytest.skip(f"{EXECUTABLE} not installed ({INSTALL_HINT}); the real-server tests need it")
    return exe


def start_server(storage) -> LocalServer:
    require_server_executable()
    return LocalServer(storage).start()


def database_server(tmp_path_factory):
    """Generator body of the session fixture: one server for the session, stopped at the end."""
    server = start_server(tmp_path_factory.mktemp("mongo_server"))
    try:
        yield server
    finally:
        server.stop()
