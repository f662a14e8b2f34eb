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
