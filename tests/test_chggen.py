"""CHGGen (paper 002): lattice search, framework symmetrization, RePaint, metrics, spec.

Inpainting tests train one tiny MatterGen (from scratch, ~100 steps, Li-Si structures of
../shared/data/lisi.json) and skip when MatterGen's environment (.venv-mattergen) is absent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from cscflow.chggen.lattice import estimate_volume_per_atom, random_lattice
from cscflow.chggen.metrics import (
    coordination_statistics,
    decomposition_energies,
    displacement_rmsd,
    partial_rdfs,
    symmetry_success_rate,
)
from cscflow.chggen.settings import CRYSTAL_SYSTEMS, ChgGenSettings, load_chggen_spec
from cscflow.chggen.symmetrize import space_group, symmetrize_framework
from cscflow.config import SpecError
from cscflow.schemas import ReferenceEntry

from test_mattergen import have_mattergen, needs_mattergen  # one check of .venv-mattergen for both files


def _rattle(s: Structure, sigma: float, seed: int) -> Structure:
    rng = np.random.default_rng(seed)
    return Structure(s.lattice, s.species, s.cart_coords + rng.normal(0, sigma, (len(s), 3)),
                     coords_are_cartesian=True)


# ------------------------------------------------------------------ lattice search


@pytest.mark.parametrize("system", CRYSTAL_SYSTEMS)
def test_random_lattice_volume_and_system(system):
    rng = np.random.default_rng(3)
    lat, got = random_lattice(10, 17.5, rng, system)
    assert got == system
    assert lat.volume == pytest.approx(175.0, rel=1e-9)
    a, b, c = lat.abc
    al, be, ga = lat.angles
    if system == "cubic":
        assert a == pytest.approx(b) == pytest.approx(c) and al == pytest.approx(90) == pytest.approx(ga)
    if system == "hexagonal":
        assert a == pytest.approx(b) and ga == pytest.approx(120)
    if system == "tetragonal":
        assert a == pytest.approx(b) and be == pytest.approx(90)
    if system == "trigonal":
        assert a == pytest.approx(c) and al == pytest.approx(be) == pytest.approx(ga)


def test_random_lattice_reproducible_and_bad_input():
    l1, _ = random_lattice(6, 20.0, np.random.default_rng(1))
    l2, _ = random_lattice(6, 20.0, np.random.default_rng(1))
    assert np.array_equal(l1.matrix, l2.matrix)
    with pytest.raises(ValueError, match="crystal system"):
        random_lattice(6, 20.0, np.random.default_rng(1), "quasicrystal")
    with pytest.raises(ValueError, match="volume_per_atom"):
        random_lattice(6, -1.0, np.random.default_rng(1))


def test_volume_estimate_from_references(lisi_records):
    from conftest import structure_from_record

    refs = [structure_from_record(r) for r in lisi_records if r["nsites"] <= 8]
    li2si = [s for s in refs if s.composition.reduced_formula == "Li2Si"]
    v, src = estimate_volume_per_atom("Li4Si2", refs)
    assert src == "references:same_composition"
    assert v == pytest.approx(np.mean([s.volume / len(s) for s in li2si]))
    v, src = estimate_volume_per_atom("Li7Si3", refs)
    assert src == "references:elemental_mix" and 10 < v < 30
    v, src = estimate_volume_per_atom(Composition("Li7Si3"))
    assert src == "atomic_radii" and v > 0


# ------------------------------------------------------------------ symmetrization


def test_symmetrization_raises_space_group_of_rattled_beta_li3ps4(lips_structures):
    beta = lips_structures["mp-985583"]  # beta-Li3PS4, Pnma
    assert space_group(beta)[0] == 62
    rattled = _rattle(beta, 0.08, 0)
    host_only = rattled.copy()
    host_only.remove_species(["Li"])
    assert space_group(host_only, 0.01)[0] == 1  # the rattled PS4 framework is P1 at a tight tolerance
    res = symmetrize_framework(rattled, ["Li"], tolerances=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5])
    assert res.success and res.space_group > 1 and res.space_group_before == 1
    assert res.tolerance in (0.05, 0.1, 0.2, 0.3, 0.5)
    assert res.guests == {"Li": 12}
    assert len(res.host) == 20 and res.host.composition.reduced_formula == "PS4"
    assert space_group(res.host, 1e-3)[0] == res.space_group  # exact after refinement
    assert np.allclose(res.host.lattice.abc, rattled.lattice.abc, rtol=0.05)  # same cell, no conventional cell


def test_symmetrization_failures_are_recorded():
    li = Structure(Lattice.cubic(3.5), ["Li", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert symmetrize_framework(li, ["Li"]).reason == "no_host_atoms"
    si = Structure(Lattice.cubic(5.4), ["Si"], [[0, 0, 0]])
    assert symmetrize_framework(si, ["Li"]).reason == "no_guest_atoms"


# ------------------------------------------------------------------ metrics


def test_success_rate_on_known_sets(lips_structures):
    symmetric = [s for s in lips_structures.values() if len(s) <= 16 and space_group(s)[0] >= 3][:4]
    assert len(symmetric) >= 3
    asymmetric = [_rattle(s, 0.15, i) for i, s in enumerate(symmetric)]
    assert symmetry_success_rate(symmetric, 0.1)["rate"] == 1.0
    res = symmetry_success_rate(asymmetric, 0.01)
    assert res["rate"] == 0.0 and res["n"] == len(asymmetric)
    mixed = symmetry_success_rate(symmetric + asymmetric, 0.01)
    assert mixed["rate"] == pytest.approx(0.5) and mixed["n_symmetric"] == len(symmetric)
    assert set(mixed["by_atoms"]) == {len(s) for s in symmetric}
    # P-1 counts as failure by default (>= 3), as success when the threshold is 2
    p1bar = Structure(Lattice.from_parameters(4, 5, 6, 80, 85, 95), ["Si", "Si"], [[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]])
    assert space_group(p1bar)[0] == 2
    assert symmetry_success_rate([p1bar])["rate"] == 0.0
    assert symmetry_success_rate([p1bar], min_space_group=2)["rate"] == 1.0
    assert symmetry_success_rate([])["rate"] is None


def test_displacement_rmsd_known_shift():
    s = Structure(Lattice.cubic(10.0), ["Si"] * 4, [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
    moved = s.copy()
    moved.translate_sites([0], [0.01, 0, 0])  # 0.1 Å
    rmsd, dmax = displacement_rmsd(s, moved)
    # mean shift removed: displacements 0.075, 0.025, 0.025, 0.025 Å
    assert rmsd == pytest.approx(math.sqrt((0.075**2 + 3 * 0.025**2) / 4), rel=1e-6)
    assert dmax == pytest.approx(0.075, rel=1e-6)
    shifted = s.copy()
    shifted.translate_sites(list(range(4)), [0.3, 0.2, 0.1])
    assert displacement_rmsd(s, shifted)[0] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same atoms"):
        displacement_rmsd(s, Structure(s.lattice, ["Si"], [[0, 0, 0]]))


def test_decomposition_energy_against_reference_hull():
    li = Structure(Lattice.cubic(3.5), ["Li", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    si = Structure(Lattice.cubic(5.4), ["Si"], [[0, 0, 0]])
    lisi = Structure(Lattice.cubic(5.0), ["Li", "Si"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    refs = [ReferenceEntry(entry_id="Li", structure=li, energy_per_atom=-2.0, model="m", source="prototype"),
            ReferenceEntry(entry_id="Si", structure=si, energy_per_atom=-5.0, model="m", source="prototype"),
            ReferenceEntry(entry_id="LiSi", structure=lisi, energy_per_atom=-4.0, model="m", source="seed")]
    li2si = Structure(Lattice.cubic(6.0), ["Li", "Li", "Si"], [[0.25] * 3, [0.75] * 3, [0, 0, 0]])
    # hull at Li2Si: 1/3 Li + 2/3 LiSi... = (1/3)(-2) + (2/3)(-4) = -3.333 eV/atom
    ed = decomposition_energies([li2si, li2si], [-3.0, -3.5], refs)
    assert ed[0] == pytest.approx(-3.0 + 10 / 3, abs=1e-6)
    assert ed[1] == pytest.approx(-3.5 + 10 / 3, abs=1e-6)  # below the hull: negative
    with pytest.raises(ValueError, match="elemental"):
        decomposition_energies([li2si], [-3.0], refs[1:])


def test_rdf_and_coordination_crystalnn(lips_structures):
    li2s = lips_structures["mp-1153"]  # antifluorite: S 8-fold, Li 4-fold
    r, g = partial_rdfs([li2s], rmax=5.0, bins=50)
    assert len(r) == 50 and set(g) == {"Li-Li", "Li-S", "S-S"}
    first = r[np.argmax(g["Li-S"] > 0)]
    assert 2.2 < first < 2.6  # Li-S bond ~2.47 Å
    cn = coordination_statistics([li2s])
    assert cn["Li"]["mean"] == pytest.approx(4) and cn["S"]["mean"] == pytest.approx(8)


# ------------------------------------------------------------------ spec


def test_spec_validation(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    text = f"""
name: t
chemical_system: {{elements: [Li, Si]}}
generator: {{backend: chggen, checkpoint: {ckpt}}}
chggen: {{compositions: [Li4Si2], resample_steps: 2}}
"""
    (tmp_path / "ok.yaml").write_text(text)
    spec = load_chggen_spec(tmp_path / "ok.yaml")
    assert spec.chggen.resample_steps == 2 and spec.chggen.guest_species == ["Li"]
    (tmp_path / "bad.yaml").write_text(text.replace("Li4Si2", "Li4P2"))
    with pytest.raises(SpecError, match="outside the chemical system"):
        load_chggen_spec(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text(text.replace("resample_steps", "resampel_steps"))
    with pytest.raises(SpecError, match="unknown setting"):
        load_chggen_spec(tmp_path / "typo.yaml")
    (tmp_path / "nockpt.yaml").write_text(text.replace(str(ckpt), str(tmp_path / "missing")))
    with pytest.raises(SpecError, match="generator.checkpoint"):
        load_chggen_spec(tmp_path / "nockpt.yaml")
    with pytest.raises(ValueError, match="increasing"):
        ChgGenSettings(tolerances=[0.5, 0.1])


def test_chggen_is_a_registered_generator(tmp_path):
    from cscflow.config import GeneratorSettings
    from cscflow.generators import get_generator
    from cscflow.generators.chggen import ChgGenGenerator

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    gen = get_generator(GeneratorSettings(backend="chggen", checkpoint=ckpt))
    assert isinstance(gen, ChgGenGenerator) and gen.name == "chggen"
    assert gen._worker is None  # nothing started before generate


def test_cli_has_chggen_command():
    from click.testing import CliRunner

    from cscflow.cli import main

    res = CliRunner().invoke(main, ["chggen", "--help"])
    assert res.exit_code == 0 and "RePaint" in res.output
    res = CliRunner().invoke(main, ["chggen", "no-such-spec.yaml"])
    assert res.exit_code == 2 and "not found" in res.output


# ------------------------------------------------------------------ RePaint with a tiny MatterGen


@pytest.fixture(scope="session")
def tiny_lisi(tmp_path_factory, shared_data_dir):
    if not have_mattergen():
        pytest.skip("MatterGen environment absent: run scripts/bootstrap-mattergen")
    from cscflow.chggen.tiny import train_tiny_model
    from cscflow.generators.mattergen import MatterGenWorker

    root = tmp_path_factory.mktemp("chggen")
    worker = MatterGenWorker(workdir=root / "worker")
    ckpt = train_tiny_model(shared_data_dir / "lisi.json", root / "tiny", steps=60, worker=worker)
    yield {"checkpoint": ckpt, "worker": worker}
    worker.close()


def _framework(lisi_records):
    from conftest import structure_from_record

    rec = next(r for r in lisi_records if r["id"] == "mp-27705")  # Li2Si, R-3m
    s = structure_from_record(rec)
    s.make_supercell([1, 1, 2])
    return symmetrize_framework(s, ["Li"])


@needs_mattergen
def test_inpainting_keeps_host_and_cell_and_moves_guests(tiny_lisi, lisi_records):
    from cscflow.chggen.inpaint import inpaint_guests, with_guests

    fw = _framework(lisi_records)
    assert fw.success
    rng = np.random.default_rng(0)
    inputs = [with_guests(fw.host, fw.guests, rng) for _ in range(3)]
    out, res = inpaint_guests(tiny_lisi["worker"], tiny_lisi["checkpoint"], inputs, resample_steps=2,
                              n_steps_corrector=1, device="cpu", seed=4)
    assert res["n_requested"] == 3 and len(out) + sum(res["reasons"].values()) == 3
    assert out, res
    assert res["host_transport_error"] < 1e-6  # what came back through extxyz, before the exact copy
    for s, info in out:
        src = inputs[int(info["input_index"])]
        host = np.asarray(s.site_properties["host"], dtype=bool)
        assert host.sum() == len(fw.host) and (~host).sum() == fw.guests["Li"]
        assert np.array_equal(s.lattice.matrix, src.lattice.matrix)
        assert np.array_equal(s.frac_coords[host], src.frac_coords[host])
        assert [sp.symbol for sp in s.species] == [sp.symbol for sp in src.species]
        d = s.frac_coords[~host] - src.frac_coords[~host]
        d -= np.round(d)
        assert np.abs(d).max() > 0.05  # guests were denoised, not left at their random start


@needs_mattergen
def test_resampling_count_honoured(tiny_lisi, lisi_records):
    from cscflow.chggen.inpaint import inpaint_guests, with_guests

    fw = _framework(lisi_records)
    inputs = [with_guests(fw.host, fw.guests, np.random.default_rng(1))]
    counts = {}
    for r, corr in ((1, 1), (3, 1), (2, 0)):
        _, res = inpaint_guests(tiny_lisi["worker"], tiny_lisi["checkpoint"], inputs, resample_steps=r,
                                n_steps_corrector=corr, device="cpu", seed=0)
        n = res["num_steps"]
        assert res["n_score_evaluations"] == n * r * (1 + corr) * res["n_batches"]
        counts[(r, corr)] = res["n_score_evaluations"]
    assert counts[(3, 1)] == 3 * counts[(1, 1)]


@needs_mattergen
def test_sample_in_cells_keeps_cell_and_species(tiny_lisi):
    from cscflow.chggen.inpaint import sample_in_cells

    rng = np.random.default_rng(2)
    cells = [random_lattice(6, 20.0, rng, "orthorhombic")[0], random_lattice(7, 20.0, rng, "monoclinic")[0]]
    species = [["Li"] * 4 + ["Si"] * 2, ["Li"] * 5 + ["Si"] * 2]
    out, res = sample_in_cells(tiny_lisi["worker"], tiny_lisi["checkpoint"], list(zip(cells, species)),
                               device="cpu", seed=1)
    assert res["n_requested"] == 2
    for s, info in out:
        i = int(info["input_index"])
        assert np.array_equal(s.lattice.matrix, cells[i].matrix)
        assert sorted(sp.symbol for sp in s.species) == sorted(species[i])


def test_tiny_model_training_set_comes_from_prototypes_without_data_files():
    from cscflow.chggen.tiny import prototype_training_set

    structures = prototype_training_set(["Li", "Si"], max_atoms=16)
    assert structures and all(s.num_sites <= 16 for s in structures)
    assert {el.symbol for s in structures for el in s.composition} == {"Li", "Si"}
    assert len({s.num_sites for s in structures}) > 2  # supercells give several cell sizes


@needs_mattergen
def test_chggen_flow_end_to_end_accounts_for_every_structure(tiny_lisi, tmp_path):
    """`cscflow chggen`: every requested structure is generated, failed, relaxed or rejected; report on disk."""
    import json

    import yaml

    from cscflow.chggen.cli import format_report, run_chggen

    spec = {
        "name": "lisi_e2e", "chemical_system": {"elements": ["Li", "Si"], "min_atoms": 2, "max_atoms": 8},
        "use_prototypes": True, "seeds": [], "seed": 3,
        "generator": {"backend": "chggen", "checkpoint": str(tiny_lisi["checkpoint"]), "batch_size": 8,
                      "device": "cpu", "diffusion_steps": 20},
        "forcefield": {"backend": "chgnet", "chgnet_version": "0.3.0"},
        "relax": {"fmax": 0.2, "steps": 20},
        "chggen": {"compositions": ["Li4Si2", "Li3Si1"], "n_per_composition": 2, "resample_steps": 2,
                   "max_reference_atoms": 8},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    report = run_chggen(path, tmp_path / "run")
    uncond, inp = report.funnel["unconditional"], report.funnel["inpainting"]
    assert uncond["requested"] == 4
    for f in (uncond, inp):
        assert f["requested"] == f["generated"] + sum(f["generation_failures"].values())
        assert f["generated"] == f["relaxed"] + sum(f["rejected"].values())
    assert report.success_unconditional["n"] == uncond["relaxed"]
    assert report.success_inpainting["n"] == inp["relaxed"]
    assert inp["requested"] == round(report.framework_success * uncond["relaxed"])  # one inpainting per framework
    assert set(report.wall_seconds) >= {"unconditional", "inpaint", "relax_inpainting", "report"}
    on_disk = json.loads((tmp_path / "run" / "chggen_report.json").read_text())
    assert on_disk["funnel"] == json.loads(report.model_dump_json())["funnel"]
    assert "requested 4" in format_report(report)
    # every relaxed structure is listed once, ranked by E_d, with its space group
    assert len(report.structures) == uncond["relaxed"] + inp["relaxed"]
    e_d = [r["e_d"] for r in report.structures if r["e_d"] is not None]
    assert e_d == sorted(e_d)
    assert sum(r["space_group"] >= 3 for r in report.structures if r["mode"] == "unconditional") == \
        report.success_unconditional["n_symmetric"]
    assert "Li-Li" in report.rdf["reference"] and len(report.rdf["r"]) == 60

    # `cscflow report` on a CHGGen run draws its figures from the store
    from click.testing import CliRunner

    from cscflow.cli import main

    res = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "symmetry success rate by atom count" in page and report.structures[0]["id"] in page
    for name in ("chggen_success.png", "chggen_distributions.png", "chggen_rdf.png", "chggen_cn.png"):
        assert (tmp_path / "run" / "report" / "figures" / name).stat().st_size > 1000
