"""The jobflow JobStore a run writes to, built from the spec's store settings.

Embedded default: two persistent MontyStores (sqlite) in the run directory, one for
job documents and one `data` additional store for large arrays. With a MongoDB URI:
MongoStore + GridFS. JSONStore is never used: it collapses documents that share a
uuid (dynamic flows re-use uuids with a new index) and loses outputs.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from jobflow import JobStore

from cscflow.config import StoreSettings

__all__ = ["StoreError", "build_job_store", "expand_env", "redact_uri"]


class StoreError(RuntimeError):
    """The results store cannot be reached or opened."""


def redact_uri(uri: str) -> str:
    """Hide credentials in a MongoDB URI before it reaches a log or an error."""
    if "@" not in uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


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


def build_job_store(settings: StoreSettings, run_dir: str | Path | None = None) -> JobStore:
    """Build the JobStore: MongoDB when `settings.uri` is set, else MontyStore in run_dir."""
    if settings.uri:
        return _mongo_store(settings)
    if run_dir is None:
        raise ValueError("the embedded store needs a run directory")
    # Absolute: run_locally chdirs into job folders before jobs connect, and a relative path
    # would silently open a fresh, empty store there.
    return _embedded_store(settings, Path(run_dir).resolve())


def _embedded_store(settings: StoreSettings, run_dir: Path) -> JobStore:
    from maggma.stores import MontyStore

    db_path = run_dir / "store"
    db_path.mkdir(parents=True, exist_ok=True)
    common = {"database_path": str(db_path), "database_name": settings.database, "storage": "sqlite"}
    docs = MontyStore(settings.docs_collection, key="uuid", **common)
    data = MontyStore(settings.data_collection, key="blob_uuid", **common)
    return JobStore(docs, additional_stores={"data": data})


def _mongo_store(settings: StoreSettings) -> JobStore:
    import pymongo
    from maggma.stores import MongoURIStore
    from maggma.stores.gridfs import GridFSURIStore

    uri = expand_env(settings.uri)
    try:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=settings.timeout_ms)
        client.admin.command("ping")
    except Exception as exc:  # pymongo raises many kinds; all mean "cannot use it"
        raise StoreError(
            f"cannot reach MongoDB at {redact_uri(uri)} within "
            f"{settings.timeout_ms / 1000:g} s ({type(exc).__name__}); check store.uri"
        ) from None
    finally:
        try:
            client.close()
        except Exception:
            pass
    kwargs = {"database": settings.database, "mongoclient_kwargs": {"serverSelectionTimeoutMS": settings.timeout_ms}}
    docs = MongoURIStore(uri, settings.docs_collection, key="uuid", **kwargs)
    data = GridFSURIStore(uri, settings.data_collection, **{k: v for k, v in kwargs.items() if k == "database"})
    return JobStore(docs, additional_stores={"data": data})
