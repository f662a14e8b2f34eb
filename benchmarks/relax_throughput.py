"""Relaxation throughput: batched (torch-sim) vs sequential (ASE), same model, same structures.

Not a test: a measurement to size relax jobs (how many candidates one GPU/CPU worker
relaxes per hour) and to check what batching buys. Both engines of ``cscflow.relax``
(``relax.engine: ase`` and ``torchsim``) relax the same candidates with the same CHGNet,
on the CPU and, when ``torch.cuda.is_available()``, on the GPU. Structures come either from
the Materials Project records in ``../shared/data/<system>.json`` (``--source mp``, rattled so
the optimizer has work) or from the pyxtal generator (``--source pyxtal``). The CHGNet load
and the first call are timed separately (warm-up) and not counted.

Usage (from the repository root, with the project's virtualenv)::

    OMP_NUM_THREADS=1 python benchmarks/relax_throughput.py --n 16
    OMP_NUM_THREADS=1 python benchmarks/relax_throughput.py --source pyxtal --n 32 --max-atoms 12
    python benchmarks/relax_throughput.py --n 512 --devices cuda --json out.json

Prints one JSON line per (device, engine): structures/s, steps/s, mean steps per structure,
converged and rejected counts; then per device the ratio batched / sequential and how far
the two engines' results are apart (max |ΔE| per atom, reject decisions that differ).
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
    order = rng.permutation(len(records))  # a mix of elements and binaries, not file order
    out = []
    for i in range(n):
        rec = records[order[i % len(records)]]
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


def run_engine(candidates, calc, settings, tag: str) -> tuple[list, float]:
    from cscflow.relax import relax_candidates

    t0 = time.perf_counter()
    out = relax_candidates(candidates, calc, settings, tag, progress=False)
    return out, time.perf_counter() - t0


def summarize(out, seconds: float, **extra) -> dict:
    steps = sum(c.relax_steps or 0 for c in out)
    return {
        **extra,
        "n": len(out),
        "atoms": sum(len(c.structure) for c in out),
        "seconds": round(seconds, 2),
        "structures_per_s": round(len(out) / seconds, 3),
        "steps_per_s": round(steps / seconds, 2),
        "mean_steps": round(steps / len(out), 1),
        "converged": sum(bool(c.converged) for c in out),
        "rejected": sum(c.status == "rejected" for c in out),
        "reject_reasons": dict(Counter(c.reject_reason for c in out if c.reject_reason)),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="number of structures")
    p.add_argument("--source", choices=["mp", "pyxtal"], default="mp")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lips.json")
    p.add_argument("--elements", default="Li,P,S", help="pyxtal: chemical system")
    p.add_argument("--max-atoms", type=int, default=16)
    p.add_argument("--rattle", type=float, default=0.1, help="mp: Å, std of the rattle")
    p.add_argument("--chgnet-version", default="0.3.0")
    p.add_argument("--devices", default=None,
                   help="comma-separated torch devices (default: cpu, plus cuda when available)")
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

    import torch

    from cscflow.config import ForceFieldSettings, RelaxSettings
    from cscflow.forcefields import get_calculator, model_tag, single_points

    devices = args.devices.split(",") if args.devices else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.source == "mp":
        candidates = mp_candidates(args.data, args.n, args.max_atoms, args.rattle, args.seed)
    else:
        candidates = pyxtal_candidates(args.elements.split(","), args.n, args.max_atoms, args.seed)

    report: dict = {"source": args.source, "n": len(candidates), "threads": torch.get_num_threads(),
                    "runs": [], "ratios": {}}
    for device in devices:
        ff = ForceFieldSettings(chgnet_version=args.chgnet_version, device=device)
        t0 = time.perf_counter()
        calc = get_calculator(ff)
        single_points([candidates[0].structure], calc)  # warm-up
        for engine in ("ase", "torchsim"):  # first-call imports and set-up of each engine
            run_engine(candidates[:1], calc, RelaxSettings(engine=engine, steps=2), "warm-up")
        warmup = time.perf_counter() - t0
        results = {}
        for engine in ("ase", "torchsim"):
            settings = RelaxSettings(engine=engine, optimizer="FIRE", cell_filter=args.cell_filter,
                                     fmax=args.fmax, steps=args.steps)
            out, seconds = run_engine(candidates, calc, settings, model_tag(ff))
            results[engine] = out
            row = summarize(out, seconds, device=device, engine=engine, warmup_s=round(warmup, 2))
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
        seq, bat = (next(r for r in report["runs"] if r["device"] == device and r["engine"] == e)
                    for e in ("ase", "torchsim"))
        de = [abs(a.energy_per_atom - b.energy_per_atom)
              for a, b in zip(results["ase"], results["torchsim"])
              if a.status == b.status == "relaxed"]
        report["ratios"][device] = ratio = {
            "sequential_structures_per_s": seq["structures_per_s"],
            "batched_structures_per_s": bat["structures_per_s"],
            "batched_over_sequential": round(bat["structures_per_s"] / seq["structures_per_s"], 2),
            "max_abs_dE_per_atom_eV": round(max(de), 6) if de else None,
            "decisions_differ": sum((a.status, a.reject_reason) != (b.status, b.reject_reason)
                                    for a, b in zip(results["ase"], results["torchsim"])),
        }
        print(f"{device}: sequential {ratio['sequential_structures_per_s']} structures/s, "
              f"batched {ratio['batched_structures_per_s']} structures/s, "
              f"ratio {ratio['batched_over_sequential']}x; max |dE| "
              f"{ratio['max_abs_dE_per_atom_eV']} eV/atom, {ratio['decisions_differ']} decisions differ",
              flush=True)
    if "cuda" not in devices:
        print("no GPU here (torch.cuda.is_available() is False): CPU numbers only")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
