"""One document per structure: candidates and frames live in their own store collections.

A paper-size iteration has ~10^4 candidates and ~10^4 frames; as lists inside stage
outputs they make 37-44 MB documents (MongoDB refuses > 16 MB) that every later stage
reloads whole. Instead a stage writes each candidate / frame as its own document to the
``candidates`` / ``frames`` collection beside the run's job documents (same MontyDB or
MongoDB database, like :mod:`cscflow.energies`), and its output carries a
:class:`CandidateSet` / :class:`FrameSet`: the store keys in order, and counts.

Keys are ``"<job uuid>/<candidate or frame id>"``: a stage that runs again (resume, a
rerun Firework) overwrites its own documents, never another stage's, and the same id in
two runs sharing a database never collides. Every document also carries ``run_id``,
``iteration``, ``stage``, ``formula``, ``status`` and ``model`` (indexed) so reports and
queries select by field instead of loading a run.

A job without such a store (a Maker run on its own with an in-memory JobStore, no
``expose_store``; a jobflow-remote worker, which runs each job on a private file store and
has no database access) keeps the documents inline in the set (``items``). Stage jobs route
their set to the JobStore's ``data`` store (``@job(data=[...])``), so an inline set of a
paper-size iteration still stays out of the 16 MB job document, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from cscflow.schemas import Candidate, Frame

__all__ = [
    "CANDIDATES",
    "FRAMES",
    "CandidateSet",
    "FrameSet",
    "as_documents",
    "collection_for",
    "load_candidates",
    "load_frames",
    "merge_sets",
    "save_candidates",
    "save_frames",
    "shards",
]

logger = logging.getLogger(__name__)

CANDIDATES, FRAMES = "candidates", "frames"
KEY = "key"
INDEXED = (KEY, "job_uuid", "run_id", "iteration", "stage", "formula", "status", "model")
READ_CHUNK = 2000  # keys per $in query when a set spans many jobs


class _StructureSet(BaseModel):
    collection: ClassVar[str]
    keys: list[str] = Field(default_factory=list, description="store keys '<job uuid>/<id>', in order")
    ids: list[str] = Field(default_factory=list, description="candidate / frame ids, same order")

    def __len__(self) -> int:
        return len(self.ids)

    def members(self, store=None) -> list:
        """The documents, read from `store` (default: the running job's) unless inline."""
        return _load(self, _MODELS[self.collection], store)

    # A set reads like the list it replaces: iterating loads the members (from the running
    # job's store when they are stored; outside a job use members(store)).
    def __iter__(self):  # type: ignore[override]
        return iter(self.members())

    def __getitem__(self, index):
        return self.members()[index]


class CandidateSet(_StructureSet):
    """Candidates written by one or more jobs, by store key; ``items`` only without a store."""

    collection: ClassVar[str] = CANDIDATES
    items: list[Candidate] | None = Field(None, description="the candidates, inline, when no store was available")


class FrameSet(_StructureSet):
    """Labelled frames written by one or more jobs, by store key; ``items`` only without a store."""

    collection: ClassVar[str] = FRAMES
    items: list[Frame] | None = Field(None, description="the frames, inline, when no store was available")


_MODELS = {CANDIDATES: Candidate, FRAMES: Frame}

# --------------------------------------------------------------------------- the collections


def collection_for(job_store, name: str, key: str = KEY):
    """The maggma store of collection `name` (documents keyed by `key`) for a JobStore: its
    additional store of that name, else a collection beside its docs store (same database).
    None for a plain in-memory store (nothing later jobs could read) or no store."""
    if job_store is None:
        return None
    store = getattr(job_store, "additional_stores", {}).get(name)
    if store is not None:
        return store
    docs = job_store.docs_store
    from maggma.stores import JSONStore, MemoryStore

    # MontyStore subclasses MemoryStore but is persistent; a plain MemoryStore is not shared.
    # File stores are a job's private copy: jobflow-remote runs every job on such a store and
    # uploads only its outputs, so documents written beside it would never reach the next job.
    if type(docs) is MemoryStore or isinstance(docs, JSONStore) or not hasattr(docs, "collection_name"):
        return None
    if type(docs).__module__.startswith("jobflow_remote."):
        return None
    spec = docs.as_dict()
    spec.update(collection_name=name, key=key)
    spec.pop("run_lock", None)  # the docs store holds the run directory's lock, not this one
    return type(docs).from_dict(spec)


def _connected(store):
    store.connect()
    for name in INDEXED:
        try:
            store.ensure_index(name)
        except Exception:  # MontyDB indexes lazily or not at all
            pass
    return store


def _current():
    from jobflow import CURRENT_JOB

    return CURRENT_JOB.job, CURRENT_JOB.store


def _encode(doc: BaseModel) -> dict:
    from monty.json import jsanitize

    return jsanitize(doc.model_dump(), strict=True, allow_bson=True, enum_values=True)


def as_documents(model, items) -> list:
    """Validate documents (objects, their dict form, or stored documents) into `model`."""
    from pymatgen.core import Structure

    fields = model.model_fields
    out = []
    for item in items or []:
        if isinstance(item, model):
            out.append(item)
            continue
        data = {k: v for k, v in dict(item).items() if k in fields}
        if isinstance(data.get("structure"), dict):
            data["structure"] = Structure.from_dict(data["structure"])
        out.append(model.model_validate(data))
    return out


def _save(items: Sequence[BaseModel], set_type, fields, stage: str | None, store=None, job_=None):
    ids = [doc_id for doc_id, _ in fields]
    if job_ is None and store is None:
        job_, store = _current()
    collection = collection_for(store, set_type.collection) if store is not None else None
    if collection is None or job_ is None:
        return set_type(ids=ids, items=list(items))
    meta = job_.metadata or {}
    keys = [f"{job_.uuid}/{i}" for i in ids]
    docs = []
    for position, (item, key, (_, extra)) in enumerate(zip(items, keys, fields)):
        docs.append({
            **_encode(item),
            KEY: key,
            "id": ids[position],
            "job_uuid": job_.uuid,
            "run_id": meta.get("run_id"),
            "stage": stage or meta.get("stage"),
            "position": position,
            **extra,
        })
    _connected(collection)
    try:
        collection.update(docs, key=KEY)
    finally:
        collection.close()
    return set_type(keys=keys, ids=ids)


def save_candidates(candidates: Sequence[Candidate], stage: str | None = None, store=None, job_=None) -> CandidateSet:
    """Write one document per candidate for the running job; the set of their keys."""
    fields = [
        (c.id, {
            "iteration": c.provenance.iteration,
            "formula": c.formula,
            "n_sites": len(c.structure),
            "is_sun": c.is_sun,
        })
        for c in candidates
    ]
    return _save(list(candidates), CandidateSet, fields, stage, store, job_)


def save_frames(frames: Sequence[Frame], stage: str | None = None, store=None, job_=None) -> FrameSet:
    """Write one document per frame for the running job; the set of their keys."""
    fields = [
        (f.frame_id, {
            "iteration": f.provenance.iteration,
            "candidate_id": f.provenance.candidate_id,
            "formula": f.structure.composition.reduced_formula,
            "n_sites": len(f.structure),
            "status": f.kind,
            "model": f.labeller,
        })
        for f in frames
    ]
    return _save(list(frames), FrameSet, fields, stage, store, job_)


def merge_sets(sets: Iterable, set_type=None):
    """One set holding every member of `sets` (lists, sets or their dict forms), in order."""
    keys, ids, items, inline = [], [], [], False
    parts = list(_parts(sets))
    if set_type is None:
        set_type = type(parts[0]) if parts and isinstance(parts[0], _StructureSet) else CandidateSet
    for part in parts:
        if isinstance(part, _StructureSet):
            if part.items is not None:
                inline = True
                items.extend(part.items)
            keys.extend(part.keys)
            ids.extend(part.ids)
        else:
            inline = True
            items.append(part)
    if inline and keys:
        raise ValueError("cannot merge stored and inline structure sets")
    if inline:
        model = Candidate if set_type is CandidateSet else Frame
        items = as_documents(model, items)
        id_of = (lambda c: c.id) if model is Candidate else (lambda f: f.frame_id)
        return set_type(ids=[id_of(x) for x in items], items=items)
    return set_type(keys=keys, ids=ids)


def shards(obj, size: int) -> list:
    """Consecutive pieces of at most `size` members, order kept, none empty: a stored set is
    cut into smaller sets of keys (nothing is read), a list into lists."""
    if size < 1:
        raise ValueError(f"shard size must be at least 1, got {size}")
    if isinstance(obj, dict):
        obj = next(iter(_parts(obj)))
    if isinstance(obj, _StructureSet) and obj.items is None:
        return [type(obj)(keys=obj.keys[i:i + size], ids=obj.ids[i:i + size]) for i in range(0, len(obj), size)]
    items = list(obj) if isinstance(obj, (list, tuple)) else obj.members()
    return [items[i:i + size] for i in range(0, len(items), size)]


def _parts(obj) -> Iterable:
    """Flatten lists of sets / documents; decode dict forms of sets."""
    if obj is None:
        return
    if isinstance(obj, _StructureSet):
        yield obj
    elif isinstance(obj, dict):
        cls = obj.get("@class")
        if cls in ("CandidateSet", "FrameSet") or cls is None and {"keys", "ids"} <= set(obj):
            items = obj.get("items") or []
            is_frames = cls == "FrameSet" or cls is None and any("frame_id" in i for i in items if isinstance(i, dict))
            set_type = FrameSet if is_frames else CandidateSet
            yield set_type.model_validate({k: v for k, v in obj.items() if not k.startswith("@") and k != "items"})
            if items:
                yield from _parts(items)
        else:
            yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _parts(item)
    else:
        yield obj


def _load(obj, model, store) -> list:
    out: list = []
    pending: list[str] = []

    def flush():
        if pending:
            out.extend(_read(list(pending), model, store))
            pending.clear()

    for part in _parts(obj):
        if isinstance(part, _StructureSet):
            if part.items is not None:
                flush()
                out.extend(as_documents(model, part.items))
            else:
                pending.extend(part.keys)
        else:
            flush()
            if not isinstance(part, (dict, model)):
                raise TypeError(f"expected {model.__name__}, a list of them or a set, got {type(part).__name__}")
            if isinstance(part, dict) and "@module" in part:
                from monty.json import MontyDecoder

                part = MontyDecoder().process_decoded(part)
            out.extend(as_documents(model, [part]))
    flush()
    return out


def _read(keys: list[str], model, store) -> list:
    if store is None:
        _, store = _current()
    collection = collection_for(store, CANDIDATES if model is Candidate else FRAMES) if store is not None else None
    if collection is None:
        raise LookupError(
            f"{len(keys)} stored {model.__name__.lower()}s cannot be read: the job has no run store "
            "(set expose_store on the job, or pass the store)"
        )
    _connected(collection)
    found: dict[str, Any] = {}
    try:
        jobs = sorted({k.split("/", 1)[0] for k in keys})
        wanted = set(keys)
        if len(jobs) <= 64:  # one query per writing job: a scan of its documents, no huge $in
            criteria = {"job_uuid": {"$in": jobs}}
            for doc in collection.query(criteria=criteria):
                if doc[KEY] in wanted:
                    found[doc[KEY]] = doc
        else:
            for start in range(0, len(keys), READ_CHUNK):
                for doc in collection.query(criteria={KEY: {"$in": keys[start:start + READ_CHUNK]}}):
                    found[doc[KEY]] = doc
    finally:
        collection.close()
    missing = [k for k in keys if k not in found]
    if missing:
        raise LookupError(
            f"{len(missing)} of {len(keys)} {model.__name__.lower()} documents are missing from the "
            f"{collection.collection_name!r} collection (first: {missing[0]})"
        )
    return as_documents(model, [found[k] for k in keys])


def load_candidates(obj, store=None) -> list[Candidate]:
    """Candidates from a CandidateSet, a list of sets, Candidates or their dict forms.

    Stored members are read from `store` (default: the running job's store)."""
    return _load(obj, Candidate, store)


def load_frames(obj, store=None) -> list[Frame]:
    """Frames from a FrameSet, a list of sets, Frames or their dict forms (see load_candidates)."""
    return _load(obj, Frame, store)
