"""Relaxation throughput of cscflow.relax with CHGNet: structures/s and optimizer steps/s.

Not a test: a measurement to size relax jobs (how many candidates one GPU/CPU worker
relaxes per hour). Structures come either from the Materials Project records in
``../shared/data/<system>.json`` (``--source mp``, rattled so the optimizer has work) or
from the pyxtal generator (``--source pyxtal``, random symmetric crystals as in the loop).
The CHGNet load and the first call are timed separately (warm-up) and not counted.

Usage (from the repository root, with the project's virtualenv)::

    OMP_NUM_THREADS=1 python benchmarks/relax_throughput.py --n 16
    OMP_NUM_THREADS=1 python benchmarks/relax_throughput.py --source pyxtal --n 32 --max-atoms 12
    python benchmarks/relax_throughput.py --device cuda --optimizer BFGS --cell-filter exp --json out.json

Prints one summary line (and writes it as JSON with ``--json``): structures/s, steps/s,
mean steps per structure, converged and rejected counts, reject reasons.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def mp_candidates(data: Path, n: int, max_atoms: int, rattle: float, seed: int):
    """Up to n MP structures with at most max_atoms sites, each rattled by N(0, rattle) Å."""
    from pymatgen.core import Structure

    from cscflow.schemas import Candidate, Provenance

    if not data.is_file():
        sys.exit(f"relax_throughput: data file not found: {data} (use --data)")
    rng = np.random.default_rng(seed)
    records = [r for r in json.loads(data.read_text()) if int(r.get("nsites", 0)) <= max_atoms]
    if not records:
        sys.exit(f"relax_throughput: no structure in {data} has <= {max_atoms} sites")
    out = []
    for i in range(n):
        rec = records[i % len(records)]
        s = Structure.from_str(rec["cif"], fmt="cif")
        coords = s.cart_coords + rng.normal(0.0, rattle, (len(s), 3))
        s = Structure(s.lattice, s.species, coords, coords_are_cartesian=True)
        prov = Provenance(candidate_id=f"bench-{i:04d}-{rec['id']}", iteration=0, generator="seed")
        out.append(Candidate(provenance=prov, structure=s))
    return out


def pyxtal_candidates(elements: list[str], n: int, max_atoms: int, seed: int):
    from cscflow.config import ChemicalSystem, GeneratorSettings
    from cscflow.generators import generate_candidates

    chem = ChemicalSystem(elements=elements, min_atoms=2, max_atoms=max_atoms)
    settings = GeneratorSettings(backend="pyxtal", num_per_condition=n, conditions=[0.0])
    candidates, failures = generate_candidates(chem, settings, iteration=0, seed=seed)
    if failures:
        print(f"generator failures: {dict(failures)}", file=sys.stderr)
    return candidates[:n]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="number of structures")
    p.add_argument("--source", choices=["mp", "pyxtal"], default="mp")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lips.json")
    p.add_argument("--elements", default="Li,P,S", help="pyxtal: chemical system")
    p.add_argument("--max-atoms", type=int, default=16)
    p.add_argument("--rattle", type=float, default=0.1, help="mp: Å, std of the rattle")
    p.add_argument("--chgnet-version", default="0.3.0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizer", choices=["FIRE", "BFGS", "LBFGS"], default="FIRE")
    p.add_argument("--cell-filter", choices=["frechet", "exp", "none"], default="frechet")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    if os.environ.get("OMP_NUM_THREADS") is None:
        print("note: OMP_NUM_THREADS is unset; CHGNet on CPU is ~10x faster with 1", file=sys.stderr)

    from cscflow.config import ForceFieldSettings, RelaxSettings
    from cscflow.forcefields import get_calculator, model_tag, single_points
    from cscflow.relax import relax_candidates

    if args.source == "mp":
        candidates = mp_candidates(args.data, args.n, args.max_atoms, args.rattle, args.seed)
    else:
        candidates = pyxtal_candidates(args.elements.split(","), args.n, args.max_atoms, args.seed)

    ff = ForceFieldSettings(chgnet_version=args.chgnet_version, device=args.device)
    settings = RelaxSettings(optimizer=args.optimizer, cell_filter=args.cell_filter,
                             fmax=args.fmax, steps=args.steps)
    t0 = time.perf_counter()
    calc = get_calculator(ff)
    single_points([candidates[0].structure], calc)  # warm-up
    warmup = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = relax_candidates(candidates, calc, settings, model_tag(ff), progress=True)
    seconds = time.perf_counter() - t0

    steps = sum(c.relax_steps or 0 for c in out)
    atoms = sum(len(c.structure) for c in out)
    summary = {
        "source": args.source,
        "n": len(out),
        "atoms": atoms,
        "device": args.device,
        "optimizer": args.optimizer,
        "cell_filter": args.cell_filter,
        "warmup_s": round(warmup, 2),
        "seconds": round(seconds, 2),
        "structures_per_s": round(len(out) / seconds, 3),
        "steps_per_s": round(steps / seconds, 2),
        "mean_steps": round(steps / len(out), 1),
        "converged": sum(bool(c.converged) for c in out),
        "rejected": sum(c.status == "rejected" for c in out),
        "reject_reasons": dict(Counter(c.reject_reason for c in out if c.reject_reason)),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
