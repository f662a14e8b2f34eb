"""Shared fixtures: real Materials Project structures from ../shared/data (tests and CI only)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CSCFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def _records(name: str) -> list[dict]:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"reference data {path} not available")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data {SHARED_DATA} not available")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lips_records() -> list[dict]:
    return _records("lips.json")


@pytest.fixture(scope="session")
def znps_records() -> list[dict]:
    return _records("znps.json")


@pytest.fixture(scope="session")
def lisi_records() -> list[dict]:
    return _records("lisi.json")


def structure_from_record(record: dict):
    from pymatgen.core import Structure

    return Structure.from_str(record["cif"], fmt="cif")


@pytest.fixture(scope="session")
def lips_structures(lips_records) -> dict:
    """MP id -> pymatgen Structure for every Li-P-S record."""
    return {r["id"]: structure_from_record(r) for r in lips_records}


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory):
    """A real MongoDB-wire server (secantusd-py) for the session: `.uri`, `.port` (tests/dbserver.py)."""
    from dbserver import database_server

    yield from database_server(tmp_path_factory)
