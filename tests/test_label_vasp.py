"""VASP inputs match the paper (Methods 4.2); no VASP binary -> a clear error naming VASP_CMD."""

from __future__ import annotations

import pytest
from pymatgen.io.vasp import Kpoints

from cscflow.config import LabelSettings
from cscflow.schemas import Candidate, Provenance


@pytest.fixture()
def li3ps4(lips_records):
    # (not `from tests.conftest import ...`: mace-torch installs a top-level `tests` package)
    from pymatgen.core import Structure

    rec = next(r for r in lips_records if r["formula"] == "Li3PS4")
    return Structure.from_str(rec["cif"], fmt="cif")


def _inputs(generator, structure):
    return generator.get_input_set(structure, potcar_spec=True)


def test_relax_inputs_follow_the_paper(li3ps4):
    from cscflow.label.vasp import PaperRelaxSetGenerator

    vis = _inputs(PaperRelaxSetGenerator(), li3ps4)
    incar, n = vis.incar, len(li3ps4)
    assert incar["ENCUT"] == 520
    assert incar["EDIFF"] == pytest.approx(5e-5 * n)
    assert incar["EDIFFG"] == pytest.approx(10 * 5e-5 * n)  # > 0: energy criterion, 10x EDIFF
    assert incar["ISIF"] == 3 and incar["NSW"] > 0 and incar["IBRION"] == 2
    assert "GGA" not in incar and "METAGGA" not in incar  # PBE from the POTCARs, not PBEsol/r2SCAN
    kpts = vis.kpoints
    assert kpts.style == Kpoints.supported_modes.Gamma
    # reciprocal density 64 per Å^-3: pymatgen's own rule gives the same mesh
    expected = Kpoints.automatic_density_by_vol(li3ps4, 64, force_gamma=True)
    assert list(kpts.kpts[0]) == list(expected.kpts[0])
    assert vis["POTCAR.spec"].split() == ["Li_sv", "P", "S"]
    poscar = vis.poscar
    assert poscar.structure.composition == li3ps4.composition
    assert poscar.site_symbols == ["Li", "P", "S"]


def test_ediff_scales_with_atoms(lips_structures):
    from cscflow.label.vasp import PaperRelaxSetGenerator

    small = lips_structures["mp-1153"]  # Li2S, 3 atoms
    incar = _inputs(PaperRelaxSetGenerator(), small).incar
    assert incar["EDIFF"] == pytest.approx(1.5e-4)
    assert incar["EDIFFG"] == pytest.approx(1.5e-3)


def test_static_and_scf_sets(li3ps4):
    from cscflow.label.vasp import PaperSCFSetGenerator, PaperStaticSetGenerator

    static = _inputs(PaperStaticSetGenerator(), li3ps4)
    assert static.incar["NSW"] == 0 and static.incar["ENCUT"] == 520
    assert static.incar["EDIFF"] == pytest.approx(5e-5 * len(li3ps4))
    assert static.kpoints.style == Kpoints.supported_modes.Gamma
    scf = _inputs(PaperSCFSetGenerator(), li3ps4)
    assert scf.incar["EDIFF"] == pytest.approx(1e-5)
    assert scf.incar["KSPACING"] == pytest.approx(0.2)
    assert scf.incar["LCHARG"] is True
    assert scf.kpoints is None  # KSPACING replaces the KPOINTS file
    assert scf["POTCAR.spec"].split() == ["Li_sv", "P", "S"]


def test_makers_carry_the_paper_sets():
    from cscflow.label.vasp import (PaperRelaxSetGenerator, PaperStaticSetGenerator,
                                    paper_relax_maker, paper_static_maker)

    assert isinstance(paper_relax_maker().input_set_generator, PaperRelaxSetGenerator)
    assert isinstance(paper_static_maker().input_set_generator, PaperStaticSetGenerator)


def test_missing_vasp_names_vasp_cmd(lips_structures, monkeypatch):
    from cscflow.label import label_candidates
    from cscflow.label.vasp import VaspNotFoundError, check_vasp_command

    with pytest.raises(VaspNotFoundError, match="VASP_CMD"):
        check_vasp_command("srun no-such-vasp_std")
    from atomate2 import SETTINGS

    monkeypatch.setattr(SETTINGS, "VASP_CMD", "no-such-vasp_std")
    cand = Candidate(provenance=Provenance(candidate_id="c", iteration=1, generator="seed"),
                     structure=lips_structures["mp-1153"], status="relaxed")
    with pytest.raises(VaspNotFoundError, match="VASP_CMD"):
        label_candidates([cand], 1, 0, LabelSettings(backend="vasp"))


def test_vasp_flow_structure(lips_structures):
    """3 perturbed relaxations + a statics job + collector per candidate; inputs perturbed."""
    from cscflow.label.vasp import PaperRelaxSetGenerator, vasp_flow

    s = lips_structures["mp-1153"]
    cand = Candidate(provenance=Provenance(candidate_id="c", iteration=1, generator="seed"),
                     structure=s, status="relaxed")
    flow = vasp_flow([cand], 1, 0, LabelSettings(backend="vasp"))
    relaxes = [j for j in flow.jobs if "relax" in j.name]
    assert len(relaxes) == 3 and len(flow.jobs) == 5
    for j in relaxes:
        assert isinstance(j.maker.input_set_generator, PaperRelaxSetGenerator)
        moved = j.function_args[0]
        assert moved.lattice != s.lattice  # perturbed copies, not the input
    assert flow.jobs[-1].config.on_missing_references.value == "none"
