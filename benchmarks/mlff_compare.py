"""Training and inference cost of each MLFF family (cscflow.trainers) on this machine.

Not a test: numbers to size training jobs. Frames are CHGNet-0.3.0-labelled rattled,
strained copies of Materials Project Li-P-S structures (``../shared/data/lips.json``).
Per family: seconds per training epoch per 1000 frames, measured as the difference
between an ``--epochs-long`` and an ``--epochs-short`` run divided by the extra epochs
(so process start-up, imports and data conversion cancel), and inference seconds per
1000 atoms (``trainers.evaluate_model``: ASE single points through cscflow.forcefields,
after a warm-up call on one frame; DeePMD still compiles once per new cell shape).
Run it on a quiet machine: the per-epoch figure is a difference of two wall times.
Sizes are each family's defaults in TrainingSettings: CHGNet
0.3.0 and SevenNet 7net-0 fine-tuned from their wheels, DPA-3 / MACE / MatterSim from
scratch (their foundation checkpoints are not offline).

Usage (repository root, project virtualenv)::

    OMP_NUM_THREADS=1 python benchmarks/mlff_compare.py --frames 24
    python benchmarks/mlff_compare.py --backends chgnet,sevenn --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def labelled_frames(data: Path, n: int, seed: int = 0):
    """n frames: rattled (0.05 Å) and strained (1 %) copies of MP structures with <= 16 sites, CHGNet labels."""
    from pymatgen.core import Structure

    from cscflow.config import ForceFieldSettings
    from cscflow.forcefields import get_calculator, single_points
    from cscflow.schemas import Frame, Provenance

    records = [r for r in json.loads(data.read_text()) if r.get("nsites", 99) <= 16]
    rng = np.random.default_rng(seed)
    structures, ids = [], []
    for i in range(n):
        rec = records[i % len(records)]
        s0 = Structure.from_str(rec["cif"], fmt="cif")
        strain = np.eye(3) + rng.normal(0, 0.01, (3, 3))
        cart = s0.cart_coords @ strain + rng.normal(0, 0.05, (len(s0), 3))
        structures.append(Structure(s0.lattice.matrix @ strain, s0.species, cart, coords_are_cartesian=True))
        ids.append(f"{rec['id']}-{i}")
    results = single_points(structures, get_calculator(ForceFieldSettings()))
    return [
        Frame(frame_id=i, structure=s, energy=r["energy"], forces=r["forces"].tolist(), stress=r["stress"].tolist(),
              kind="perturbed", labeller="teacher:chgnet-0.3.0", provenance=Provenance(candidate_id=i, iteration=0, generator="seed"))
        for i, s, r in zip(ids, structures, results)
    ]


def settings_for(backend: str, epochs: int, device: str):
    from cscflow.config import TrainingSettings

    base = TrainingSettings(backend=backend, device=device)
    if backend == "deepmd":
        return base.model_copy(update={"epochs": float(epochs)})
    block = getattr(base, backend).model_copy(update={"epochs": epochs})
    if backend == "mace":
        block = block.model_copy(update={"swa_epochs": 0})
    if backend in ("chgnet", "sevenn", "mattersim"):
        block = block.model_copy(update={"validation_fraction": 0.0})
    return base.model_copy(update={backend: block})


def measure(backend: str, frames, short: int, long: int, device: str, work: Path) -> dict:
    from cscflow.trainers import evaluate_model, get_trainer

    trainer = get_trainer(backend)
    seconds = {}
    model = None
    for epochs in (short, long):
        t0 = time.perf_counter()
        model = trainer.train(frames, work / f"{backend}-{epochs}", settings_for(backend, epochs, device), ["Li", "P", "S"])
        seconds[epochs] = time.perf_counter() - t0
    per_epoch = (seconds[long] - seconds[short]) / (long - short)
    evaluate_model(model.model_path, frames[:1])  # warm-up (TorchScript, graph caches)
    t0 = time.perf_counter()
    metrics = evaluate_model(model.model_path, frames)
    infer = time.perf_counter() - t0
    n_atoms = sum(len(f.structure) for f in frames)
    return {
        "backend": backend, "frames": len(frames), "atoms": n_atoms,
        "train_s": {str(k): round(v, 2) for k, v in seconds.items()},
        "s_per_epoch_per_1000_frames": per_epoch * 1000 / len(frames),
        "inference_s_per_1000_atoms": infer * 1000 / n_atoms,
        "train_force_rmse": metrics["force_rmse"], "start_from": model.start_from,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="chgnet,sevenn,deepmd,mace,mattersim")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--epochs-short", type=int, default=1)
    p.add_argument("--epochs-long", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lips.json")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    frames = labelled_frames(args.data, args.frames)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            try:
                row = measure(backend, frames, args.epochs_short, args.epochs_long, args.device, Path(tmp))
            except Exception as exc:  # one family missing must not hide the others' numbers
                row = {"backend": backend, "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'backend':<10} {'s/epoch/1000 frames':>20} {'s/1000 atoms (inference)':>25}  start")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<10} {'failed: ' + r['error'][:60]}")
        else:
            print(f"{r['backend']:<10} {r['s_per_epoch_per_1000_frames']:>20.1f} {r['inference_s_per_1000_atoms']:>25.2f}  {r['start_from']}")
    # a non-positive difference means the machine's load swamped the extra epochs: no ratio
    ok = [r for r in rows if "error" not in r and r["s_per_epoch_per_1000_frames"] > 0]
    if len(ok) > 1:
        ref = min(ok, key=lambda r: r["s_per_epoch_per_1000_frames"])
        print("training cost relative to the cheapest (" + ref["backend"] + "): "
              + ", ".join(f"{r['backend']} {r['s_per_epoch_per_1000_frames'] / ref['s_per_epoch_per_1000_frames']:.1f}x" for r in ok))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
