"""A tiny MatterGen trained from scratch on a system's known structures (demos, tests).

``python -m cscflow.chggen.tiny OUT_DIR --elements Li Si [--data MP.json] [--steps N]``
trains on cscflow's built-in prototypes of the system (and their supercells up to
``--max-atoms``), plus the structures of an optional records file (``[{"cif": ..., "nsites": ...}]``,
e.g. a Materials Project dump). Skips training when OUT_DIR already holds a checkpoint.

``--conditioned`` then fine-tunes that base model once with MatterGen's chemical_system and
energy_above_hull adapters on the same structures labelled by CHGNet (E_hull from their own
hull), into ``OUT_DIR/it0``: the stand-in for MatterGen's released
chemical_system_energy_above_hull checkpoint that the loop's ``generator: mattergen`` needs.

Quality is poor by design (CPU, minutes): it exercises the pipelines, it does not
reproduce the papers' numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["prototype_training_set", "train_tiny_conditioned_model", "train_tiny_model"]


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


def train_tiny_conditioned_model(elements: list[str], out_dir: str | Path, steps: int = 300,
                                 finetune_steps: int = 30, max_atoms: int = 16, seed: int = 0) -> Path:
    """Base model (``OUT/base``) plus one adapter fine-tune (``OUT/it0``); both done once."""
    from chgnet.model import CHGNet

    from cscflow.generators.mattergen import MatterGenWorker, finetune_generator
    from cscflow.schemas import Frame, Provenance

    out = Path(out_dir).resolve()
    tuned = out / "it0"
    if (tuned / "config.yaml").is_file() and (tuned / "checkpoints" / "last.ckpt").is_file():
        return tuned
    structures = prototype_training_set(elements, max_atoms)
    if not structures:
        raise ValueError(f"no prototype of {elements} with at most {max_atoms} atoms")
    model = CHGNet.load(verbose=False)  # the teacher: labels for the adapters' E_hull
    preds = model.predict_structure(structures, task="ef", batch_size=16)
    frames = [
        Frame(frame_id=f"tiny-{i}", structure=s, energy=float(p["e"]) * len(s), forces=p["f"].tolist(),
              kind="unperturbed", labeller="teacher:chgnet (tiny MatterGen bootstrap)",
              provenance=Provenance(candidate_id=f"tiny-prototype-{i}", iteration=0, generator="prototype"))
        for i, (s, p) in enumerate(zip(structures, preds))
    ]
    with MatterGenWorker() as worker:
        base = train_tiny_model(None, out / "base", steps, max_atoms, seed=seed, worker=worker, elements=elements)
        result = finetune_generator(frames, base, iteration=0, seed=seed, max_steps=finetune_steps, batch_size=16,
                                    device="cpu", output_dir=out, worker=worker)
    return Path(result.checkpoint)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--elements", nargs="+", default=None, help="train on cscflow's prototypes of these elements")
    p.add_argument("--data", default=None, help="records JSON ([{'cif': ..., 'nsites': ...}]) to train on as well")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-atoms", type=int, default=16)
    p.add_argument("--conditioned", action="store_true",
                   help="also fine-tune the chemical_system + energy_above_hull adapters (OUT_DIR/it0)")
    p.add_argument("--finetune-steps", type=int, default=30)
    a = p.parse_args()
    if not a.elements and not a.data:
        p.error("give --elements and/or --data")
    if a.conditioned:
        if a.data or not a.elements:
            p.error("--conditioned trains on the prototypes of --elements only")
        print(train_tiny_conditioned_model(a.elements, a.out_dir, a.steps, a.finetune_steps, a.max_atoms))
        return
    print(train_tiny_model(a.data, a.out_dir, a.steps, a.max_atoms, elements=a.elements))


if __name__ == "__main__":
    main()
