"""Li-ion conductivity screening by MD (paper 000 SI 1.4, SI Table 1, Fig. 6).

Protocol: composition/stability filters -> cell repeated to >= 10 Å, near-isotropic ->
NPT at 1 bar (ASE's Nosé-Hoover-chain thermostat + MTK barostat, ``IsotropicMTKNPT``) ->
NVT (``NoseHooverChainNVT``) at the mean NPT cell -> per-element D from the MSD of the last
``analysis_ps`` (pymatgen-analysis-diffusion's ``DiffusionAnalyzer``, drift-corrected,
unwrapped displacements) -> gates D_P, D_S < 1e-6 cm^2/s -> sigma_Li by Nernst-Einstein ->
conductor if sigma_Li >= 400 mS/cm.

ASE dynamics are used directly rather than atomate2's ``ForceFieldMDMaker``: that maker runs
one ensemble per job and writes its trajectory to files/documents; here NPT must hand its
mean cell to NVT in the same process and only the sampled positions are needed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymatgen.core import Structure

from cscflow.analysis.plotting import pyplot, save_figure
from cscflow.config import ForceFieldSettings
from cscflow.downstream import Item, as_items, isotropic_supercell_matrix, resolve_calculator, resolve_model_tag

__all__ = [
    "ConductivityMaker",
    "ConductivityOutput",
    "ConductivityResult",
    "ConductivitySettings",
    "MdTrajectory",
    "analyse_trajectory",
    "candidate_table",
    "diffusion_analyzers",
    "plot_msd",
    "run_md",
    "screen_reason",
    "screen_structures",
    "trajectory_structures",
    "write_conductivity_report",
]

logger = logging.getLogger(__name__)


class ConductivitySettings(BaseModel):
    """Screening protocol; defaults are the paper's (SI 1.4)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mobile: str = Field("Li", description="the conducting ion")
    mobile_charge: int = Field(1, description="z of the conducting ion")
    # Filters: atomic fraction strictly above each value (x_Li > 0.15, x_P > 0, x_S > 0.45).
    min_fraction: dict[str, float] = Field(default_factory=lambda: {"Li": 0.15, "P": 0.0, "S": 0.45})
    e_hull_max: float | None = Field(0.03, description="eV/atom; None: no E_hull filter")
    max_volume_per_mobile: float = Field(200.0, gt=0, description="Å^3 per Li")
    # Cell and MD.
    min_length: float = Field(10.0, ge=0, description="Å, plane spacing of the MD cell")
    max_atoms: int = Field(1000, ge=1)
    temperature: float = Field(700.0, gt=0, description="K")
    pressure_bar: float = Field(1.0, description="NPT pressure, bar")
    timestep_fs: float = Field(2.0, gt=0)
    npt_ps: float = Field(10.0, ge=0)
    nvt_ps: float = Field(60.0, gt=0)
    analysis_ps: float = Field(50.0, gt=0, description="final part of NVT used for the MSD fit")
    sample_every: int = Field(10, ge=1, description="MD steps between stored frames")
    tdamp_fs: float = Field(100.0, gt=0, description="thermostat time constant")
    pdamp_fs: float = Field(1000.0, gt=0, description="barostat time constant")
    max_temperature_factor: float = Field(3.0, gt=1, description="abort MD when T exceeds this x target")
    msd_smoothing: Literal["none", "max"] = Field(
        "none", description="none: one time origin, paper Eq. 1; max: all origins (DiffusionAnalyzer)"
    )
    # Gates.
    framework_max_diffusivity: float = Field(1e-6, gt=0, description="cm^2/s, for every non-mobile element")
    conductor_threshold: float = Field(400.0, ge=0, description="mS/cm")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> ConductivitySettings:
        if self.analysis_ps > self.nvt_ps:
            raise ValueError(f"analysis_ps ({self.analysis_ps}) is longer than nvt_ps ({self.nvt_ps})")
        return self

    @property
    def n_npt_steps(self) -> int:
        return int(round(self.npt_ps * 1000 / self.timestep_fs))

    @property
    def n_nvt_steps(self) -> int:
        return int(round(self.nvt_ps * 1000 / self.timestep_fs))


class ConductivityResult(BaseModel):
    """One structure's screening outcome: filters, MD, D per element, sigma, gates."""

    model_config = ConfigDict(extra="forbid")

    id: str
    formula: str
    iteration: int | None = None
    e_hull: float | None = Field(None, description="eV/atom, from the exploration")
    volume_per_atom: float = Field(..., description="Å^3/atom of the input structure")
    status: Literal["screened_out", "failed", "done"]
    reason: str | None = None
    n_atoms_md: int | None = None
    supercell: list[list[int]] | None = None
    volume_per_atom_md: float | None = Field(None, description="Å^3/atom of the NVT cell")
    diffusivity: dict[str, float] = Field(default_factory=dict, description="cm^2/s per element")
    sigma: float | None = Field(None, description="mS/cm of the mobile ion at `temperature`")
    temperature: float | None = None
    mean_temperature: float | None = Field(None, description="K, mean over NVT samples")
    kinetically_stable: bool | None = None
    conductor: bool | None = None
    msd_time_ps: list[float] = Field(default_factory=list)
    msd: dict[str, list[float]] = Field(default_factory=dict, description="Å^2 per element")
    seconds: dict[str, float] = Field(default_factory=dict, description="wall time per phase")


class ConductivityOutput(BaseModel):
    """All results plus the SI-Table-1-style table of kinetically stable conductors."""

    model_config = ConfigDict(extra="forbid")

    results: list[ConductivityResult]
    table: list[dict] = Field(default_factory=list)
    n_input: int = 0
    n_passed_filters: int = 0
    n_simulated: int = 0
    n_kinetically_stable: int = 0
    n_conductors: int = 0
    model: str | None = None
    settings: dict = Field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- filters
def screen_reason(item: Item, settings: ConductivitySettings) -> str | None:
    """Why a structure is not simulated (None: it passes the paper's filters)."""
    comp = item.structure.composition
    for element, threshold in settings.min_fraction.items():
        x = comp.get_atomic_fraction(element)
        if not x > threshold:
            return f"x_{element}={x:.3f} <= {threshold}"
    if settings.e_hull_max is not None:
        if item.e_hull is None:
            return "E_hull unknown (score the structures first or set e_hull_max: null)"
        if item.e_hull > settings.e_hull_max:
            return f"E_hull={item.e_hull:.3f} > {settings.e_hull_max} eV/atom"
    n_mobile = comp[settings.mobile]
    if n_mobile == 0:
        return f"no {settings.mobile}"
    v_mobile = item.structure.volume / n_mobile
    if not v_mobile < settings.max_volume_per_mobile:
        return f"volume per {settings.mobile} {v_mobile:.1f} >= {settings.max_volume_per_mobile} Å^3"
    return None


def screen_structures(items: list[Item], settings: ConductivitySettings) -> tuple[list[Item], dict[str, str]]:
    """Split into (passing items, {id: reason} of the rest)."""
    kept, rejected = [], {}
    for item in items:
        reason = screen_reason(item, settings)
        if reason is None:
            kept.append(item)
        else:
            rejected[item.id] = reason
    return kept, rejected


# ----------------------------------------------------------------------------- MSD / D / sigma
def diffusion_analyzers(
    structures: list[Structure],
    temperature: float,
    frame_interval_fs: float,
    smoothing: Literal["none", "max"] = "none",
) -> dict:
    """pymatgen-analysis-diffusion's ``DiffusionAnalyzer.from_structures``, one per element.

    It unwraps the frames by minimum image (frames must be closer than half a cell apart,
    as a few fs of MD are) and removes the drift of the other elements.
    """
    from pymatgen.analysis.diffusion.analyzer import DiffusionAnalyzer

    elements = sorted({sp.symbol for sp in structures[0].species})
    if len(elements) < 2:
        raise ValueError("D per element needs at least two elements (drift is removed with the others)")
    return {
        element: DiffusionAnalyzer.from_structures(
            structures, element, temperature, time_step=frame_interval_fs, step_skip=1,
            smoothed=False if smoothing == "none" else smoothing,
        )
        for element in elements
    }


def trajectory_structures(traj: MdTrajectory) -> list[Structure]:
    """The sampled frames as pymatgen Structures (NVT: one cell)."""
    species = traj.structure.species
    return [Structure(traj.lattice, species, frac, coords_are_cartesian=False) for frac in traj.frac_positions]


# ----------------------------------------------------------------------------- MD
@dataclass
class MdTrajectory:
    """Sampled NVT frames (fractional, as simulated) and what the run measured."""

    structure: Structure  # first analysed frame, NVT cell
    frac_positions: np.ndarray  # (n_frames, n_atoms, 3)
    lattice: np.ndarray
    frame_interval_fs: float
    temperatures: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)


class MdUnstable(RuntimeError):
    """The MD ran away (temperature blow-up, non-finite forces)."""


def run_md(structure: Structure, calculator, settings: ConductivitySettings, seed: int = 0) -> MdTrajectory:
    """NPT then NVT with ASE's Nosé-Hoover-chain integrators; frames of the analysis window."""
    from ase import units
    from ase.md.nose_hoover_chain import IsotropicMTKNPT, NoseHooverChainNVT
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = calculator
    rng = np.random.default_rng([seed, 7])
    MaxwellBoltzmannDistribution(atoms, temperature_K=settings.temperature, rng=rng)
    Stationary(atoms)
    dt = settings.timestep_fs * units.fs
    t_limit = settings.max_temperature_factor * settings.temperature

    def check():
        temp = atoms.get_temperature()
        if not np.isfinite(temp) or temp > t_limit:
            raise MdUnstable(f"temperature {temp:.0f} K exceeds {t_limit:.0f} K")
        return temp

    seconds = {}
    start = time.perf_counter()
    if settings.n_npt_steps > 0:
        npt = IsotropicMTKNPT(
            atoms, timestep=dt, temperature_K=settings.temperature,
            pressure_au=settings.pressure_bar * units.bar,
            tdamp=settings.tdamp_fs * units.fs, pdamp=settings.pdamp_fs * units.fs,
        )
        cells = []

        def record_cell():
            check()
            cells.append(atoms.cell.array.copy())

        npt.attach(record_cell, interval=settings.sample_every)
        npt.run(settings.n_npt_steps)
        # NVT runs at the mean cell of the second half of NPT (equilibrated volume).
        mean_cell = np.mean(cells[len(cells) // 2:], axis=0)
        atoms.set_cell(mean_cell, scale_atoms=True)
    seconds["npt"] = time.perf_counter() - start

    start = time.perf_counter()
    nvt = NoseHooverChainNVT(atoms, timestep=dt, temperature_K=settings.temperature,
                             tdamp=settings.tdamp_fs * units.fs)
    n_skip = settings.n_nvt_steps - int(round(settings.analysis_ps * 1000 / settings.timestep_fs))
    frames, temps = [], []

    def sample():
        temp = check()
        if nvt.nsteps >= n_skip:
            frames.append(atoms.get_scaled_positions(wrap=False).copy())
            temps.append(temp)

    nvt.attach(sample, interval=settings.sample_every)
    nvt.run(settings.n_nvt_steps)
    seconds["nvt"] = time.perf_counter() - start
    if len(frames) < 3:
        raise ValueError("fewer than 3 frames in the analysis window: lower sample_every or lengthen nvt_ps")
    first = AseAtomsAdaptor.get_structure(atoms)
    first = Structure(first.lattice, first.species, frames[0])
    return MdTrajectory(first, np.array(frames), atoms.cell.array.copy(),
                        settings.sample_every * settings.timestep_fs, np.array(temps), seconds)


# ----------------------------------------------------------------------------- one structure
def _downsample(x: np.ndarray, n: int = 200) -> list[float]:
    idx = np.unique(np.linspace(0, len(x) - 1, min(n, len(x))).astype(int))
    return [float(v) for v in np.asarray(x)[idx]]


def analyse_trajectory(traj: MdTrajectory, settings: ConductivitySettings) -> dict:
    """D per element, gates and sigma of a sampled trajectory (no force field needed)."""
    from pymatgen.core.periodic_table import get_el_sp

    analyzers = diffusion_analyzers(trajectory_structures(traj), settings.temperature,
                                    traj.frame_interval_fs, settings.msd_smoothing)
    if settings.mobile not in analyzers:
        raise ValueError(f"no {settings.mobile} in the structure")
    diffusivity = {el: float(a.diffusivity) for el, a in analyzers.items()}
    mobile = analyzers[settings.mobile]
    # Nernst-Einstein by the library, whose z is the element's valence count; sigma ~ z^2
    z_library = get_el_sp(settings.mobile).full_electronic_structure[-1][2]
    sigma = float(mobile.conductivity) * (settings.mobile_charge / z_library) ** 2
    stable = all(d < settings.framework_max_diffusivity for el, d in diffusivity.items() if el != settings.mobile)
    return {
        "diffusivity": diffusivity,
        "sigma": sigma,
        "kinetically_stable": stable,
        "conductor": bool(stable and sigma >= settings.conductor_threshold),
        "msd_time_ps": _downsample(np.asarray(mobile.dt) / 1000),
        "msd": {el: _downsample(np.asarray(a.msd)) for el, a in analyzers.items()},
        "mean_temperature": float(np.mean(traj.temperatures)),
    }


def simulate_item(item: Item, calculator, settings: ConductivitySettings, seed: int) -> ConductivityResult:
    """Filter, scale, run and analyse one structure; failures are recorded, never raised."""
    base = dict(id=item.id, formula=item.formula, iteration=item.iteration, e_hull=item.e_hull,
                volume_per_atom=item.structure.volume / len(item.structure), temperature=settings.temperature)
    reason = screen_reason(item, settings)
    if reason is not None:
        return ConductivityResult(status="screened_out", reason=reason, **base)
    try:
        matrix = isotropic_supercell_matrix(item.structure, settings.min_length, settings.max_atoms)
    except ValueError as exc:
        return ConductivityResult(status="failed", reason=str(exc), **base)
    cell = item.structure.copy().make_supercell(matrix)
    base.update(n_atoms_md=len(cell), supercell=matrix)
    try:
        traj = run_md(cell, calculator, settings, seed)
        start = time.perf_counter()
        analysis = analyse_trajectory(traj, settings)
        traj.seconds["analysis"] = time.perf_counter() - start
    except (MdUnstable, ValueError, RuntimeError, FloatingPointError) as exc:
        logger.warning("%s: MD failed: %s", item.id, exc)
        return ConductivityResult(status="failed", reason=f"{type(exc).__name__}: {exc}", **base)
    return ConductivityResult(
        status="done", volume_per_atom_md=traj.structure.volume / len(traj.structure),
        seconds=traj.seconds, **analysis, **base,
    )


def candidate_table(results: list[ConductivityResult], only_conductors: bool = True) -> list[dict]:
    """Rows like SI Table 1: iteration, name, formula, v_atom, sigma_Li(T), E_hull (meV/atom)."""
    rows = []
    for r in results:
        if r.status != "done" or (only_conductors and not r.conductor):
            continue
        rows.append({
            "iteration": r.iteration,
            "name": r.id,
            "formula": r.formula,
            "v_atom": round(r.volume_per_atom, 1),
            "sigma_mS_cm": round(r.sigma, 1),
            "e_hull_meV_atom": None if r.e_hull is None else round(1000 * r.e_hull, 1),
            "kinetically_stable": r.kinetically_stable,
        })
    return sorted(rows, key=lambda row: -row["sigma_mS_cm"])


def plot_msd(results: list[ConductivityResult], path: str | Path, element: str = "Li") -> Path:
    """MSD of `element` vs time for every simulated structure (paper Fig. 6b-c)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in results:
        if r.status == "done" and element in r.msd:
            color = "tab:red" if r.conductor else "tab:cyan"
            ax.plot(r.msd_time_ps, r.msd[element], color=color, lw=1.2,
                    label=f"{r.formula} {r.id} ({r.sigma:.0f} mS/cm)")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel(f"{element} MSD (Å$^2$)")
    if ax.lines:
        ax.legend(fontsize=6)
    return save_figure(fig, path, dpi=150)


def write_conductivity_report(output: ConductivityOutput, directory: str | Path) -> dict[str, Path]:
    """Table (CSV + Markdown, all simulated structures and conductors) and MSD plot."""
    import csv

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    rows = candidate_table(output.results, only_conductors=False)
    columns = ["iteration", "name", "formula", "v_atom", "sigma_mS_cm", "e_hull_meV_atom", "kinetically_stable"]
    with open(directory / "conductivity_all.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    files["csv"] = directory / "conductivity_all.csv"
    lines = [
        "| Iteration | Name | Formula | v_atom (Å³/atom) | σ_Li (mS/cm) | E_hull (meV/atom) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['iteration']} | {r['name']} | {r['formula']} | {r['v_atom']} | {r['sigma_mS_cm']} "
              f"| {r['e_hull_meV_atom']} |" for r in output.table]
    (directory / "conductors.md").write_text("\n".join(lines) + "\n")
    files["table"] = directory / "conductors.md"
    files["msd"] = plot_msd(output.results, directory / "msd_li.png")
    return files


# ----------------------------------------------------------------------------- Maker
@dataclass
class ConductivityMaker(Maker):
    """Screen a finished exploration's structures for Li-ion conductors by MD."""

    name: str = "conductivity"
    forcefield: ForceFieldSettings = field(default_factory=ForceFieldSettings)
    settings: ConductivitySettings = field(default_factory=ConductivitySettings)

    @job(data=["results"])
    def make(self, structures, model_path: str | None = None) -> ConductivityOutput:
        return screen_conductivity(structures, self.forcefield, self.settings, model_path)


def screen_conductivity(
    structures, forcefield: ForceFieldSettings | None = None,
    settings: ConductivitySettings | None = None, model_path: str | None = None,
) -> ConductivityOutput:
    """Plain-function body of :class:`ConductivityMaker` (filters, MD, analysis, table)."""
    settings = settings or ConductivitySettings()
    start = time.perf_counter()
    items = as_items(structures)
    passing = [it for it in items if screen_reason(it, settings) is None]
    calculator = resolve_calculator(forcefield, model_path) if passing else None
    results = []
    for index, item in enumerate(items):
        results.append(simulate_item(item, calculator, settings, seed=settings.seed + index))
        if results[-1].status != "screened_out":
            logger.info("%s %s: %s sigma=%s", item.id, item.formula, results[-1].status, results[-1].sigma)
    done = [r for r in results if r.status == "done"]
    return ConductivityOutput(
        results=results,
        table=candidate_table(results),
        n_input=len(items),
        n_passed_filters=len(passing),
        n_simulated=len(done),
        n_kinetically_stable=sum(bool(r.kinetically_stable) for r in done),
        n_conductors=sum(bool(r.conductor) for r in done),
        model=resolve_model_tag(forcefield, model_path),
        settings=settings.model_dump(mode="json"),
        seconds=time.perf_counter() - start,
    )
