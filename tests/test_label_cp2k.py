"""CP2K labeller: units and signs against a direct, hand-parsed CP2K run; errors are clear.

Runs real CP2K (Debian's cp2k 2023.1) on the 3-atom Li2S cell (mp-1153) with light
settings; skipped when CP2K is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ase.units import GPa, Bohr, Hartree
from pymatgen.io.ase import AseAtomsAdaptor

from cscflow.config import CP2KSettings, LabelSettings
from cscflow.schemas import Candidate, Provenance

needs_cp2k = pytest.mark.skipif(
    shutil.which("cp2k_shell") is None or shutil.which("cp2k.psmp") is None,
    reason="CP2K not installed (apt-get install -y cp2k cp2k-data)",
)

LIGHT = dict(cutoff=200.0, rel_cutoff=40.0, kspacing=1.0)


@pytest.fixture()
def li2s(lips_structures):
    s = lips_structures["mp-1153"].copy()
    s.perturb(0.1, min_distance=0.1)  # forces and shear stress become non-zero
    return s


def _parse_direct(text: str):
    energy = float(re.search(r"ENERGY\| Total FORCE_EVAL \( QS \) energy \[a\.u\.\]:\s+(\S+)", text).group(1))
    block = text.split("ATOMIC FORCES in [a.u.]")[1].split("SUM OF ATOMIC FORCES")[0]
    forces = [[float(x) for x in line.split()[3:6]] for line in block.splitlines()
              if re.match(r"\s+\d+\s+\d+\s+[A-Z][a-z]?\s", line)]
    rows = re.findall(r"STRESS\|\s+[xyz]\s+(-?\d\S*)\s+(-?\d\S*)\s+(-?\d\S*)", text)[:3]
    return energy, np.array(forces), np.array(rows, dtype=float)


def test_kpoint_mesh_follows_kspacing(li2s):
    from cscflow.label.cp2k import kpoint_mesh

    coarse = kpoint_mesh(li2s.lattice.matrix, 1.0)
    fine = kpoint_mesh(li2s.lattice.matrix, 0.25)
    assert all(f > c for f, c in zip(fine, coarse))
    # |b| = 2π / d_hkl; a 40 Å axis needs a single k-point at 0.5 1/Å
    assert kpoint_mesh(np.diag([40.0, 40.0, 4.0]), 0.5) == (1, 1, 4)


def test_missing_binary_names_the_setting():
    from cscflow.label.cp2k import CP2KNotFoundError, cp2k_command

    with pytest.raises(CP2KNotFoundError, match=r"labeller\.cp2k\.command.*CSCFLOW_CP2K_COMMAND"):
        cp2k_command(CP2KSettings(command="no-such-cp2k-binary -s"))


def test_cp2k_registered_in_labellers():
    from cscflow.label import get_labeller, protocol_labeller

    assert get_labeller("cp2k") is protocol_labeller


@needs_cp2k
def test_units_match_a_direct_cp2k_run(li2s, tmp_path):
    """eV, eV/Å and GPa (ASE sign) from the calculator equal CP2K's own a.u./GPa output."""
    from cscflow.label.cp2k import cp2k_calculator

    atoms = AseAtomsAdaptor.get_atoms(li2s)
    calc = cp2k_calculator(CP2KSettings(**LIGHT), atoms.cell[:], tmp_path / "shell")
    atoms.calc = calc
    try:
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=False) / GPa
    finally:
        calc.close()

    # The same input, run directly by the cp2k binary with forces printed, parsed by hand.
    inp = (tmp_path / "shell" / "cp2k.inp").read_text()
    inp = inp.replace("   &PRINT\n", "   &PRINT\n      &FORCES ON\n      &END FORCES\n", 1)
    inp = inp.replace(str(tmp_path / "shell" / "cp2k"), "direct")
    (tmp_path / "direct.inp").write_text(inp)
    subprocess.run(["cp2k.psmp", "-i", "direct.inp", "-o", "direct.out"], cwd=tmp_path,
                   check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    e_au, f_au, s_gpa = _parse_direct((tmp_path / "direct.out").read_text())

    assert f_au.shape == (3, 3) and s_gpa.shape == (3, 3)
    assert energy == pytest.approx(e_au * Hartree, abs=1e-4)
    np.testing.assert_allclose(forces, f_au * Hartree / Bohr, atol=1e-4)
    np.testing.assert_allclose(stress, -s_gpa, atol=1e-3)  # CP2K prints pressure-positive stress
    assert np.abs(forces).max() > 0.01  # perturbed: a real test of the force conversion
    assert energy / 3 == pytest.approx(-229.5, abs=1.0)  # PBE/GTH total energy scale


@needs_cp2k
def test_unconverged_scf_is_a_recorded_failure(lips_structures):
    """A real failing calculation (SCF cut at 2 steps) is recorded with its error, not raised."""
    from cscflow.label.protocol import run_static

    cand = Candidate(provenance=Provenance(candidate_id="li2s", iteration=0, generator="seed"),
                     structure=lips_structures["mp-1153"], status="relaxed")
    settings = LabelSettings(backend="cp2k", cp2k=CP2KSettings(**{**LIGHT, "max_scf": 2}))
    from cscflow.label.protocol import StepResult

    relaxed = StepResult(candidate_id="li2s", step="relax0", label_seed=1,
                         final_structure=cand.structure, final_energy_per_atom=0.0, converged=True)
    res = run_static(cand, 0, 123, [relaxed], settings)
    assert list(res.frames) == []
    assert len(res.failures) == 1
    assert res.failures[0]["frame_id"] == "li2s-static0"
    assert "SCF did not converge" in res.failures[0]["error"]
