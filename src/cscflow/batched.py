"""Batched relaxation with torch-sim: one FIRE over many structures on the model's device.

A GPU evaluates one structure of 20–40 atoms far below capacity; relaxing a shard of
candidates together (torch-sim's ``InFlightAutoBatcher``: memory-aware batch size, converged
structures swapped out for new ones) is what makes 10⁴ candidates per iteration affordable.

torch-sim 0.3.0 ships ``ModelInterface`` wrappers for MACE, MatterSim and SevenNet but not for
CHGNet or DeePMD, cscflow's default and fine-tuned models; this module adds both, built on the
models that ``cscflow.forcefields.get_calculator`` already loaded (no second loading route):

- ``CHGNetModel``: CHGNet's own batched forward (graphs per structure, one forward pass);
- ``DeepMDModel``: DeePMD's batch API (``DeepPot.eval`` over frames of equal size,
  ``mixed_type``), one call per atom count in the batch;
- MACE and MatterSim calculators map to torch-sim's own wrappers (``MaceModel``,
  ``MatterSimModel``); torch-sim 0.3.0's ``SevenNetModel`` does not import with sevenn 0.13.

``relax_structures`` drives torch-sim's FIRE (``frechet_cell_fire`` for the Fréchet cell
filter, ``unit_cell_fire`` for ``exp``, ``fire`` for positions only) with the in-flight batcher
itself instead of ``torch_sim.optimize``: in 0.3.0 ``optimize`` counts ``max_steps`` for the
whole run, not per structure, and has no hook to stop a structure whose cell explodes or whose
energy goes NaN (atomate2 0.1.5's ``TorchSimOptimizeMaker`` wraps that same ``optimize`` and
loads its own model by type, with no CHGNet or DeePMD). The loop here checks cscflow's gates
after every step, per structure, as the ASE path does (cscflow.relax), and returns raw
results; cscflow.relax turns them into candidates through the same final gates.

Units: energy eV, forces eV/Å, stress eV/Å³ inside torch-sim (ASE sign, positive = tensile),
GPa in the results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch_sim as ts
from ase.units import GPa
from pymatgen.core import Lattice, Structure
from torch_sim.autobatching import InFlightAutoBatcher, calculate_memory_scaler
from torch_sim.models.interface import ModelInterface

from cscflow.config import RelaxSettings

__all__ = [
    "BatchedResult",
    "CHGNetModel",
    "DeepMDModel",
    "relax_structures",
    "torchsim_model",
]

logger = logging.getLogger(__name__)

# per-step gate codes, in the order the ASE step guard checks them
_REASONS = (None, "exploded", "nan_energy", "energy_out_of_range")


def _n_per_system(state: ts.SimState) -> torch.Tensor:
    return torch.bincount(state.system_idx, minlength=state.n_systems)


class CHGNetModel(ModelInterface):
    """CHGNet as a torch-sim model: one batched CHGNet forward per step.

    The graphs (neighbour lists) are built on the CPU by CHGNet's own converter, as CHGNet's
    ``predict_structure`` does; the network runs on the model's device in its float32, and
    the outputs are cast to ``dtype`` (float64 by default, so FIRE steps as precisely as ASE).
    """

    def __init__(self, model, *, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.model = model
        self._device = next(model.parameters()).device
        self._dtype = dtype
        self._compute_stress = True
        self._compute_forces = True
        self._memory_scales_with = "n_atoms_x_density"  # radial cutoffs (atom graph 6 Å)

    def forward(self, state: ts.SimState, **kwargs) -> dict[str, torch.Tensor]:
        if isinstance(state, dict):
            state = ts.SimState(**state, masses=torch.ones_like(state["positions"]))
        cells = state.row_vector_cell.detach().cpu().double().numpy()
        positions = state.positions.detach().cpu().double().numpy()
        numbers = state.atomic_numbers.detach().cpu().numpy()
        owner = state.system_idx.detach().cpu().numpy()
        graphs = []
        for b in range(state.n_systems):
            mask = owner == b
            structure = Structure(Lattice(cells[b]), numbers[mask], positions[mask],
                                  coords_are_cartesian=True)
            graphs.append(self.model.graph_converter(structure).to(self._device))
        self.model.eval()
        pred = self.model(graphs, task="efs")
        n = _n_per_system(state).to(self._device)
        energy = pred["e"] * n if self.model.is_intensive else pred["e"]
        return {
            "energy": energy.detach().to(self._dtype),
            "forces": torch.cat([f.detach() for f in pred["f"]]).to(self._dtype),
            # CHGNet "s" is GPa with ASE's sign; torch-sim wants eV/Å^3
            "stress": (torch.stack([s.detach() for s in pred["s"]]) * GPa).to(self._dtype),
        }


class DeepMDModel(ModelInterface):
    """A DeePMD model (``deepmd.infer.DeepPot``) as a torch-sim model.

    DeePMD's batch API evaluates frames of one size at once (``mixed_type=True`` lets every
    frame carry its own species), so each step makes one call per distinct atom count.
    DeePMD places itself on its device (``CUDA_VISIBLE_DEVICES``); the state stays where
    torch-sim keeps it and crosses to numpy and back.
    """

    def __init__(self, deep_pot, type_map: dict[str, int], *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        from pymatgen.core.periodic_table import Element

        self.deep_pot = deep_pot
        self._types = {Element(sym).Z: t for sym, t in type_map.items()}
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._dtype = dtype
        self._compute_stress = True
        self._compute_forces = True
        self._memory_scales_with = "n_atoms_x_density"

    def forward(self, state: ts.SimState, **kwargs) -> dict[str, torch.Tensor]:
        cells = state.row_vector_cell.detach().cpu().double().numpy()
        positions = state.positions.detach().cpu().double().numpy()
        numbers = state.atomic_numbers.detach().cpu().numpy()
        owner = state.system_idx.detach().cpu().numpy()
        counts = np.bincount(owner, minlength=state.n_systems)
        try:
            types = np.array([self._types[int(z)] for z in numbers])
        except KeyError as exc:
            raise ValueError(f"element Z={exc.args[0]} is not in the DeePMD model's type map") from exc
        energy = np.zeros(state.n_systems)
        forces = np.zeros_like(positions)
        stress = np.zeros((state.n_systems, 3, 3))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for n in np.unique(counts):
            systems = np.flatnonzero(counts == n)
            atoms = np.concatenate([np.arange(starts[b], starts[b] + n) for b in systems])
            e, f, v = self.deep_pot.eval(
                positions[atoms].reshape(len(systems), -1),
                cells[systems].reshape(len(systems), 9),
                types[atoms].reshape(len(systems), n),
                mixed_type=True,
            )[:3]
            energy[systems] = np.asarray(e).reshape(-1)
            forces[atoms] = np.asarray(f).reshape(-1, 3)
            v = np.asarray(v).reshape(len(systems), 3, 3)
            volume = np.abs(np.linalg.det(cells[systems])).reshape(-1, 1, 1)
            # as deepmd.calculator.DP: stress = -sym(virial) / V (tensile positive)
            stress[systems] = -0.5 * (v + v.transpose(0, 2, 1)) / volume
        to = {"device": self._device, "dtype": self._dtype}
        return {
            "energy": torch.as_tensor(energy, **to),
            "forces": torch.as_tensor(forces, **to),
            "stress": torch.as_tensor(stress, **to),
        }


def torchsim_model(calculator) -> ModelInterface | None:
    """The torch-sim model behind an ASE calculator from cscflow.forcefields, or None.

    None means "no batched path for this calculator": a plain ASE potential, or a torch-sim
    wrapper that cannot be imported here (torch-sim 0.3.0's MatterSim wrapper needs
    mattersim's torch_runstats; its SevenNet wrapper needs a sevenn older than 0.13, so
    SevenNet calculators are not mapped).
    """
    try:
        return _torchsim_model(calculator)
    except ImportError as exc:
        logger.warning("no torch-sim model for %s: %s", type(calculator).__name__, exc)
        return None


def _torchsim_model(calculator) -> ModelInterface | None:
    name = type(calculator).__name__
    if name == "CHGNetCalculator":
        return CHGNetModel(calculator.model)
    if name == "DP":
        return DeepMDModel(calculator.dp, calculator.type_dict)
    if name == "MACECalculator":
        from torch_sim.models.mace import MaceModel

        return MaceModel(model=calculator.models[0], device=calculator.device, dtype=torch.float64)
    if name == "MatterSimCalculator":
        from torch_sim.models.mattersim import MatterSimModel

        return MatterSimModel(model=calculator.potential, device=calculator.device)
    return None


@dataclass
class BatchedResult:
    """Outcome of one structure: the relaxed state, or the gate that stopped it."""

    structure: Structure | None = None
    energy: float = float("nan")
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None  # GPa, ASE sign
    steps: int | None = None
    converged: bool = False
    reject_reason: str | None = None


def _optimizer(model: ModelInterface, cell_filter: str):
    if cell_filter == "frechet":
        return ts.optimizers.frechet_cell_fire(model=model)
    if cell_filter == "exp":  # torch-sim has no exponential filter; unit_cell_fire is the nearest
        return ts.optimizers.unit_cell_fire(model=model)
    return ts.optimizers.fire(model=model)


def _gate_codes(state: ts.SimState, settings: RelaxSettings) -> torch.Tensor:
    """Per system: 0 = fine, else the index in _REASONS of the first gate that failed."""
    n = _n_per_system(state).to(state.energy.dtype)
    volume = torch.linalg.det(state.cell).abs()
    bad_atoms = (~torch.isfinite(state.forces).all(dim=1)).to(n.dtype)
    bad_force = torch.zeros_like(n).index_add_(0, state.system_idx, bad_atoms) > 0
    nan = ~torch.isfinite(state.energy) | bad_force
    codes = torch.zeros(state.n_systems, dtype=torch.long, device=state.device)
    codes = torch.where(state.energy.abs() / n > settings.max_abs_energy_per_atom, 3, codes)
    codes = torch.where(nan, 2, codes)
    return torch.where(volume / n > settings.max_volume_per_atom, 1, codes)


def _result(state: ts.SimState, steps: int, converged: bool, model: ModelInterface) -> BatchedResult:
    lattice = state.row_vector_cell[0].detach().cpu().double().numpy()
    # positions-only FIRE keeps no stress: one more evaluation of the final state
    stress = state.stress[0] if hasattr(state, "stress") else model(state)["stress"][0]
    structure = Structure(
        Lattice(lattice),
        state.atomic_numbers.detach().cpu().numpy(),
        state.positions.detach().cpu().double().numpy(),
        coords_are_cartesian=True,
        to_unit_cell=True,
    )
    return BatchedResult(
        structure=structure,
        energy=float(state.energy[0]),
        forces=state.forces.detach().cpu().double().numpy(),
        stress=stress.detach().cpu().double().numpy() / GPa,
        steps=steps,
        converged=converged,
    )


def _initialize(structures, model, init_fn, chunk: int) -> tuple[list, dict[int, str]]:
    """Optimizer states (with original indices) and the calculator errors at the start.

    Chunks are initialised together; a chunk that raises is redone one structure at a time
    so that only the structure the model fails on is rejected.
    """
    states, errors = [], {}
    for lo in range(0, len(structures), chunk):
        idx = list(range(lo, min(lo + chunk, len(structures))))
        try:
            batch = ts.initialize_state([structures[i] for i in idx], model.device, model.dtype)
            states.extend(zip(idx, init_fn(batch).split(), strict=True))
            continue
        except Exception:  # noqa: BLE001 - find the culprit below
            logger.debug("batched init failed: one structure at a time", exc_info=True)
        for i in idx:
            try:
                one = ts.initialize_state(structures[i], model.device, model.dtype)
                states.append((i, init_fn(one)))
            except Exception as exc:  # the force field failed on this structure
                errors[i] = f"calculator_error: {type(exc).__name__}"
    return states, errors


def relax_structures(
    structures: list[Structure],
    model: ModelInterface,
    settings: RelaxSettings,
    *,
    max_memory_scaler: float | None = None,
    init_chunk: int = 64,
    progress: bool = False,
) -> list[BatchedResult]:
    """Relax structures together (FIRE + cell filter), same order out as in.

    ``max_memory_scaler`` caps the batch (sum of n_atoms × density, torch-sim's metric);
    None lets torch-sim measure it on a GPU and puts every structure in one batch on a CPU.
    Per structure: gates checked after every step, at most ``settings.steps`` steps,
    converged when every atom force (and cell force) is below ``settings.fmax``.
    """
    from tqdm.auto import tqdm

    results: list[BatchedResult | None] = [None] * len(structures)
    if not structures:
        return []
    init_fn, step_fn = _optimizer(model, settings.cell_filter)
    converged_fn = ts.generate_force_convergence_fn(
        settings.fmax, include_cell_forces=settings.cell_filter != "none"
    )
    initial, errors = _initialize(structures, model, init_fn, init_chunk)
    for i, reason in errors.items():
        results[i] = BatchedResult(reject_reason=reason, steps=0)
    if not initial:
        return results

    origin = [i for i, _ in initial]  # batcher index -> input index
    scales_with = model.memory_scales_with
    if max_memory_scaler is None and model.device.type != "cuda":
        max_memory_scaler = sum(calculate_memory_scaler(s, scales_with) for _, s in initial) + 1.0
    batcher = InFlightAutoBatcher(
        model=model,
        memory_scales_with=scales_with,
        max_memory_scaler=max_memory_scaler,
        # the GPU memory probe grows a batch of copies of one structure until OOM or this
        # bound, which torch-sim 0.3.0 compares with the number of copies: a job never holds
        # more than its own structures (a shard), so probing beyond that is wasted time
        max_atoms_to_try=len(initial) + 1,
        return_indices=True,
        max_memory_padding=0.9,
    )
    batcher.load_states([s for _, s in initial])
    steps = np.zeros(len(initial), dtype=int)
    verdict: dict[int, tuple[str | None, bool]] = {}
    finished: list[ts.SimState] = []
    bar = tqdm(total=len(initial), desc="relax (batched)", disable=not progress, unit="structure")

    state, _, current = batcher.next_batch(None, None)
    while state is not None:
        codes = _gate_codes(state, settings).cpu().numpy()
        conv = converged_fn(state, None).cpu().numpy()
        done = np.zeros(state.n_systems, dtype=bool)
        for j, k in enumerate(current):
            if codes[j]:
                verdict[k], done[j] = (_REASONS[codes[j]], False), True
            elif conv[j] or steps[k] >= settings.steps:
                verdict[k], done[j] = (None, bool(conv[j])), True
        if done.any():
            state, popped, current = batcher.next_batch(state, torch.from_numpy(done))
            finished.extend(popped)
            bar.update(int(done.sum()))
            continue  # structures swapped in are checked before their first step
        try:
            state = step_fn(state)
        except Exception:  # noqa: BLE001 - find the structure the model fails on
            logger.debug("batched step failed: finding the structure", exc_info=True)
            failed = np.zeros(state.n_systems, dtype=bool)
            for j, one in enumerate(state.split()):
                try:
                    model(one)
                except Exception as exc:
                    verdict[current[j]] = (f"calculator_error: {type(exc).__name__}", False)
                    failed[j] = True
            if not failed.any():
                raise
            # the others resume from this state (their forces one step stale, a rare path)
            state, popped, current = batcher.next_batch(state, torch.from_numpy(failed))
            finished.extend(popped)
            bar.update(int(failed.sum()))
            continue
        steps[current] += 1
    bar.close()

    for k, final in enumerate(batcher.restore_original_order(finished)):
        reason, converged = verdict[k]
        if reason is not None:
            results[origin[k]] = BatchedResult(reject_reason=reason, steps=int(steps[k]))
        else:
            results[origin[k]] = _result(final, int(steps[k]), converged, model)
    return results
