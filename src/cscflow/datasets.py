"""Training sets: labelled frames -> DeePMD npy systems / extxyz, and the train/test split.

Units follow ``cscflow.schemas``: energies eV, forces eV/Å, stress GPa with ASE's sign
(positive = tensile). DeePMD stores the virial in eV with ``virial = -stress * V``
(stress in eV/Å^3), the same conversion dpdata's ASE plugin uses.

The split follows paper 000 (Methods 4.3): the training pool is every frame from
iterations ``<= train_iterations_max``; pool frames are ranked greedily by information
entropy gain (δH, QUESTS) and the top ``n_train`` are trained on; the unselected pool
frames plus all later iterations are the test set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from cscflow.schemas import Frame

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
    flat: list[Frame] = []
    for item in frames or ():
        if isinstance(item, Frame):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(flatten_frames(item))
        elif isinstance(item, dict):  # a Frame serialised by jobflow/monty
            from monty.json import MontyDecoder

            decoded = MontyDecoder().process_decoded(item)
            flat.append(decoded if isinstance(decoded, Frame) else Frame.model_validate(decoded))
        else:
            raise TypeError(f"expected Frame or a list of Frames, got {type(item).__name__}")
    return flat


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


# --------------------------------------------------------------------------- δH ranking
def _descriptors(frames: Sequence[Frame], k: int, cutoff: float) -> list[np.ndarray]:
    """Per-frame QUESTS environment descriptors (n_atoms, d) via cscflow.entropy."""
    from cscflow.entropy import structure_descriptors

    return [np.asarray(x, dtype=float) for x in structure_descriptors([f.structure for f in frames], k=k, cutoff=cutoff)]


def greedy_entropy_ranking(
    descriptors: Sequence[np.ndarray],
    n_select: int,
    bandwidth: float = 0.015,
    reference: np.ndarray | None = None,
    block: int | None = None,
    seed: int = 0,
    batch_size: int = 20000,
) -> tuple[list[int], list[float]]:
    """Pick `n_select` structures greedily by entropy gain; return (indices, δH at pick).

    A structure's gain is the mean over its environments y of
    ``δH(y | X) = -log Σ_x K_h(y, x)`` (paper eq. 2, QUESTS' kernel) against the reference
    X = `reference` plus everything picked so far. Kernel sums are kept per pool
    environment and updated incrementally: adding a block only costs the kernel between
    the pool and the new block's environments. Total work is O(A_pool · A_sel · d) kernel
    evaluations (A = environments, d = descriptor length), memory O(A_pool) plus one
    kernel batch: one pass over the pool per picked environment, never a pool×pool
    matrix. `block` structures are taken per round (default ~1/50 of `n_select`, so at
    most ~50 rounds); block=1 is exact one-at-a-time greedy. With an empty reference the
    first pick is the structure whose environments are rarest in a seeded sample of at
    most 2000 pool environments.
    """
    from quests.entropy import kernel_sum

    n_pool = len(descriptors)
    if n_select <= 0 or n_pool == 0:
        return [], []
    n_select = min(n_select, n_pool)
    if block is None:
        block = max(1, int(np.ceil(n_select / 50)))
    sizes = np.array([len(x) for x in descriptors])
    if np.any(sizes == 0):
        raise ValueError("a structure has no environments (empty descriptor array)")
    owner = np.repeat(np.arange(n_pool), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pool = np.ascontiguousarray(np.concatenate(descriptors, axis=0), dtype=np.float64)
    ksum = np.zeros(len(pool))
    if reference is not None and len(reference):
        ksum += kernel_sum(pool, np.ascontiguousarray(reference, dtype=np.float64), h=bandwidth, batch_size=batch_size)
    remaining = np.ones(n_pool, dtype=bool)
    chosen: list[int] = []
    gains: list[float] = []

    def structure_gain(ks: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            dh = -np.log(ks)  # +inf where no reference environment is near
        dh = np.minimum(dh, 1e6)
        return np.bincount(owner, weights=dh, minlength=n_pool) / sizes

    if not np.any(ksum > 0):
        rng = np.random.default_rng(seed)
        sample = pool[rng.choice(len(pool), size=min(2000, len(pool)), replace=False)]
        first = structure_gain(kernel_sum(pool, sample, h=bandwidth, batch_size=batch_size))
        i = int(np.argmax(first))
        chosen.append(i)
        gains.append(float("inf"))
        remaining[i] = False
        ksum += kernel_sum(pool, pool[starts[i] : starts[i + 1]], h=bandwidth, batch_size=batch_size)

    while len(chosen) < n_select:
        gain = structure_gain(ksum)
        gain[~remaining] = -np.inf
        take = min(block, n_select - len(chosen))
        # stable sort on -gain: ties go to the lower index, so the ranking is reproducible
        picked = np.argsort(-gain, kind="stable")[:take]
        new_envs = []
        for i in picked:
            chosen.append(int(i))
            gains.append(float(gain[i]))
            remaining[i] = False
            new_envs.append(pool[starts[i] : starts[i + 1]])
        if len(chosen) < n_select:
            ksum += kernel_sum(pool, np.ascontiguousarray(np.concatenate(new_envs)), h=bandwidth, batch_size=batch_size)
    return chosen, gains


# --------------------------------------------------------------------------- split
class DatasetSplit(BaseModel):
    """Which frames train and which test, and why."""

    train: list[Frame]
    test: list[Frame]
    train_gains: list[float] = Field(default_factory=list, description="δH of each training frame when picked")
    n_pool: int = 0
    random_holdout: bool = Field(False, description="test set drawn at random from the pool")

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
    block: int | None = None,
) -> DatasetSplit:
    """Paper split: top-`n_train` δH frames of iterations <= max train; the rest test.

    When that leaves no test frame (all frames are in the pool and all fit in n_train),
    `test_fraction` of the pool is held out at random (seeded) before ranking.
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
    held_out: list[Frame] = []
    random_holdout = False
    if not later and n_train >= len(pool) and test_fraction > 0 and len(pool) > 1:
        rng = np.random.default_rng([seed, len(pool)])
        n_test = min(len(pool) - 1, max(1, int(round(test_fraction * len(pool)))))
        out = set(rng.choice(len(pool), size=n_test, replace=False).tolist())
        held_out = [f for i, f in enumerate(pool) if i in out]
        pool = [f for i, f in enumerate(pool) if i not in out]
        random_holdout = True
    if n_train >= len(pool):
        order, gains = list(range(len(pool))), [float("nan")] * len(pool)
    else:
        order, gains = greedy_entropy_ranking(
            _descriptors(pool, k, cutoff), n_train, bandwidth=bandwidth, block=block, seed=seed
        )
    chosen = set(order)
    train = [pool[i] for i in order]
    unselected = [f for i, f in enumerate(pool) if i not in chosen]
    return DatasetSplit(
        train=train,
        test=held_out + unselected + later,
        train_gains=gains,
        n_pool=len(pool) + len(held_out),
        random_holdout=random_holdout,
    )
