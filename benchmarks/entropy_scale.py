"""Cost of the entropy stages at 10^3, 10^4, 10^5 environments (issue 13 item 6).

Not a test: time and peak memory of
- descriptors (QUESTS, once per frame),
- H (eq. 1) exact over all environments (``cscflow.entropy.entropy``) where affordable, and
  the Monte-Carlo estimator (``entropy_estimate``) with its stated standard error and its
  measured error against the exact value,
- δH (eq. 2) of 10 % of the frames against the other 90 %,
- the greedy δH ranking of `--select` of the frames (with H along it for dH/dN).
Frames are rattled, strained copies of real Materials Project Li-P-S structures from
``../shared/data/lips.json``. Each measurement runs in a spawned child so its peak RSS is
its own. The device is 'auto': CUDA through ``quests.gpu`` when torch sees a GPU.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/entropy_scale.py
    python benchmarks/entropy_scale.py --sizes 1000 10000 100000 --exact-max 20000 --queries 5000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def frames_with_environments(n_env: int, seed: int = 0, max_atoms: int = 40):
    """Rattled (σ 0.1 Å) and strained (2 %) MP Li-P-S structures until >= n_env atoms."""
    from pymatgen.core import Structure

    records = json.loads((REPO.parent / "shared" / "data" / "lips.json").read_text())
    base = [Structure.from_str(r["cif"], fmt="cif") for r in records]
    base = [s for s in base if len(s) <= max_atoms]
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < n_env:
        s0 = base[int(rng.integers(len(base)))]
        strain = np.eye(3) + rng.normal(0, 0.02, (3, 3))
        cart = s0.cart_coords @ strain + rng.normal(0, 0.1, (len(s0), 3))
        out.append(Structure(s0.lattice.matrix @ strain, s0.species, cart, coords_are_cartesian=True))
        total += len(s0)
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _warm():
    """Load QUESTS' numba kernels (compiled once, cached on disk) before any timing."""
    warm = np.random.default_rng(0).normal(size=(50, 63))
    run_h(warm, 0.015, 2000), run_estimate(warm, 0.015, 10, 2000), run_greedy([warm[:25], warm[25:]], 2, 0.015, 2000)


def _child(fn, args, queue):
    _warm()
    base = _rss_mb()
    t0 = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((value, seconds, peak, max(0.0, peak - base)))


def measure(fn, *args):
    """(value, seconds, peak RSS MB, peak above the child's start MB) of fn(*args) in a
    spawned child (numba's OpenMP layer forbids fork)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_h(x, h, batch):
    from cscflow.entropy import entropy

    return entropy(x, h, batch_size=batch)


def run_estimate(x, h, queries, batch):
    from cscflow.entropy import entropy_estimate

    return entropy_estimate(x, queries, h, seed=1, batch_size=batch)


def run_dh(y, x, h, batch):
    from cscflow.entropy import delta_entropy

    return float(np.mean(np.minimum(delta_entropy(y, x, h, batch_size=batch), 708.0)))


def run_greedy(desc, n_select, h, batch):
    from cscflow.entropy import greedy_entropy_ranking

    r = greedy_entropy_ranking(desc, n_select, bandwidth=h, batch_size=batch)
    return r.entropy[-1], r.n_environments[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--exact-max", type=int, default=20000, help="exact H only up to this many environments")
    p.add_argument("--queries", type=int, default=5000, help="estimator query environments")
    p.add_argument("--select", type=float, default=0.05, help="fraction of frames the greedy ranking picks")
    p.add_argument("--bandwidth", type=float, default=0.015)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from cscflow.entropy import resolve_device, stack_descriptors, structure_descriptors

    device = resolve_device("auto")
    h, batch = args.bandwidth, args.batch_size
    _warm()  # compiles QUESTS' numba kernels once (cached on disk)

    rows = []
    print(f"device={device} cores={os.cpu_count()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"bandwidth={h} batch={batch}")
    for n_env in args.sizes:
        structures = frames_with_environments(n_env)
        t0 = time.perf_counter()
        desc = structure_descriptors(structures)
        t_desc = time.perf_counter() - t0
        x = stack_descriptors(desc)
        row = {"environments": len(x), "frames": len(desc), "descriptors_s": round(t_desc, 2)}
        exact = None
        if len(x) <= args.exact_max:
            exact, sec, peak, extra = measure(run_h, x, h, batch)
            row.update(H=round(exact, 4), H_s=round(sec, 2), H_peak_mb=round(peak), H_extra_mb=round(extra))
        (est, err), sec, peak, extra = measure(run_estimate, x, h, args.queries, batch)
        row.update(H_est=round(est, 4), H_est_stderr=round(err, 4), H_est_s=round(sec, 2), H_est_extra_mb=round(extra))
        if exact is not None:
            row["H_est_error"] = round(est - exact, 4)
        n_y = max(1, len(desc) // 10)
        y, rest = stack_descriptors(desc[:n_y]), stack_descriptors(desc[n_y:])
        _, sec, peak, extra = measure(run_dh, y, rest, h, batch)
        row.update(dH_pairs=f"{len(y)}x{len(rest)}", dH_s=round(sec, 2), dH_extra_mb=round(extra))
        n_sel = max(2, int(round(args.select * len(desc))))
        (h_sel, n_sel_env), sec, peak, extra = measure(run_greedy, desc, n_sel, h, batch)
        row.update(greedy_frames=n_sel, greedy_envs=n_sel_env, greedy_s=round(sec, 2), greedy_extra_mb=round(extra))
        rows.append(row)
        print(json.dumps(row), flush=True)
    for a, b in zip(rows, rows[1:]):  # growth between consecutive sizes, same run
        ratio = b["environments"] / a["environments"]
        for key in ("descriptors_s", "H_est_s", "dH_s", "greedy_s"):
            if a[key] > 0:
                print(f"{key}: x{b[key] / a[key]:.1f} for x{ratio:.0f} environments "
                      f"(exponent {np.log(max(b[key], 1e-9) / a[key]) / np.log(ratio):.2f})")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
