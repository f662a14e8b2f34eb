"""A tiny MatterGen trained from scratch on a system's reference structures (demo, tests).

``python -m cscflow.chggen.tiny DATA.json OUT_DIR [--steps N]``: skips training when
OUT_DIR already holds a checkpoint. Quality is poor by design (CPU, minutes): it exercises
the CHGGen pipeline, it does not reproduce the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["train_tiny_model"]


def train_tiny_model(data_json: str | Path, out_dir: str | Path, steps: int = 300, max_atoms: int = 16,
                     seed: int = 0, worker=None) -> Path:
    """Train (once) an unconditional tiny MatterGen on the structures of ``data_json`` (<= max_atoms)."""
    from pymatgen.core import Structure

    from cscflow.generators.mattergen import MatterGenWorker
    from cscflow.mattergen_worker.modelconf import ModelSpec

    out = Path(out_dir).resolve()  # the worker runs in its own directory
    if (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file():
        return out
    records = json.loads(Path(data_json).read_text())
    structures = [Structure.from_str(r["cif"], fmt="cif") for r in records if int(r["nsites"]) <= max_atoms]
    if not structures:
        raise ValueError(f"{data_json}: no structure with at most {max_atoms} atoms to train on")
    own = worker is None
    worker = worker or MatterGenWorker()
    try:
        worker.train(structures, out, spec=ModelSpec.tiny().as_dict(), max_steps=steps, batch_size=16,
                     device="cpu", seed=seed)
    finally:
        if own:
            worker.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_json")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-atoms", type=int, default=16)
    a = p.parse_args()
    print(train_tiny_model(a.data_json, a.out_dir, a.steps, a.max_atoms))


if __name__ == "__main__":
    main()
