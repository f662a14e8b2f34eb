"""The JobStore: embedded MontyStore keeps dynamic-flow outputs; MongoDB errors are fast and clear."""

import time

import pytest
from jobflow import Flow, Response, job, run_locally

from cscflow.config import StoreSettings
from cscflow.stores import StoreError, build_job_store, redact_uri


@job(data=["values"])
def make_values(n):
    return {"values": list(range(n)), "n": n}


@job
def add_more(n):
    # A dynamic replacement re-uses this job's uuid with index 2: a JSONStore would collapse it.
    if n < 3:
        nxt = add_more(n + 1)
        return Response(replace=Flow([make_values(n + 1), nxt], output=nxt.output))
    return n


def test_embedded_store_persists_dynamic_outputs(tmp_path):
    store = build_job_store(StoreSettings(), tmp_path)
    first = make_values(5)
    loop = add_more(0)
    run_locally(Flow([first, loop]), store=store, ensure_success=True, log=False)

    reopened = build_job_store(StoreSettings(), tmp_path)
    reopened.connect()
    out = reopened.get_output(first.uuid, load=True)
    assert out["values"] == [0, 1, 2, 3, 4]
    # Large arrays live in the data store, not in the job document.
    raw = reopened.docs_store.query_one({"uuid": first.uuid})
    assert "blob_uuid" in str(raw["output"]["values"])
    indices = sorted(d["index"] for d in reopened.docs_store.query({"uuid": loop.uuid}))
    assert indices == [1, 2]
    assert reopened.get_output(loop.uuid, which="last") == 3
    assert (tmp_path / "store").is_dir()


def test_relative_run_dir_survives_run_locally_job_folders(tmp_path, monkeypatch):
    """run_locally chdirs into job folders: a relative run dir must still mean the same store."""
    monkeypatch.chdir(tmp_path)
    store = build_job_store(StoreSettings(), "runs/demo")
    assert not (tmp_path / "runs").exists()  # building a store writes nothing
    (tmp_path / "runs" / "demo" / "jobs").mkdir(parents=True)
    first = make_values(3)
    run_locally(first, store=store, root_dir=tmp_path / "runs" / "demo" / "jobs", create_folders=True,
                ensure_success=True, log=False)
    assert not list((tmp_path / "runs" / "demo" / "jobs").rglob("store"))  # no stray store in a job folder
    reopened = build_job_store(StoreSettings(), tmp_path / "runs" / "demo")
    reopened.connect()
    assert reopened.get_output(first.uuid, load=True)["values"] == [0, 1, 2]


def test_embedded_store_needs_run_dir():
    with pytest.raises(ValueError, match="run directory"):
        build_job_store(StoreSettings())


def test_unreachable_mongodb_fails_fast_and_hides_password():
    settings = StoreSettings(uri="mongodb://alice:s3cret@127.0.0.1:1/cscflow", timeout_ms=1000)
    start = time.perf_counter()
    with pytest.raises(StoreError) as err:
        build_job_store(settings)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "127.0.0.1:1" in message and "store.uri" in message
    assert "s3cret" not in message and "alice" not in message


def test_redact_uri():
    assert redact_uri("mongodb+srv://u:p@host/db") == "mongodb+srv://***@host/db"
    assert redact_uri("mongodb://host:27017") == "mongodb://host:27017"


def test_store_uri_credentials_come_from_the_environment(monkeypatch):
    """`${VAR}` in store.uri is filled at connection time: the spec (and stored documents) keep the placeholder."""
    settings = StoreSettings(uri="mongodb://${CSCFLOW_T_USER}:${CSCFLOW_T_PW}@127.0.0.1:1/cscflow", timeout_ms=500)
    monkeypatch.delenv("CSCFLOW_T_USER", raising=False)
    with pytest.raises(StoreError, match="CSCFLOW_T_USER is not set"):
        build_job_store(settings)
    monkeypatch.setenv("CSCFLOW_T_USER", "bob")
    monkeypatch.setenv("CSCFLOW_T_PW", "hunter2")
    with pytest.raises(StoreError) as err:  # expanded, then unreachable
        build_job_store(settings)
    assert "127.0.0.1:1" in str(err.value) and "hunter2" not in str(err.value)
    assert "${CSCFLOW_T_PW}" in settings.uri
