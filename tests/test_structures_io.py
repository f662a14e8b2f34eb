"""Seed structures from files and JSON records; malformed files are reported by name."""

import json

import pytest
from pymatgen.core import Structure

from cscflow.structures_io import StructureReadError, load_seed_files, read_structures


def test_json_records_from_shared_data(shared_data_dir):
    seeds = read_structures(shared_data_dir / "lips.json")
    assert len(seeds) == 90
    by_id = {s.label: s for s in seeds}
    li2s = by_id["mp-1153"].structure
    assert li2s.composition.reduced_formula == "Li2S"
    assert by_id["mp-1153"].extra["spacegroup_number"] == 225


def test_cif_poscar_extxyz_round_trip(tmp_path, lips_structures):
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    li3ps4 = lips_structures["mp-985583"]
    li3ps4.to(filename=str(tmp_path / "beta.cif"))
    li3ps4.to(filename=str(tmp_path / "POSCAR"), fmt="poscar")
    frames = [AseAtomsAdaptor.get_atoms(lips_structures[i]) for i in ("mp-1153", "mp-736")]
    write(tmp_path / "two.extxyz", frames, format="extxyz")

    for name in ("beta.cif", "POSCAR"):
        (seed,) = read_structures(tmp_path / name)
        assert seed.structure.composition.reduced_formula == "Li3PS4"
        assert len(seed.structure) == 32
    xyz = read_structures(tmp_path / "two.extxyz")
    assert [s.structure.composition.reduced_formula for s in xyz] == ["Li2S", "Li3P"]


def test_malformed_files_are_named(tmp_path):
    bad_cif = tmp_path / "broken.cif"
    bad_cif.write_text("data_broken\n_cell_length_a 3\nloop_\n_atom_site_label\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    for path in (bad_cif, bad_json):
        with pytest.raises(StructureReadError, match=path.name):
            read_structures(path)


def test_load_seed_files_skips_or_raises(tmp_path, lips_records, znps_records):
    good = tmp_path / "lips.json"
    good.write_text(json.dumps(lips_records[:3] + [r for r in znps_records if r["formula"] == "ZnS"][:1]))
    bad = tmp_path / "bad.cif"
    bad.write_text("nonsense")
    seeds, problems = load_seed_files([good, bad], ["Li", "P", "S"], on_error="skip")
    assert len(seeds) == 3
    assert any("bad.cif" in p for p in problems)
    assert any("outside the chemical system" in p for p in problems)
    with pytest.raises(StructureReadError, match="bad.cif"):
        load_seed_files([good, bad], ["Li", "P", "S"], on_error="raise")
    assert all(isinstance(s.structure, Structure) for s in seeds)
