"""Anion motifs on real MP structures and hand-made P2S6 / (PS3)n cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from pymatgen.core import Lattice, Structure

from cscflow.analysis.motifs import (
    MotifCatalogMaker,
    MotifSettings,
    build_motif_catalog,
    export_clusters,
    find_motifs,
    motif_counts,
    motifs_command,
)
from cscflow.schemas import Candidate, Provenance


def _counts(structure, settings=None):
    return {(m["formula"], m["periodic"]): m["count"] for m in motif_counts(find_motifs(structure, settings))}


def _p2s6_dimer(box: float = 15.0) -> Structure:
    """Staggered S3P–PS3 (P–P 2.20 Å, P–S 2.05 Å, tetrahedral angles) with 4 Li far away."""
    c = np.full(3, box / 2)
    p1, p2 = c + [0, 0, 1.10], c - [0, 0, 1.10]
    species, coords = ["P", "P"], [p1, p2]
    st, ct = np.sin(np.radians(109.47)), -np.cos(np.radians(109.47))
    for phi in (0, 120, 240):
        f = np.radians(phi)
        coords.append(p1 + 2.05 * np.array([st * np.cos(f), st * np.sin(f), ct]))
        coords.append(p2 + 2.05 * np.array([st * np.cos(f + np.pi / 3), st * np.sin(f + np.pi / 3), -ct]))
        species += ["S", "S"]
    for corner in ([0.5, 0.5, 0.5], [0.5, 7.5, 0.5], [7.5, 0.5, 0.5], [0.5, 0.5, 7.5]):
        species.append("Li")
        coords.append(corner)
    return Structure(Lattice.cubic(box), species, coords, coords_are_cartesian=True)


def _ps3_chain(a: float = 3.74) -> Structure:
    """Corner-sharing PS4 tetrahedra along x: one P, one bridging and two terminal S per cell."""
    lattice = Lattice.orthorhombic(a, 10.0, 10.0)
    coords = [[0, 5, 5], [a / 2, 5.9, 5], [0, 3.8, 6.7], [0, 3.8, 3.3], [a / 2, 1.0, 1.0]]
    return Structure(lattice, ["P", "S", "S", "S", "Li"], coords, coords_are_cartesian=True)


def test_beta_li3ps4_has_only_isolated_ps4(lips_structures):
    motifs = find_motifs(lips_structures["mp-985583"])
    assert {m.formula for m in motifs} == {"PS4"}
    assert len(motifs) == 4 and not any(m.periodic for m in motifs)
    assert all(m.charge == -3 and "PS4" in m.name for m in motifs)
    assert len({m.hash for m in motifs}) == 1
    # Li never enters the graph
    s = lips_structures["mp-985583"]
    assert all(s[i].specie.symbol != "Li" for m in motifs for i in m.site_indices)


def test_li7p3s11_has_ps4_and_p2s7(lips_structures):
    counts = _counts(lips_structures["mp-641703"])
    assert counts == {("PS4", False): 2, ("P2S7", False): 2}
    names = {m.formula: m.name for m in find_motifs(lips_structures["mp-641703"])}
    assert "corner-sharing" in names["P2S7"]


def test_p4s10_is_one_cage_per_molecule(lips_structures):
    s = lips_structures["mp-541788"]  # P8S20 cell, recorded as P2S5
    motifs = find_motifs(s)
    assert [m.formula for m in motifs] == ["P4S10", "P4S10"]
    assert len({m.hash for m in motifs}) == 1 and motifs[0].charge == 0
    assert motifs[0].name == "P4S10 cage"


def test_hand_made_p_p_dimer_is_recognised():
    motifs = find_motifs(_p2s6_dimer())
    assert len(motifs) == 1
    m = motifs[0]
    assert m.formula == "P2S6" and not m.periodic and m.charge == -4
    assert "P–P" in m.name
    # an edge-sharing P2S6 (no P–P bond) must not get the same hash: stretch the P–P bond
    settings = MotifSettings(cutoffs={"P-S": 2.35, "S-S": 2.20, "P-P": 2.0})
    broken = find_motifs(_p2s6_dimer(), settings)
    assert sorted(b.formula for b in broken) == ["PS3", "PS3"]
    assert broken[0].hash != m.hash


def test_periodic_chain_is_not_a_cluster():
    chain = _ps3_chain()
    motifs = find_motifs(chain)
    assert len(motifs) == 1
    m = motifs[0]
    assert m.periodic and m.dimensionality == 1 and m.formula == "PS3"
    assert m.name.startswith("(PS3)n") and "chain" in m.name and m.charge == -1
    # the same chain in a supercell (along and across the chain) keeps its hash
    assert {x.hash for x in find_motifs(chain * (2, 1, 1))} == {m.hash}
    across = find_motifs(chain * (1, 2, 1))
    assert len(across) == 2 and {x.hash for x in across} == {m.hash}


def test_real_periodic_components(lips_structures):
    (layer,) = motif_counts(find_motifs(lips_structures["mp-157"]))  # black P
    assert layer["periodic"] and layer["dimensionality"] == 2
    (chain,) = motif_counts(find_motifs(lips_structures["mp-1006118"]))  # P2S7 chains
    assert chain["periodic"] and chain["dimensionality"] == 1 and chain["formula"] == "P2S7"


def test_disordered_li_is_ignored_but_other_disorder_is_an_error(lips_structures):
    s = lips_structures["mp-985583"].copy()
    for i, site in enumerate(s):
        if site.specie.symbol == "Li":
            s.replace(i, {"Li": 0.5})
    assert _counts(s) == {("PS4", False): 4}
    s.replace(next(i for i, x in enumerate(s) if "S" in x.species.formula), {"S": 0.5, "Se": 0.5})
    with pytest.raises(ValueError, match="disordered"):
        find_motifs(s)


def _candidates(lips_structures):
    def cand(cid, it, mp):
        return Candidate(
            provenance=Provenance(candidate_id=cid, iteration=it, generator="seed"),
            structure=lips_structures[mp], status="relaxed",
        )

    return [
        [cand("a", 0, "mp-985583"), cand("b", 0, "mp-641703")],
        [cand("c", 1, "mp-641703"), cand("d", 1, "mp-541788")],
    ]


def test_catalog_and_export(lips_structures, tmp_path):
    catalog = build_motif_catalog(
        _candidates(lips_structures), references=[lips_structures["mp-985583"]]
    )
    by_formula = {r.formula: r for r in catalog.records}
    assert set(by_formula) == {"PS4", "P2S7", "P4S10"}
    assert by_formula["PS4"].count == 4 + 2 + 2 and by_formula["PS4"].example_ids == ["a", "b", "c"]
    assert by_formula["PS4"].in_references and not by_formula["P2S7"].in_references
    assert by_formula["P2S7"].first_iteration == 0 and by_formula["P4S10"].first_iteration == 1
    assert catalog.n_structures == 4 and not catalog.failures

    paths = export_clusters(catalog, tmp_path, fmt="extxyz")
    assert len(paths) == 3
    from ase.io import read

    atoms = read(next(p for p in paths if p.name.startswith("P4S10")))
    assert len(atoms) == 14 and np.allclose(atoms.cell.lengths(), 20.0)
    centre = atoms.positions.mean(axis=0)
    assert np.allclose(centre, 10.0, atol=1.5)
    cif = export_clusters(catalog, tmp_path / "cif", fmt="cif")
    assert Structure.from_file(cif[0]).lattice.abc == pytest.approx((20.0, 20.0, 20.0))


def test_maker_runs_in_jobflow(lips_structures):
    from jobflow import run_locally

    job = MotifCatalogMaker().make(_candidates(lips_structures))
    out = run_locally(job, ensure_success=True)[job.uuid][1].output
    assert {r.formula for r in out.records} == {"PS4", "P2S7", "P4S10"}


def test_cli_json_and_text(lips_structures, tmp_path):
    from pymatgen.io.cif import CifWriter

    beta = lips_structures["mp-985583"].copy()
    for i, site in enumerate(beta):
        if site.specie.symbol == "Li":
            beta.replace(i, {"Li": 0.75})
    CifWriter(beta).write_file(tmp_path / "beta_disordered.cif")
    lips_structures["mp-641703"].to(filename=str(tmp_path / "POSCAR"))
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    write(tmp_path / "dimer.extxyz", AseAtomsAdaptor.get_atoms(_p2s6_dimer()), format="extxyz")

    files = [str(tmp_path / n) for n in ("beta_disordered.cif", "POSCAR", "dimer.extxyz")]
    result = CliRunner().invoke(motifs_command, [*files, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["file"] for d in data] == files
    got = [{(m["formula"], m["count"]) for m in d["motifs"]} for d in data]
    assert got == [{("PS4", 4)}, {("PS4", 2), ("P2S7", 2)}, {("P2S6", 1)}]
    assert set(data[0]["motifs"][0]) == {"formula", "hash", "count", "periodic", "name"}

    text = CliRunner().invoke(motifs_command, files[1:2])
    assert text.exit_code == 0 and "P2S7" in text.output and "PS4" in text.output

    bad = tmp_path / "broken.cif"
    bad.write_text("not a cif")
    failed = CliRunner().invoke(motifs_command, [str(bad)])
    assert failed.exit_code != 0 and "broken.cif" in failed.output

    # one malformed and one disordered file do not stop the batch: each is its own error
    se = lips_structures["mp-985583"].copy()
    se.replace(next(i for i, x in enumerate(se) if x.specie.symbol == "S"), {"S": 0.5, "Se": 0.5})
    CifWriter(se).write_file(tmp_path / "se_disordered.cif")
    batch = [str(bad), files[1], str(tmp_path / "se_disordered.cif"), files[2]]
    mixed = CliRunner().invoke(motifs_command, [*batch, "--json"])
    assert mixed.exit_code == 2 and "Traceback" not in mixed.output
    data = json.loads(mixed.stdout)
    assert [d["file"] for d in data] == batch
    assert "broken.cif" in data[0]["error"] and "disordered" in data[2]["error"]
    assert {(m["formula"], m["count"]) for m in data[1]["motifs"]} == {("PS4", 2), ("P2S7", 2)}
    assert {(m["formula"], m["count"]) for m in data[3]["motifs"]} == {("P2S6", 1)}
    assert mixed.stderr.count("error:") == 2
    plain = CliRunner().invoke(motifs_command, batch)
    assert plain.exit_code == 2 and "P2S7" in plain.stdout and "P2S6" in plain.stdout
    assert "se_disordered.cif" in plain.stderr
