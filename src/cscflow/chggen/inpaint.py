"""Client side of CHGGen's RePaint: host/guest structures to the MatterGen worker and back.

The worker (``cscflow.mattergen_worker.repaint``, in MatterGen's own environment) keeps the
host framework fixed and denoises the guests; this module builds its inputs (host atoms
flagged per atom, guests re-initialised uniformly in the cell) and reads its outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from pymatgen.core import Lattice, Structure

from cscflow.generators.mattergen import MatterGenWorker

__all__ = ["HOST_KEY", "inpaint_guests", "sample_in_cells", "with_guests"]

logger = logging.getLogger(__name__)

#: per-atom extxyz array flagging the host (framework) atoms; same name as in the worker
HOST_KEY = "cscflow_host"


def with_guests(host: Structure, guests: dict[str, int], rng: np.random.Generator) -> Structure:
    """Host framework + guest atoms at uniformly random fractional positions (re-initialised)."""
    species = [str(sp) for sp in host.species]
    coords = [list(c) for c in host.frac_coords]
    for el, count in sorted(guests.items()):
        if count < 0:
            raise ValueError(f"negative guest count for {el}: {count}")
        for _ in range(int(count)):
            species.append(el)
            coords.append(list(rng.random(3)))
    flags = [1] * len(host) + [0] * (len(species) - len(host))
    return Structure(host.lattice, species, coords, site_properties={"host": flags})


def _to_atoms(structures: Sequence[Structure]):
    from pymatgen.io.ase import AseAtomsAdaptor

    out = []
    for i, s in enumerate(structures):
        flags = s.site_properties.get("host")
        plain = s.copy()
        for key in list(plain.site_properties):
            plain.remove_site_property(key)
        a = AseAtomsAdaptor.get_atoms(plain)
        # keep the input's own fractional coordinates (ase would recompute them from Cartesians)
        a.set_scaled_positions(np.asarray(s.frac_coords, dtype=float))
        a.arrays[HOST_KEY] = np.asarray(flags if flags is not None else [0] * len(s), dtype=int)
        a.info = {"input_index": i}
        out.append(a)
    return out


def _from_atoms(path: Path) -> list[tuple[Structure, dict]]:
    import ase.io

    out = []
    for a in ase.io.read(str(path), index=":", format="extxyz"):
        host = np.asarray(a.arrays.get(HOST_KEY, np.zeros(len(a))), dtype=int)
        s = Structure(Lattice(np.asarray(a.cell[:], dtype=float)), list(a.get_chemical_symbols()),
                      a.get_scaled_positions(wrap=False), site_properties={"host": host.tolist()})
        out.append((s, dict(a.info)))
    return out


def _run(worker: MatterGenWorker, cmd: str, checkpoint, structures, **kwargs) -> tuple[list[tuple[Structure, dict]], dict]:
    import ase.io

    if not structures:
        return [], {"n_requested": 0, "n_accepted": 0, "reasons": {}, "seconds": 0.0, "n_score_evaluations": 0}
    tag = worker._next_id + 1
    in_file = worker.workdir / f"{cmd}-{tag}-in.extxyz"
    out_file = worker.workdir / f"{cmd}-{tag}-out.extxyz"
    ase.io.write(str(in_file), _to_atoms(structures), format="extxyz")
    # the worker runs in its own directory: relative paths must be resolved here
    res = worker.request(cmd, checkpoint=str(Path(checkpoint).resolve()), in_file=str(in_file), out_file=str(out_file), **kwargs)
    samples = _from_atoms(out_file) if res["n_accepted"] else []
    # The worker writes the host's own coordinates back; extxyz text keeps ~1e-8 Å of them.
    # Put the exact input values back and record how far the transported ones were.
    worst = 0.0
    for s, info in samples:
        src = structures[int(info["input_index"])]
        host = np.asarray(s.site_properties["host"], dtype=bool)
        if kwargs.get("fix_cell", True):
            s.lattice = src.lattice
        if host.any():
            worst = max(worst, float(np.abs(s.frac_coords[host] - src.frac_coords[host]).max()))
            for j in np.flatnonzero(host):
                s.replace(int(j), s.species[j], src.frac_coords[j], coords_are_cartesian=False,
                          properties={"host": 1})
    res["host_transport_error"] = worst
    in_file.unlink(missing_ok=True)
    out_file.unlink(missing_ok=True)
    return samples, res


def inpaint_guests(
    worker: MatterGenWorker,
    checkpoint: str | Path,
    structures: Sequence[Structure],
    *,
    resample_steps: int = 3,
    n_steps_corrector: int = 1,
    guidance_factor: float = 0.0,
    conditions: dict | None = None,
    batch_size: int = 16,
    seed: int = 0,
    fix_cell: bool = True,
    fix_species: bool = True,
    device: str = "auto",
    num_steps: int | None = None,
) -> tuple[list[tuple[Structure, dict]], dict]:
    """RePaint the guests of ``structures`` (site property ``host``: 1 host, 0 guest).

    Returns [(structure, info)] of the valid results (info['input_index'] points back at the
    input; site property ``host`` kept) and the worker's report (counts, score evaluations).
    """
    for i, s in enumerate(structures):
        if "host" not in s.site_properties:
            raise ValueError(f"structure {i} has no 'host' site property: build it with with_guests()")
    return _run(worker, "inpaint", checkpoint, structures, resample_steps=int(resample_steps),
                n_steps_corrector=int(n_steps_corrector), guidance_factor=float(guidance_factor),
                conditions=conditions or {}, batch_size=int(batch_size), seed=int(seed), fix_cell=fix_cell,
                fix_species=fix_species, device=device, num_steps=num_steps)


def sample_in_cells(
    worker: MatterGenWorker,
    checkpoint: str | Path,
    cells: Sequence[tuple[Lattice, list[str]]],
    *,
    n_steps_corrector: int = 1,
    guidance_factor: float = 0.0,
    conditions: dict | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    num_steps: int | None = None,
) -> tuple[list[tuple[Structure, dict]], dict]:
    """Positions generated by the diffusion model in fixed cells for fixed species (no host)."""
    rng = np.random.default_rng(seed)
    structures = [Structure(lat, species, rng.random((len(species), 3)), site_properties={"host": [0] * len(species)})
                  for lat, species in cells]
    return _run(worker, "sample_in_cells", checkpoint, structures, resample_steps=1,
                n_steps_corrector=int(n_steps_corrector), guidance_factor=float(guidance_factor),
                conditions=conditions or {}, batch_size=int(batch_size), seed=int(seed), fix_cell=True,
                fix_species=True, device=device, num_steps=num_steps)
