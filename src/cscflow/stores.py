"""The jobflow JobStore a run writes to, built from the spec's store settings.

Embedded default: two persistent MontyStores (sqlite) in the run directory, one for
job documents and one `data` additional store for large arrays. With a MongoDB URI:
MongoStore + GridFS, journaled writes by default (``journal=True`` unless the URI sets
``journal`` or ``w``): an acknowledged result is on disk, so a crash of the database
server cannot lose it. JSONStore is never used: it collapses documents that share a
uuid (dynamic flows re-use uuids with a new index) and loses outputs.
"""

from __future__ import annotations

import os
import re
import sqlite3
import string
from pathlib import Path

from jobflow import JobStore
from maggma.stores import MontyStore

from cscflow.config import StoreSettings

__all__ = [
    "JOURNALED", "RunDirStore", "StoreError", "build_job_store", "check_no_credentials", "check_store",
    "expand_env", "journaled_kwargs", "redact_uri",
]

# pymongo client option: acknowledge a write only once it is in the server's journal.
JOURNALED = {"journal": True}


class StoreError(RuntimeError):
    """The results store cannot be reached or opened."""


def redact_uri(uri: str) -> str:
    """Hide credentials in a MongoDB URI before it reaches a log or an error."""
    if "@" not in uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def check_no_credentials(settings) -> None:
    """Refuse a literal user:password in store.uri (a spec or its StoreSettings): it would be
    copied into every stored job document. ``${VAR}`` placeholders pass."""
    uri = getattr(settings, "store", settings).uri or ""
    userinfo = uri.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[0]
    if userinfo and not all(re.fullmatch(r"\$(\{[A-Za-z_]\w*\}|[A-Za-z_]\w*)", part) for part in userinfo.split(":")):
        raise StoreError(
            "store.uri contains credentials, which would be copied into every stored job document; "
            "write them as environment variables (mongodb://${CSCFLOW_MONGO_USER}:${CSCFLOW_MONGO_PASSWORD}@host/...) "
            "and give workers the store in their jobflow config (fworker_configs/jobflow_mongo.yaml)"
        )


def expand_env(value, source: str = "store.uri", error: type[Exception] = StoreError):
    """Fill ``$VAR``/``${VAR}`` from the environment (``string.Template``) in a string, or in
    every string of a dict/list (config files), so credentials stay out of specs and stored
    documents. An unset variable is an ``error`` naming it; ``$$`` is a literal ``$``."""
    if isinstance(value, dict):
        return {k: expand_env(v, source, error) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, source, error) for v in value]
    if not isinstance(value, str):
        return value
    try:
        return string.Template(value).substitute(os.environ)
    except KeyError as exc:
        raise error(f"{source}: environment variable {exc.args[0]} is not set") from None
    except ValueError as exc:
        raise error(f"{source}: {exc} (write a literal $ as $$)") from None


def build_job_store(settings: StoreSettings, run_dir: str | Path | None = None, run_lock: bool = False) -> JobStore:
    """Build the JobStore: MongoDB when `settings.uri` is set, else MontyStore in run_dir.

    The embedded store creates nothing on disk before ``connect()``. ``run_lock``: the embedded store
    takes the run directory's lock (:mod:`cscflow.runlock`) when it connects, as the
    laptop-mode FireWorks workers need."""
    if settings.uri:
        return _mongo_store(settings)
    if run_dir is None:
        raise ValueError("the embedded store needs a run directory")
    # Absolute: run_locally chdirs into job folders before jobs connect, and a relative path
    # would silently open a fresh, empty store there.
    return _embedded_store(settings, Path(run_dir).resolve(), run_lock)


def check_store(settings: StoreSettings) -> None:
    """Fail now, in one line, when the configured store cannot be used (before any work)."""
    check_no_credentials(settings)
    if settings.uri:
        _mongo_store(settings)


class RunDirStore(MontyStore):
    """The run directory's sqlite MontyStore, made safe for users' run directories.

    - An existing store opens without rewriting montydb's config files, so ``status`` and
      ``report`` work on a read-only run directory (an archive, a colleague's run).
    - A damaged store file or a full disk is a :class:`StoreError` naming the file and what
      to do, not a raw ``sqlite3`` error.
    - ``run_lock``: connecting takes the run directory's lock (one writing process).
    """

    def __init__(self, collection_name, database_path: str | None = None, database_name: str = "db",
                 storage: str = "sqlite", storage_kwargs: dict | None = None, client_kwargs: dict | None = None,
                 run_lock: bool = False, **kwargs):
        # Named arguments (not **kwargs): MSONable serialises only those into jobflow.yaml.
        self.run_lock = run_lock
        self.problem: str | None = None  # the last StoreError, for the runner's message
        self._locked = False
        super().__init__(collection_name, database_path=database_path, database_name=database_name,
                         storage=storage, storage_kwargs=storage_kwargs, client_kwargs=client_kwargs, **kwargs)

    @property
    def _file(self) -> Path:
        return Path(self.database_path) / self.database_name / f"{self.collection_name}.collection"

    def _fail(self, exc: Exception) -> StoreError:
        import shutil

        message = str(exc)
        run_dir = Path(self.database_path).parent
        try:
            nearly_full = shutil.disk_usage(self.database_path).free < 2**20
        except OSError:
            nearly_full = False
        if nearly_full or "full" in message or isinstance(exc, OSError) and exc.errno == 28:
            self.problem = f"the disk holding {self._file} is full: free space, then run cscflow resume {run_dir}"
        elif "I/O" in message:
            self.problem = (f"{self._file}: disk I/O error ({message}); check the disk (full? unmounted?), "
                            f"then run cscflow resume {run_dir}")
        else:
            self.problem = (f"{self._file}: the results store file is damaged ({message}); restore it from a "
                            "backup or copy, or start the run again in a new run directory")
        return StoreError(self.problem)

    def connect(self, force_reset: bool = False):
        if self._coll is not None and not force_reset:
            return
        from montydb import MontyClient, set_storage

        db_path = Path(self.database_path)
        if self.run_lock:
            from cscflow.runlock import acquire

            if not self._locked:
                acquire(db_path.parent, "FireWorks worker (embedded store)")
                self._locked = True
        existing = (db_path / "monty.storage.cfg").is_file()
        if existing and not os.access(db_path, os.W_OK):
            # sqlite cannot read a WAL-mode file in a read-only directory: read a copy.
            db_path = self._read_only_copy(db_path)
        try:
            # set_storage sets montydb's session options, then (re)writes the config files.
            set_storage(str(db_path), storage=self.storage, **self.storage_kwargs)
        except OSError as exc:
            raise StoreError(f"{db_path}: cannot {'open' if existing else 'create'} the results store "
                             f"({exc.strerror})") from None
        try:
            client = MontyClient(str(db_path), **self.client_kwargs)
            coll = client[self.database_name][self.collection_name]
            if self._file.exists():
                coll.find_one({})  # a truncated or foreign file fails here, not mid-run
        except (sqlite3.DatabaseError, OSError) as exc:
            raise self._fail(exc) from None
        self._coll = coll

    def _read_only_copy(self, db_path: Path) -> Path:
        import atexit
        import logging
        import shutil
        import tempfile

        copy = Path(tempfile.mkdtemp(prefix="cscflow-readonly-store-")) / "store"
        shutil.copytree(db_path, copy)
        atexit.register(shutil.rmtree, copy.parent, True)
        logging.getLogger(__name__).info("%s is read-only: reading a copy of its store", db_path.parent)
        return copy

    def update(self, docs, key=None):
        """maggma's MontyStore.update does one replace_one (a scan of the sqlite file) per
        document: quadratic, 12 s for 500 documents here. One delete_many + insert_many of the
        batch keeps the upsert semantics in one scan (per-structure collections write 10^4)."""
        if isinstance(docs, list) and len(docs) > 1 and isinstance(key or self.key, str):
            return self._bulk_replace(docs, key or self.key)
        try:
            return super().update(docs, key)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise self._fail(exc) from None

    def _bulk_replace(self, docs: list, key: str):
        from monty.json import jsanitize

        latest = {}
        for d in docs:
            d = jsanitize(d, allow_bson=True)
            latest[d[key]] = d  # the last document of a key wins, as with replace_one
        try:
            if self._file.exists():  # montydb creates the collection's table on the first insert
                self._collection.delete_many({key: {"$in": list(latest)}})
            else:
                self._file.parent.mkdir(parents=True, exist_ok=True)
            self._collection.insert_many(list(latest.values()))
        except (sqlite3.DatabaseError, OSError) as exc:
            raise self._fail(exc) from None

    def query(self, *args, **kwargs):
        try:
            yield from super().query(*args, **kwargs)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise self._fail(exc) from None

    def close(self):
        super().close()
        if self._locked:
            from cscflow.runlock import release

            release(Path(self.database_path).parent)
            self._locked = False


def _embedded_store(settings: StoreSettings, run_dir: Path, run_lock: bool = False) -> JobStore:
    db_path = run_dir / "store"
    common = {"database_path": str(db_path), "database_name": settings.database, "storage": "sqlite"}
    docs = RunDirStore(settings.docs_collection, key="uuid", run_lock=run_lock, **common)
    data = RunDirStore(settings.data_collection, key="blob_uuid", **common)
    return JobStore(docs, additional_stores={"data": data})


def journaled_kwargs(uri: str = "") -> dict:
    """MongoClient kwargs for a journaled write concern, unless the URI chooses its own."""
    from urllib.parse import parse_qs, urlsplit

    options = {k.lower() for k in parse_qs(urlsplit(uri).query)} if "?" in uri else set()
    return {} if options & {"journal", "j", "w"} else dict(JOURNALED)


def _mongo_store(settings: StoreSettings) -> JobStore:
    import pymongo
    from maggma.stores import GridFSStore, MongoStore

    uri = expand_env(settings.uri)
    try:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=settings.timeout_ms)
        client.admin.command("ping")
    except Exception as exc:  # pymongo raises many kinds; all mean "cannot use it"
        raise StoreError(
            f"cannot reach MongoDB at {redact_uri(uri)} within "
            f"{settings.timeout_ms / 1000:g} s ({type(exc).__name__}); check store.uri"
            + ("; for a `cscflow submit --local` run: cscflow server start RUN_DIR" if "127.0.0.1" in uri else "")
        ) from None
    finally:
        try:
            client.close()
        except Exception:
            pass
    client_kwargs = {**journaled_kwargs(uri), "serverSelectionTimeoutMS": settings.timeout_ms}
    docs = MongoStore(settings.database, settings.docs_collection, uri=uri, key="uuid", mongoclient_kwargs=client_kwargs)
    data = GridFSStore(settings.database, settings.data_collection, uri=uri, mongoclient_kwargs=journaled_kwargs(uri))
    return JobStore(docs, additional_stores={"data": data})
