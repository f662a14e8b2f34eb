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
import string
from pathlib import Path

from jobflow import JobStore

from cscflow.config import StoreSettings

__all__ = [
    "JOURNALED", "StoreError", "build_job_store", "check_no_credentials", "expand_env", "journaled_kwargs", "redact_uri",
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
