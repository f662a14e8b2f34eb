"""MatterGen generation throughput (structures/s) vs batch size and diffusion steps.

Runs unchanged on CPU and on a CUDA GPU (device "auto"); reports seconds per 1,000
structures. Needs the MatterGen environment (scripts/bootstrap-mattergen) and a checkpoint
with the chemical_system + energy_above_hull adapters (MatterGen's released
chemical_system_energy_above_hull model on clusters; a tiny test model here).

    python benchmarks/mattergen_throughput.py CHECKPOINT [--batch-sizes 4 16] [--steps 20 100]
        [--n 32] [--device auto] [--json out.json]

Throughput counts every draw (accepted or rejected by the lattice guard): it measures the
sampler, not the model's quality; the acceptance fraction is printed next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cscflow.generators.mattergen import MatterGenWorker  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    p.add_argument("--n", type=int, default=32, help="structures per measurement")
    p.add_argument("--chemsys", default="Li-P-S")
    p.add_argument("--e-hull", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    with MatterGenWorker() as w:
        env = w.ping()
        print(f"# torch {env['torch']}  cuda {env['cuda']}  compat scatter {env['compat_scatter']}")
        for steps in a.steps:
            info = w.load(a.checkpoint, device=a.device, num_steps=steps)
            # warm-up (graph construction, CUDA kernels) not timed
            w.sample(a.checkpoint, min(a.batch_sizes), {"chemical_system": a.chemsys, "energy_above_hull": a.e_hull},
                     batch_size=min(a.batch_sizes), seed=0, device=a.device, num_steps=steps,
                     num_atoms_distribution=None if info["meta"].get("num_atoms_distribution") else {"8": 1.0})
            for bs in a.batch_sizes:
                t0 = time.perf_counter()
                _, res = w.sample(a.checkpoint, a.n, {"chemical_system": a.chemsys, "energy_above_hull": a.e_hull},
                                  batch_size=bs, seed=1, device=a.device, num_steps=steps, guidance_factor=a.guidance,
                                  num_atoms_distribution=None if info["meta"].get("num_atoms_distribution") else {"8": 1.0})
                wall = time.perf_counter() - t0
                row = {"device": info["device"], "steps": steps, "batch_size": bs, "n": a.n,
                       "seconds": res["seconds"], "wall_seconds": wall,
                       "structures_per_s": a.n / res["seconds"], "s_per_1000": 1000 * res["seconds"] / a.n,
                       "accepted_fraction": res["n_accepted"] / a.n, "n_parameters": info["n_parameters"]}
                rows.append(row)
                print(f"{row['device']:5s} steps {steps:5d} batch {bs:4d}: {row['structures_per_s']:8.2f} structures/s"
                      f"  {row['s_per_1000']:9.1f} s/1000  accepted {row['accepted_fraction']:.2f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
