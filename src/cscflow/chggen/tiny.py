"""A tiny MatterGen trained from scratch on a system's known structures (demo, tests).

``python -m cscflow.chggen.tiny OUT_DIR --elements Li Si [--data MP.json] [--steps N]``
trains on cscflow's built-in prototypes of the system (and their supercells up to
``--max-atoms``), plus the structures of an optional records file (``[{"cif": ..., "nsites": ...}]``,
e.g. a Materials Project dump). Skips training when OUT_DIR already holds a checkpoint.
Quality is poor by design (CPU, minutes): it exercises the CHGGen pipeline, it does not
reproduce the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["prototype_training_set", "train_tiny_model"]


def prototype_training_set(elements: list[str], max_atoms: int = 16) -> list:
    """The system's prototypes and their diagonal supercells with at most ``max_atoms`` sites."""
    from itertools import product

    from cscflow.prototypes import prototype_structures

    out = []
    for _, structure in prototype_structures(list(elements)):
        for scale in sorted(product((1, 2), repeat=3), key=sum):
            if structure.num_sites * scale[0] * scale[1] * scale[2] <= max_atoms and scale[0] >= scale[1] >= scale[2]:
                out.append(structure * scale)
    return out


def train_tiny_model(data_json: str | Path | None, out_dir: str | Path, steps: int = 300, max_atoms: int = 16,
                     seed: int = 0, worker=None, elements: list[str] | None = None) -> Path:
    """Train (once) an unconditional tiny MatterGen on prototypes of ``elements`` and/or ``data_json``."""
    from pymatgen.core import Structure

    from cscflow.generators.mattergen import MatterGenWorker
    from cscflow.mattergen_worker.modelconf import ModelSpec

    out = Path(out_dir).resolve()  # the worker runs in its own directory
    if (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file():
        return out
    structures = prototype_training_set(elements, max_atoms) if elements else []
    if data_json is not None:
        records = json.loads(Path(data_json).read_text())
        structures += [Structure.from_str(r["cif"], fmt="cif") for r in records if int(r["nsites"]) <= max_atoms]
    if not structures:
        raise ValueError(f"no structure with at most {max_atoms} atoms to train on (elements {elements}, data {data_json})")
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
    p.add_argument("out_dir")
    p.add_argument("--elements", nargs="+", default=None, help="train on cscflow's prototypes of these elements")
    p.add_argument("--data", default=None, help="records JSON ([{'cif': ..., 'nsites': ...}]) to train on as well")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-atoms", type=int, default=16)
    a = p.parse_args()
    if not a.elements and not a.data:
        p.error("give --elements and/or --data")
    print(train_tiny_model(a.data, a.out_dir, a.steps, a.max_atoms, elements=a.elements))


if __name__ == "__main__":
    main()
