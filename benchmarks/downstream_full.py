"""Full-protocol downstream benchmark (paper 000 SI 1.3-1.4): QHA phase diagrams + MD screening.

Meant for a GPU node: per structure the QHA is 7 volumes x phonopy displacements in >= 12 Å
supercells, and the MD is 10 ps NPT + 60 ps NVT (35,000 steps of 2 fs) in >= 10 Å cells.

    OMP_NUM_THREADS=1 python benchmarks/downstream_full.py --out bench_downstream \
        [--data ../shared/data/lips.json] [--ids mp-985583 mp-1153 ...] [--model frozen.pth] \
        [--device cuda] [--only qha|conductivity] [--limit 8]

Without --ids: Li-P-S MP structures that pass the conductivity filters (E_hull filter off, MP
energies are not available offline) and, for the QHA, those plus the elemental references.
Prints wall time per phase and per structure; writes tables and figures to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pymatgen.core import Structure

from cscflow.config import ForceFieldSettings
from cscflow.downstream.conductivity import ConductivitySettings, screen_conductivity, write_conductivity_report
from cscflow.downstream.qha import QhaSettings, run_qha, write_qha_report


def load(data: Path, ids: list[str] | None) -> list[Structure]:
    out = []
    for rec in json.loads(data.read_text()):
        if ids and rec["id"] not in ids:
            continue
        s = Structure.from_str(rec["cif"], fmt="cif")
        s.properties["id"] = rec["id"]
        out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/lips.json")
    ap.add_argument("--ids", nargs="*")
    ap.add_argument("--model", type=Path, help="frozen DeePMD model; default CHGNet 0.3.0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["qha", "conductivity"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench_downstream"))
    args = ap.parse_args()

    ff = ForceFieldSettings(device=args.device)
    structures = load(args.data, args.ids)
    timings = {}
    if args.only in (None, "conductivity"):
        settings = ConductivitySettings(e_hull_max=None)
        start = time.perf_counter()
        out = screen_conductivity(structures[: args.limit] if args.ids else
                                  [s for s in structures if s.composition.get_atomic_fraction("P") > 0][: args.limit],
                                  ff, settings, args.model)
        timings["conductivity_total"] = time.perf_counter() - start
        write_conductivity_report(out, args.out / "conductivity")
        for r in out.results:
            if r.status != "screened_out":
                print(f"MD {r.id:12s} {r.formula:10s} {r.status:6s} atoms={r.n_atoms_md} sigma={r.sigma} "
                      f"D={r.diffusivity} s={r.seconds} {r.reason or ''}")
    if args.only in (None, "qha"):
        settings = QhaSettings()
        chosen = structures if args.ids else [s for s in structures if len(s) <= 32][: args.limit]
        start = time.perf_counter()
        out = run_qha(chosen, ff, settings, args.model)
        timings["qha_total"] = time.perf_counter() - start
        write_qha_report(out, args.out / "qha")
        for r in out.results:
            print(f"QHA {r.id:12s} {r.formula:10s} {r.status:6s} supercell={r.supercell} s={r.seconds} {r.reason or ''}")
    print("timings (s):", json.dumps(timings))
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
