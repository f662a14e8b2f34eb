"""Training sets: labelled frames -> DeePMD npy systems / extxyz, and the train/test split.

Units follow ``cscflow.schemas``: energies eV, forces eV/Å, stress GPa with ASE's sign
(positive = tensile). DeePMD stores the virial in eV with ``virial = -stress * V``
(stress in eV/Å^3), the same conversion dpdata's ASE plugin uses.

The split follows paper 000 (Methods 4.3): the training pool is every frame from
iterations ``<= train_iterations_max``; pool frames are ranked greedily by δH (eq. 2,
QUESTS, recomputed against the set chosen so far) and the top ``n_train`` are trained on;
the unselected pool frames plus all later iterations are the test set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from cscflow.entropy import DescriptorCache, greedy_entropy_ranking, structure_descriptors
from cscflow.schemas import Frame, flatten_documents

__all__ = [
    "DatasetSplit",
    "flatten_frames",
    "frame_to_atoms",
    "frames_to_deepmd",
    "frames_to_extxyz",
    "greedy_entropy_ranking",
    "read_extxyz_frames",
    "split_frames",
    "stress_to_virial",
    "virial_to_stress",
]


# --------------------------------------------------------------------------- helpers
def flatten_frames(frames: Sequence[Frame] | Sequence[Sequence[Frame]]) -> list[Frame]:
    """Accept the frames of one iteration or a list of per-iteration lists."""
    return flatten_documents(frames, Frame)


def stress_to_virial(stress_gpa: np.ndarray, volume: float) -> np.ndarray:
    """Virial (eV) from stress (GPa, ASE sign): W = -σ·V."""
    from ase.units import GPa

    return -np.asarray(stress_gpa, dtype=float) * GPa * volume


def virial_to_stress(virial_ev: np.ndarray, volume: float) -> np.ndarray:
    """Stress (GPa, ASE sign) from a virial (eV): the inverse of :func:`stress_to_virial`."""
    from ase.units import GPa

    return -np.asarray(virial_ev, dtype=float) / (GPa * volume)


def _check_type_map(frames: Sequence[Frame], type_map: Sequence[str]) -> None:
    if not type_map:
        raise ValueError("type_map is empty: pass the chemical system's element list")
    if len(set(type_map)) != len(type_map):
        raise ValueError(f"type_map lists an element twice: {list(type_map)}")
    known = set(type_map)
    for frame in frames:
        extra = {el.symbol for el in frame.structure.composition} - known
        if extra:
            raise ValueError(
                f"frame {frame.frame_id} contains {sorted(extra)}, which is not in the "
                f"type map {list(type_map)}"
            )


def _check_labels(frame: Frame) -> tuple[np.ndarray, np.ndarray | None]:
    n = len(frame.structure)
    forces = np.asarray(frame.forces, dtype=float)
    if forces.shape != (n, 3):
        raise ValueError(f"frame {frame.frame_id}: forces have shape {forces.shape}, expected ({n}, 3)")
    if not np.isfinite(frame.energy) or not np.all(np.isfinite(forces)):
        raise ValueError(f"frame {frame.frame_id}: energy or forces are not finite")
    stress = None
    if frame.stress is not None:
        stress = np.asarray(frame.stress, dtype=float)
        if stress.shape != (3, 3):
            raise ValueError(f"frame {frame.frame_id}: stress has shape {stress.shape}, expected (3, 3)")
    return forces, stress


# --------------------------------------------------------------------------- DeePMD
def _frame_to_dpdata(frame: Frame, type_map: Sequence[str]):
    """One LabeledSystem whose atom_names is the whole type map (absent elements count 0)."""
    import dpdata

    forces, stress = _check_labels(frame)
    structure = frame.structure
    symbols = [site.specie.symbol for site in structure]
    index = {el: i for i, el in enumerate(type_map)}
    atom_types = np.array([index[s] for s in symbols], dtype=int)
    cell = np.asarray(structure.lattice.matrix, dtype=float)
    data = {
        "atom_names": list(type_map),
        "atom_numbs": [int(np.sum(atom_types == i)) for i in range(len(type_map))],
        "atom_types": atom_types,
        "orig": np.zeros(3),
        "cells": cell[None],
        "coords": np.asarray(structure.cart_coords, dtype=float)[None],
        "energies": np.array([float(frame.energy)]),
        "forces": forces[None],
        "nopbc": False,
    }
    if stress is not None:
        data["virials"] = stress_to_virial(stress, structure.volume)[None]
    return dpdata.LabeledSystem(data=data)


def frames_to_deepmd(
    frames: Sequence[Frame] | Sequence[Sequence[Frame]],
    out_dir: str | Path,
    type_map: Sequence[str],
    set_size: int = 5000,
) -> list[Path]:
    """Write frames as DeePMD npy systems (one per composition); return the system dirs.

    Every system shares `type_map` (the chemical system's element list, in spec order), so
    one model covers the whole system. Frames with and without stress never share a
    system: DeePMD needs the virial of every frame in a system or of none.
    """
    import dpdata

    frames = flatten_frames(frames)
    if not frames:
        raise ValueError("no frames to write")
    _check_type_map(frames, type_map)
    out_dir = Path(out_dir)
    groups: dict[str, list[Frame]] = {}
    for frame in frames:
        tag = "" if frame.stress is not None else "_novirial"
        groups.setdefault(tag, []).append(frame)
    written: list[Path] = []
    for tag, group in groups.items():
        multi = dpdata.MultiSystems(type_map=list(type_map))
        for frame in group:
            multi.append(_frame_to_dpdata(frame, type_map))
        target = out_dir / f"systems{tag}"
        multi.to_deepmd_npy(str(target), set_size=set_size)
        written.extend(sorted(p.parent for p in target.glob("*/type.raw")))
    return [p.resolve() for p in written]


# --------------------------------------------------------------------------- extxyz
def frame_to_atoms(frame: Frame, key_prefix: str = ""):
    """ASE Atoms carrying the labels.

    With the default empty `key_prefix` the labels sit in a SinglePointCalculator (what
    ASE readers and MatterSim expect); with e.g. ``"REF_"`` they are stored as
    ``info["REF_energy"]``, ``arrays["REF_forces"]``, ``info["REF_stress"]`` (Voigt,
    eV/Å^3), the keys MACE recommends (``--energy_key REF_energy`` ...).
    """
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import GPa
    from pymatgen.io.ase import AseAtomsAdaptor

    forces, stress = _check_labels(frame)
    atoms = AseAtomsAdaptor.get_atoms(frame.structure)
    atoms.info = {}  # pymatgen may put non-scalar site/structure properties here
    for name in list(atoms.arrays):
        if name not in ("numbers", "positions"):
            del atoms.arrays[name]
    stress_voigt = None
    if stress is not None:
        s = stress * GPa
        stress_voigt = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
    if key_prefix:
        atoms.info[f"{key_prefix}energy"] = float(frame.energy)
        atoms.arrays[f"{key_prefix}forces"] = forces
        if stress_voigt is not None:
            atoms.info[f"{key_prefix}stress"] = stress_voigt
    else:
        results = {"energy": float(frame.energy), "forces": forces}
        if stress_voigt is not None:
            results["stress"] = stress_voigt
        atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["frame_id"] = frame.frame_id
    atoms.info["iteration"] = int(frame.provenance.iteration)
    atoms.info["kind"] = frame.kind
    atoms.info["config_type"] = frame.kind
    return atoms


def frames_to_extxyz(
    frames: Sequence[Frame] | Sequence[Sequence[Frame]],
    path: str | Path,
    key_prefix: str = "",
) -> Path:
    """Write frames to one extended-XYZ file (for MACE / MatterSim training)."""
    from ase.io import write

    frames = flatten_frames(frames)
    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, [frame_to_atoms(f, key_prefix) for f in frames], format="extxyz")
    return path.resolve()


def read_extxyz_frames(path: str | Path, key_prefix: str = "") -> list[dict]:
    """Read labels back: dicts with frame_id, energy (eV), forces (eV/Å), stress (GPa, 3x3)."""
    from ase.io import read
    from ase.stress import voigt_6_to_full_3x3_stress
    from ase.units import GPa

    out = []
    for atoms in read(Path(path), index=":", format="extxyz"):
        if key_prefix:
            energy = atoms.info[f"{key_prefix}energy"]
            forces = atoms.arrays[f"{key_prefix}forces"]
            voigt = atoms.info.get(f"{key_prefix}stress")
        else:
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
            voigt = atoms.calc.results.get("stress") if atoms.calc is not None else None
        stress = None
        if voigt is not None:
            voigt = np.asarray(voigt, dtype=float)
            stress = (voigt.reshape(3, 3) if voigt.size == 9 else voigt_6_to_full_3x3_stress(voigt)) / GPa
        out.append(
            {
                "frame_id": atoms.info.get("frame_id"),
                "atoms": atoms,
                "energy": float(energy),
                "forces": np.asarray(forces, dtype=float),
                "stress": stress,
            }
        )
    return out


# --------------------------------------------------------------------------- split
def _hash_rank(frame_id: str, seed: int) -> int:
    """A seeded 64-bit hash of a frame id: a per-frame coin that never changes."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{frame_id}".encode(), digest_size=8).digest(), "big")


def _held_out(frame_id: str, seed: int, fraction: float) -> bool:
    """The same frame is held out in every iteration for one seed."""
    return _hash_rank(frame_id, seed) / 2**64 < fraction


class DatasetSplit(BaseModel):
    """Which frames train and which test, and why; `ranking` is the δH ranking of the pool."""

    train: list[Frame]
    test: list[Frame]
    train_gains: list[float] = Field(default_factory=list, description="δH score of each training frame when picked")
    train_entropy: list[float] = Field(
        default_factory=list, description="H (eq. 1, all environments) of the first N training frames, N = 1.."
    )
    n_pool: int = 0
    random_holdout: bool = Field(False, description="test set is a seeded per-frame holdout of the pool")

    model_config = {"arbitrary_types_allowed": True}

    @property
    def train_ids(self) -> list[str]:
        return [f.frame_id for f in self.train]

    @property
    def test_ids(self) -> list[str]:
        return [f.frame_id for f in self.test]


def split_frames(
    frames: Iterable[Frame] | Sequence[Sequence[Frame]],
    n_train: int,
    train_iterations_max: int = 3,
    test_fraction: float = 0.1,
    seed: int = 0,
    k: int = 32,
    cutoff: float = 5.0,
    bandwidth: float = 0.015,
    *,
    cache: DescriptorCache | None = None,
    device: str | None = "auto",
    previous_train_ids: Sequence[str] = (),
) -> DatasetSplit:
    """Paper split (Methods 4.3), one definition for every iteration and model.

    Pool = frames of iterations <= `train_iterations_max` (the last training iteration).
    Train = the first `n_train` pool frames of the greedy δH ranking
    (:func:`cscflow.entropy.greedy_entropy_ranking`, all environments). Test = the pool
    frames not trained on + every frame of a later iteration. Only when that test set would
    be empty (no later iteration yet and the whole pool fits in `n_train`) is a
    `test_fraction` of the pool held out, by a seeded hash of each frame id, so a frame
    held out once stays held out in every later iteration with the same seed.
    `previous_train_ids` (the last iteration's ``train_frame_ids``) are ranked first, so a
    model fine-tuned on them is never tested on them; the greedy ranking continues from them.
    """
    frames = flatten_frames(list(frames))
    if not frames:
        raise ValueError("no labelled frames to split")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    ids = [f.frame_id for f in frames]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate frame ids: {dup}")
    pool = [f for f in frames if f.provenance.iteration <= train_iterations_max]
    later = [f for f in frames if f.provenance.iteration > train_iterations_max]
    if not pool:
        raise ValueError(
            f"no frames from iterations <= train_iterations_max={train_iterations_max}: "
            "nothing to train on"
        )
    n_pool = len(pool)
    held_out: list[Frame] = []
    random_holdout = False
    if not later and n_train >= len(pool) and test_fraction > 0 and len(pool) > 1:
        held_out = [f for f in pool if _held_out(f.frame_id, seed, test_fraction)]
        if not held_out:  # tiny pools: hold out the frame with the smallest hash
            held_out = [min(pool, key=lambda f: _hash_rank(f.frame_id, seed))]
        if len(held_out) == len(pool):
            held_out = held_out[:-1]
        out = {f.frame_id for f in held_out}
        pool = [f for f in pool if f.frame_id not in out]
        random_holdout = True
    cache = cache or DescriptorCache(k=k, cutoff=cutoff)
    desc = structure_descriptors(
        [f.structure for f in pool], k=k, cutoff=cutoff, keys=[f.frame_id for f in pool], cache=cache
    )
    index = {f.frame_id: i for i, f in enumerate(pool)}
    start = [index[i] for i in previous_train_ids if i in index]
    ranking = greedy_entropy_ranking(desc, n_train, bandwidth=bandwidth, device=device, start=start)
    chosen = set(ranking.order)
    return DatasetSplit(
        train=[pool[i] for i in ranking.order],
        test=held_out + [f for i, f in enumerate(pool) if i not in chosen] + later,
        train_gains=ranking.delta_entropy,
        train_entropy=ranking.entropy,
        n_pool=n_pool,
        random_holdout=random_holdout,
    )

