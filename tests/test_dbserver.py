"""The session server fixture is a real MongoDB-wire server: separate process, GridFS, unique indexes, atomic claims."""

from __future__ import annotations

import os

import pytest


def test_server_is_a_separate_process_with_real_mongo_semantics(mongo_server):
    import gridfs
    import pymongo

    assert mongo_server.pid != os.getpid() and mongo_server.running()
    client = pymongo.MongoClient(mongo_server.uri, journal=True, serverSelectionTimeoutMS=5000)
    db = client["t_fixture"]
    db.items.create_index("k", unique=True)
    db.items.insert_one({"k": 1, "state": "READY"})
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        db.items.insert_one({"k": 1})
    claimed = db.items.find_one_and_update({"state": "READY"}, {"$set": {"state": "RUNNING"}})
    assert claimed["k"] == 1 and db.items.find_one_and_update({"state": "READY"}, {"$set": {"state": "x"}}) is None
    fs = gridfs.GridFS(db)
    blob = os.urandom(3_000_000)
    assert fs.get(fs.put(blob)).read() == blob
    client.drop_database("t_fixture")
    client.close()


def test_local_server_is_reused_restarted_on_its_port_and_stopped(tmp_path):
    from dbserver import start_server

    from cscflow.localserver import LocalServer, ping

    first = start_server(tmp_path / "db")
    try:
        again = LocalServer(tmp_path / "db").start()  # a second start on the same directory reuses it
        assert (again.pid, again.port) == (first.pid, first.port)
        import pymongo

        pymongo.MongoClient(first.uri, journal=True)["t"]["x"].insert_one({"kept": 1})
        first.kill()
        assert not ping(first.uri, 300)
        back = LocalServer(tmp_path / "db").start()  # after a crash: same data, same port
        assert back.port == first.port and back.pid != first.pid
        assert pymongo.MongoClient(back.uri)["t"]["x"].find_one({"kept": 1}) is not None
    finally:
        LocalServer(tmp_path / "db").stop()
    assert not LocalServer(tmp_path / "db").running()


def test_submit_local_without_the_server_is_one_line(tmp_path, monkeypatch):
    from test_dispatch import TINY

    import cscflow.localserver
    from cscflow.dispatch import DispatchError, submit

    monkeypatch.setattr(cscflow.localserver, "find_executable", lambda: None)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    with pytest.raises(DispatchError, match=r"secantusd-py is not installed: pip install 'cscflow\[server\]'"):
        submit(spec, run_dir=tmp_path / "run", local=True)
    assert not (tmp_path / "run" / "run.json").exists()
