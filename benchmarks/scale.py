"""Bookkeeping stages at paper scale: wall time and peak memory vs N, growth exponent.

Not a test: a measurement (issue 13). Candidates are real MP Li-P-S structures from
``../shared/data/lips.json`` and rattled / strained / duplicated copies of them, with cheap
stand-in energies (elemental references + a formation term + noise; no force field), so
only the bookkeeping is timed:

- score: E_hull + S.U.N. of N candidates against the MP references and `--previous` x N
  earlier candidates that were scored before (so they carry their stored match keys);
  before/after in the same run: the all-pairs StructureMatcher comparison (what score did
  before) vs the incremental matcher, with a check that both give the same flags;
- select: E_hull bins + QUESTS entropy ranking against N/10 training frames;
- workflow: building iteration 1's FireWorks workflow of workflows/lips_paper.yaml with
  N candidates (cscflow.plan, Label fan-out included; nothing runs).

Peak memory is the process's peak RSS during the stage above its RSS before it
(/proc/self/clear_refs resets the peak). Usage, from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/scale.py --sizes 100 1000
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/scale.py --sizes 10000 --old-max 0 --skip workflow
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CSCFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
MU = {"Li": -1.90892, "P": -5.41330, "S": -4.13645}  # MP elemental references, eV/atom (shared/data)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(fn):
    """(result, wall seconds, peak RSS above the start in MB)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    rss0 = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    return out, wall, max(0.0, _rss_mb("VmHWM") - rss0)


def stand_in_energy(structure, rng) -> float:
    """Elemental references + a formation term that favours mixing + noise (eV/atom)."""
    comp = structure.composition.fractional_composition
    x = {el.symbol: comp[el] for el in comp.elements}
    base = sum(MU[el] * f for el, f in x.items())
    return base - 0.6 * (1 - max(x.values())) + float(rng.normal(0.0, 0.03))


def load_structures(max_atoms: int):
    from pymatgen.core import Structure

    records = json.loads((DATA / "lips.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = [(r["id"], Structure.from_str(r["cif"], fmt="cif")) for r in records]
    return [(i, s) for i, s in out if len(s) <= max_atoms]


def variant(s, rng):
    """A duplicate, a rattled copy, or a rattled and strained copy (some match, some not)."""
    t = s.copy()
    u = rng.random()
    if u < 0.2:
        return t
    t.perturb(float(rng.uniform(0.02, 0.4)), seed=int(rng.integers(2**31)))
    if u > 0.6:
        m = np.array(t.lattice.matrix)
        m[int(rng.integers(3))] *= float(rng.uniform(0.85, 1.35))
        t.lattice = type(t.lattice)(m)
    return t


def make_candidates(pool, n: int, iteration: int, rng):
    from cscflow.schemas import Candidate, Provenance

    out = []
    for i in range(n):
        mp_id, s = pool[int(rng.integers(len(pool)))]
        t = variant(s, rng)
        e = stand_in_energy(t, rng)
        out.append(Candidate(
            provenance=Provenance(candidate_id=f"it{iteration}-{i:06d}", iteration=iteration, generator="stand-in",
                                  parent=mp_id, condition={"e_hull": [0.0, 0.03, 0.06][i % 3]}),
            structure=t, status="relaxed", energy_per_atom=e, energy=e * len(t), model="stand-in",
        ))
    return out


def training_frames(pool, n: int):
    from cscflow.schemas import Frame, Provenance

    frames = []
    for i in range(n):
        mp_id, s = pool[i % len(pool)]
        frames.append(Frame(
            frame_id=f"f{i}", structure=s, energy=-4.0 * len(s), forces=[[0.0, 0.0, 0.0]] * len(s),
            kind="static", labeller="stand-in", provenance=Provenance(candidate_id=mp_id, iteration=0, generator="seed"),
        ))
    return frames


def fit_exponent(ns, ts) -> float | None:
    pts = [(n, t) for n, t in zip(ns, ts) if t and t > 0]
    if len(pts) < 2:
        return None
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--previous", type=float, default=1.0, help="earlier candidates = this x N")
    ap.add_argument("--old-max", type=int, default=1000, help="largest N for the all-pairs comparison")
    ap.add_argument("--max-atoms", type=int, default=40)
    ap.add_argument("--skip", nargs="*", default=[], choices=["select", "workflow"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from cscflow.config import ScoreSettings, SelectionSettings
    from cscflow.schemas import ReferenceEntry
    from cscflow.score import match_flags_all_pairs, score_candidates

    warnings.filterwarnings("ignore")
    pool = load_structures(args.max_atoms)
    rng = np.random.default_rng(args.seed)
    refs = [ReferenceEntry(entry_id=i, structure=s, energy_per_atom=stand_in_energy(s, rng), model="stand-in",
                           source="materials_project") for i, s in pool]
    print(f"# {len(pool)} MP Li-P-S structures (<= {args.max_atoms} atoms) as references and parents; "
          f"previous = {args.previous:g} x N; {os.cpu_count()} cores; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    rows, before_after = [], []
    if "select" not in args.skip:  # QUESTS compiles its numba kernels on first use: not timed
        from cscflow.select import select_candidates

        warm = score_candidates(make_candidates(pool, 8, 1, rng), refs, model="stand-in").candidates
        select_candidates(warm, SelectionSettings(), training_frames=training_frames(pool, 4), seed=0)

    for n in args.sizes:
        n_prev = int(args.previous * n)
        prev_raw = make_candidates(pool, n_prev, 1, rng)
        # earlier iteration: scored once before (untimed), so it carries its stored match keys
        prev = score_candidates(prev_raw, refs, model="stand-in").candidates if n_prev else []
        cur = make_candidates(pool, n, 2, rng)
        out, wall, peak = measure(lambda: score_candidates(cur, refs, [prev], model="stand-in"))
        rows.append(("score (incremental)", n, wall, peak))
        print(f"score      N={n:6d} prev={n_prev:6d}  {wall:8.1f} s  {peak:7.0f} MB  fits={out.n_matcher_fits}  "
              f"keys computed={out.n_match_keys}  S.U.N.={out.n_sun}", flush=True)
        old_wall = None
        if n <= args.old_max:
            known = [r.structure for r in refs] + [c.structure for c in prev]
            flags, old_wall, old_peak = measure(
                lambda: match_flags_all_pairs([c.structure for c in cur], known, ScoreSettings()))
            same = flags == [(c.is_unique, c.is_novel) for c in out.candidates]
            rows.append(("S.U.N. all pairs (before)", n, old_wall, old_peak))
            print(f"all-pairs  N={n:6d} prev={n_prev:6d}  {old_wall:8.1f} s  {old_peak:7.0f} MB  same flags: {same}",
                  flush=True)
        before_after.append((n, n_prev, old_wall, wall))

        if "select" not in args.skip:
            from cscflow.select import select_candidates

            frames = training_frames(pool, max(10, n // 10))
            sel, wall, peak = measure(lambda: select_candidates(out.candidates, SelectionSettings(), training_frames=frames, seed=0))
            rows.append(("select", n, wall, peak))
            print(f"select     N={n:6d}  {wall:8.1f} s  {peak:7.0f} MB  selected={len(sel.selected)}", flush=True)

        if "workflow" not in args.skip:
            from cscflow.plan import load_plan_spec, plan_iteration

            with tempfile.TemporaryDirectory() as tmp:
                spec, _ = load_plan_spec(REPO / "workflows" / "lips_paper.yaml", tmp)
                spec = spec.model_copy(update={"generator": spec.generator.model_copy(
                    update={"num_per_condition": max(1, n // 3)})})
                plan, wall, peak = measure(lambda: plan_iteration(spec))
            rows.append(("workflow (plan, iteration 1)", n, wall, peak))
            name, size = plan.largest_document
            print(f"workflow   N={n:6d}  {wall:8.1f} s  {peak:7.0f} MB  jobs={sum(plan.jobs_by_category.values())}  "
                  f"largest={size / 2**20:.1f} MB ({name})", flush=True)

    print("\n| stage | N | wall s | peak MB |\n| --- | ---: | ---: | ---: |")
    for stage, n, wall, peak in rows:
        print(f"| {stage} | {n} | {wall:.1f} | {peak:.0f} |")
    print("\n| stage | growth exponent (wall ~ N^k) |\n| --- | ---: |")
    for stage in dict.fromkeys(r[0] for r in rows):
        pts = [(n, w) for s, n, w, _ in rows if s == stage]
        k = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
        print(f"| {stage} | {'-' if k is None else f'{k:.2f}'} |")
    print("\n| N | previous | S.U.N. all pairs (before) s | score incremental (after) s | ratio |\n| ---: | ---: | ---: | ---: | ---: |")
    for n, n_prev, old, new in before_after:
        ratio = f"{old / new:.1f}x" if old else "-"
        print(f"| {n} | {n_prev} | {'-' if old is None else f'{old:.1f}'} | {new:.1f} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "before_after": before_after}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
