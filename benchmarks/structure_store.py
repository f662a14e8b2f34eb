"""Per-structure documents at paper scale: write and read N candidates one document each.

Not a test: a measurement (issue 13, item 1). Candidates are real MP Li-P-S structures
(``../shared/data/lips.json``) rattled into N copies; they are written by a job with
``cscflow.structure_store.save_candidates`` into the run's embedded store (sqlite
MontyDB, what a laptop run uses) and, with ``--mongo URI``, into a MongoDB (or a
MongoDB-wire server such as ``secantusd-py``), then read back by key
(``load_candidates``), as the next stage does. Prints wall times, documents per second,
the largest stored document and the stage output (the set of keys) size, and the ratio of
that output to the list of structures it replaces. Usage, from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/structure_store.py --sizes 1000 10000
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/structure_store.py --sizes 10000 --mongo mongodb://127.0.0.1:27017
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import bson
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CSCFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def candidates(n: int, rng):
    from pymatgen.core import Structure

    from cscflow.schemas import Candidate, Provenance

    import warnings

    records = json.loads((DATA / "lips.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool = [Structure.from_str(r["cif"], fmt="cif") for r in records]
    pool = [s for s in pool if len(s) <= 40]
    out = []
    for k in range(n):
        s = pool[int(rng.integers(len(pool)))].copy()
        s.perturb(0.05, seed=int(rng.integers(2**31)))
        out.append(Candidate(provenance=Provenance(candidate_id=f"it1-bench-{k:05d}", iteration=1, generator="bench"),
                             structure=s, status="relaxed", energy_per_atom=-4.0, energy=-4.0 * len(s), model="m"))
    return out


def measure(store, cands) -> dict:
    from jobflow import job, run_locally

    from cscflow.structure_store import CANDIDATES, collection_for, load_candidates, save_candidates

    timing: dict = {}

    @job
    def write():
        t0 = time.perf_counter()
        out = save_candidates(cands, "relax")
        timing["write"] = time.perf_counter() - t0
        return {"candidates": out}

    @job
    def read(cset):
        t0 = time.perf_counter()
        back = load_candidates(cset)
        timing["read"] = time.perf_counter() - t0
        return len(back)

    w = write()
    r = read(w.output["candidates"])
    for j in (w, r):
        j.config.expose_store = True
        j.metadata.update({"run_id": "bench", "stage": "relax"})
    responses = run_locally([w, r], store=store, ensure_success=True, log=False)
    assert responses[r.uuid][1].output == len(cands)
    output = responses[w.uuid][1].output
    collection = collection_for(store, CANDIDATES)
    collection.connect()
    largest = max(len(bson.encode({k: v for k, v in d.items() if k != "_id"})) for d in collection.query({"run_id": "bench"}))
    collection.close()
    from monty.json import jsanitize

    as_list = len(bson.encode({"candidates": jsanitize(cands, strict=True, allow_bson=True)}))
    keys = len(bson.encode({"candidates": jsanitize(output["candidates"], strict=True, allow_bson=True)}))
    return {**timing, "largest": largest, "keys": keys, "as_list": as_list}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--mongo", default=None, help="also measure on this MongoDB URI")
    args = parser.parse_args()
    from cscflow.config import StoreSettings
    from cscflow.stores import build_job_store

    rng = np.random.default_rng(0)
    print(f"# benchmarks/structure_store.py --sizes {' '.join(map(str, args.sizes))}; "
          f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| store | N | write s | read s | docs/s write | docs/s read | largest doc KB | output (keys) MB | as one list MB | list/keys |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        cands = candidates(n, rng)
        backends = [("embedded (sqlite)", None)] + ([("mongodb", args.mongo)] if args.mongo else [])
        for name, uri in backends:
            with tempfile.TemporaryDirectory() as tmp:
                os.chdir(tmp)
                settings = StoreSettings(uri=uri, database=f"bench{n}") if uri else StoreSettings()
                m = measure(build_job_store(settings, tmp), cands)
            print(f"| {name} | {n} | {m['write']:.1f} | {m['read']:.1f} | {n / m['write']:.0f} | {n / m['read']:.0f} | "
                  f"{m['largest'] / 1024:.1f} | {m['keys'] / 2**20:.2f} | {m['as_list'] / 2**20:.1f} | "
                  f"{m['as_list'] / m['keys']:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
