"""CP2K labeller: real DFT (PBE, GTH pseudopotentials, MOLOPT basis) for laptops and CI.

ASE's CP2K calculator drives ``cp2k_shell`` (Debian's ``cp2k`` 2023.1 package): one CP2K
process per relaxation/static, no startup cost per ionic step, and ASE already converts
CP2K's atomic units (``UNITS_EV_A``: energy eV, forces eV/Å, stress eV/Å³ with the sign
flipped to ASE's convention). We chose this over atomate2's CP2K makers because atomate2
0.1.5's parser crashes in ``cleanup_dft`` and reports forces in Ha/Bohr.

The per-structure protocol (perturb -> relax -> keep steps -> statics) lives in
:mod:`cscflow.label.protocol`; this module provides only the engine: the calculator and
its labeller tag (:mod:`cscflow.label.engines` hands it to the protocol).
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import numpy as np

from cscflow.config import CP2KSettings

__all__ = [
    "CP2KError",
    "CP2KNotFoundError",
    "cp2k_calculator",
    "cp2k_command",
    "cp2k_input_template",
    "kpoint_mesh",
    "labeller_name",
]

COMMAND_ENV = "CSCFLOW_CP2K_COMMAND"
RYDBERG_EV = 13.605693122994  # ase.units.Rydberg


class CP2KError(RuntimeError):
    """A CP2K calculation that ran but cannot be used (e.g. SCF not converged)."""


class CP2KNotFoundError(RuntimeError):
    """The CP2K binary is not installed or not on PATH."""


def cp2k_command(settings: CP2KSettings) -> str:
    """The cp2k_shell command line; a clear error when the binary is missing."""
    command = settings.command or os.environ.get(COMMAND_ENV) or "cp2k_shell"
    words = shlex.split(command)
    exe = next((w for w in words if w != "env" and "=" not in w), None)
    if exe is None or shutil.which(exe) is None:
        raise CP2KNotFoundError(
            f"CP2K binary {exe!r} not found (command {command!r}): install it "
            "(apt-get install -y cp2k cp2k-data) or set labeller.cp2k.command "
            f"or ${COMMAND_ENV} to a CP2K shell command such as 'cp2k.psmp -s'"
        )
    if "-s" not in words and "--shell" not in words and not Path(exe).name.startswith("cp2k_shell"):
        command += " -s"  # ASE talks to CP2K's shell mode
    return f"env OMP_NUM_THREADS={settings.threads} {command}"


def kpoint_mesh(cell: np.ndarray, kspacing: float) -> tuple[int, int, int]:
    """VASP-style KSPACING mesh n_i = max(1, ceil(2π|b_i| / kspacing)), by ASE's
    ``kptdensity2monkhorstpack`` (density 1/kspacing points per Å⁻¹, odd sizes allowed)."""
    from ase import Atoms
    from ase.calculators.calculator import kptdensity2monkhorstpack

    atoms = Atoms(cell=np.asarray(cell, dtype=float), pbc=True)
    return tuple(int(n) for n in kptdensity2monkhorstpack(atoms, kptdensity=1.0 / kspacing, even=False))


def cp2k_input_template(settings: CP2KSettings, mesh: tuple[int, int, int]) -> str:
    """The part of the input ASE does not write: k-points, grids, SCF mixing and smearing."""
    smear = (
        "   &SMEAR ON\n    METHOD FERMI_DIRAC\n"
        f"    ELECTRONIC_TEMPERATURE [K] {settings.smearing_temperature}\n   &END SMEAR\n"
        if settings.smearing_temperature > 0
        else ""
    )
    kpoints = (
        "  &KPOINTS\n   SCHEME MONKHORST-PACK {} {} {}\n  &END KPOINTS\n".format(*mesh)
        if mesh != (1, 1, 1)
        else ""
    )
    return (
        "&FORCE_EVAL\n &DFT\n"
        f"{kpoints}"
        f"  &MGRID\n   REL_CUTOFF {settings.rel_cutoff}\n  &END MGRID\n"
        f"  &SCF\n   EPS_SCF {settings.eps_scf:.3E}\n   ADDED_MOS {settings.added_mos}\n"
        f"{smear}"
        "   &MIXING\n    METHOD BROYDEN_MIXING\n    ALPHA 0.4\n   &END MIXING\n"
        "  &END SCF\n &END DFT\n&END FORCE_EVAL\n"
    )


def _checked_cp2k_class():
    from ase.calculators.cp2k import CP2K

    class CheckedCP2K(CP2K):
        """ASE's CP2K that refuses results whose SCF did not converge (CP2K only warns)."""

        def calculate(self, atoms=None, properties=None, system_changes=None):
            from ase.calculators.calculator import all_changes

            out = Path(self.label + ".out")
            start = out.stat().st_size if out.exists() else 0
            super().calculate(atoms, properties, all_changes if system_changes is None else system_changes)
            text = out.read_text(errors="replace")[start:] if out.exists() else ""
            if "SCF run NOT converged" in text:
                raise CP2KError(
                    f"CP2K SCF did not converge within max_scf={self.parameters.max_scf} "
                    f"steps (see {out}); raise labeller.cp2k.max_scf or smearing_temperature"
                )
            for key in ("energy", "forces", "stress"):
                if not np.isfinite(np.asarray(self.results[key])).all():
                    raise CP2KError(f"CP2K returned a non-finite {key} (see {out})")

    return CheckedCP2K


def cp2k_calculator(settings: CP2KSettings, cell: np.ndarray, workdir: str | Path, label: str = "cp2k"):
    """An ASE CP2K calculator (PBE, GTH, MOLOPT); k-mesh from ``cell`` and ``kspacing``.

    Close it (``calc.close()``) to stop the cp2k_shell process.
    """
    command = cp2k_command(settings)
    if settings.data_dir is not None:
        os.environ["CP2K_DATA_DIR"] = str(settings.data_dir)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = kpoint_mesh(cell, settings.kspacing)
    return _checked_cp2k_class()(
        command=command,
        label=str(workdir / label),
        xc=settings.xc,
        basis_set=settings.basis_set,
        basis_set_file=settings.basis_set_file,
        pseudo_potential=settings.pseudo_potential,
        potential_file=settings.potential_file,
        cutoff=settings.cutoff * RYDBERG_EV,
        max_scf=settings.max_scf,
        inp=cp2k_input_template(settings, mesh),
        print_level="LOW",
        stress_tensor=True,
    )


def labeller_name(settings: CP2KSettings) -> str:
    """Tag written on every CP2K frame: code, functional, basis, cutoff, k-spacing."""
    return (
        f"cp2k:{settings.xc}/{settings.basis_set}/{settings.pseudo_potential}"
        f"/{settings.cutoff:g}Ry/k{settings.kspacing:g}"
    )
