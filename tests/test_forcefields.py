"""Force-field interface: CHGNet (pretrained, from the wheel) and a tiny self-trained DeePMD DPA-3."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from cscflow.config import ForceFieldSettings, RelaxSettings
from cscflow.forcefields import (
    MissingBackendError,
    get_calculator,
    model_tag,
    single_points,
)


@pytest.fixture(scope="module")
def chgnet():
    return get_calculator(ForceFieldSettings())


@pytest.fixture(scope="module")
def li2s(lips_structures) -> Structure:
    return lips_structures["mp-1153"]


def _rattled(structure: Structure, seed: int, sigma: float = 0.08, strain: float = 0.0) -> Structure:
    rng = np.random.default_rng(seed)
    s = structure.copy()
    if strain:
        s.apply_strain(strain)
    coords = s.cart_coords + rng.normal(0.0, sigma, (len(s), 3))
    return Structure(s.lattice, s.species, coords, coords_are_cartesian=True)


# --------------------------------------------------------------------------- tags, errors
def test_model_tag_chgnet_and_deepmd(tmp_path):
    assert model_tag(ForceFieldSettings()) == "chgnet-0.3.0"
    assert model_tag(ForceFieldSettings(chgnet_version="r2scan")) == "chgnet-r2scan"
    model = tmp_path / "frozen.pth"
    model.write_bytes(b"not really a model, but model_tag only hashes it")
    sha8 = hashlib.sha256(model.read_bytes()).hexdigest()[:8]
    # a model_path argument means DeePMD whatever the settings' backend
    assert model_tag(ForceFieldSettings(), model) == f"deepmd:frozen.pth#{sha8}"
    settings = ForceFieldSettings(backend="deepmd", model_path=model, model_branch="MP_traj")
    assert model_tag(settings) == f"deepmd:frozen.pth#{sha8}@MP_traj"
    model.write_bytes(b"retrained")  # a new model at the same path gets a new tag
    assert model_tag(ForceFieldSettings(), model) != f"deepmd:frozen.pth#{sha8}"


def test_missing_model_file_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="forcefield.model_path"):
        get_calculator(ForceFieldSettings(), model_path=tmp_path / "nope.pth")
    model = tmp_path / "m.pth"
    model.write_bytes(b"x")
    settings = ForceFieldSettings(backend="deepmd", model_path=model)
    model.unlink()  # removed after the spec was validated
    with pytest.raises(FileNotFoundError, match="forcefield.model_path"):
        get_calculator(settings)


def test_unknown_chgnet_version():
    with pytest.raises(ValueError, match="chgnet_version"):
        get_calculator(ForceFieldSettings(chgnet_version="9.9.9"))


@pytest.mark.parametrize("backend,module", [("mace", "mace"), ("mattersim", "mattersim")])
def test_optional_backend_missing_names_the_extra(tmp_path, backend, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    model = tmp_path / "model.file"
    model.write_bytes(b"x")
    with pytest.raises(MissingBackendError, match=f"scripts/bootstrap --with {backend}"):
        get_calculator(ForceFieldSettings(backend=backend, model_path=model))


# --------------------------------------------------------------------------- CHGNet
def test_chgnet_calculator_is_cached(chgnet):
    assert get_calculator(ForceFieldSettings()) is chgnet
    assert get_calculator(ForceFieldSettings(chgnet_version="0.3.0", device="cpu")) is chgnet


def test_chgnet_single_points_units_and_stress_sign(chgnet, li2s):
    from ase.stress import full_3x3_to_voigt_6_stress
    from ase.units import GPa
    from pymatgen.io.ase import AseAtomsAdaptor

    stretched = _rattled(li2s, seed=1, sigma=0.05, strain=0.03)
    squeezed = _rattled(li2s, seed=2, sigma=0.05, strain=-0.03)
    out = single_points([li2s, stretched, squeezed], chgnet)
    assert len(out) == 3
    for res, s in zip(out, [li2s, stretched, squeezed]):
        assert set(res) >= {"energy", "forces", "stress"}
        assert np.isfinite(res["energy"])
        assert res["forces"].shape == (len(s), 3)
        assert res["stress"].shape == (3, 3)
    # total energy: ~ -4.1 eV/atom for Li2S (MP: -4.2 eV/atom uncorrected)
    assert -5.0 < out[0]["energy"] / len(li2s) < -3.5
    # ASE sign: a stretched cell pulls back (tensile, positive), a squeezed one pushes out
    assert np.trace(out[1]["stress"]) > 0 > np.trace(out[2]["stress"])

    # batched CHGNet path == ASE calculator path == finite-difference stress (GPa)
    atoms = AseAtomsAdaptor.get_atoms(stretched)
    atoms.calc = chgnet
    assert out[1]["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
    np.testing.assert_allclose(out[1]["forces"], atoms.get_forces(), atol=1e-4)
    ase_stress = atoms.get_stress(voigt=False) / GPa
    np.testing.assert_allclose(out[1]["stress"], ase_stress, atol=1e-3)
    from ase.calculators.fd import calculate_numerical_stress

    numeric = calculate_numerical_stress(atoms, eps=1e-3, voigt=True, force_consistent=False) / GPa
    np.testing.assert_allclose(full_3x3_to_voigt_6_stress(out[1]["stress"]), numeric, atol=0.1)


def test_single_points_record_errors(chgnet, li2s):
    # CHGNet has no embedding for oganesson: a real calculator failure
    bad = Structure(Lattice.cubic(4.0), ["Og", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(Exception):
        single_points([bad], chgnet)
    out = single_points([li2s, bad], chgnet, on_error="record")
    assert np.isfinite(out[0]["energy"]) and "error" not in out[0]
    assert np.isnan(out[1]["energy"]) and out[1]["forces"].shape == (2, 3)
    assert out[1]["error"]
    with pytest.raises(TypeError, match="pymatgen Structure"):
        single_points([li2s.to_ase_atoms()], chgnet)


def test_chgnet_model_file_reloads_when_file_changes(tmp_path, li2s):
    import chgnet

    shipped = next((Path(chgnet.__file__).parent / "pretrained" / "0.3.0").glob("*.pth.tar"))
    local = tmp_path / "my_chgnet.pth.tar"
    shutil.copy(shipped, local)
    settings = ForceFieldSettings(chgnet_version=str(local))
    first = get_calculator(settings)
    assert get_calculator(settings) is first
    assert model_tag(settings).startswith("chgnet:my_chgnet.pth.tar#")
    os.utime(local, ns=(local.stat().st_atime_ns, local.stat().st_mtime_ns + 10**9))
    second = get_calculator(settings)
    assert second is not first
    e = single_points([li2s], second)[0]["energy"]
    assert e == pytest.approx(single_points([li2s], get_calculator(ForceFieldSettings()))[0]["energy"], abs=1e-4)


# --------------------------------------------------------------------------- DeePMD
DPA3_INPUT = {
    "model": {
        "type_map": ["Li", "P", "S"],
        "descriptor": {
            "type": "dpa3",
            "repflow": {
                "n_dim": 16, "e_dim": 8, "a_dim": 8, "nlayers": 1,
                "e_rcut": 5.0, "e_rcut_smth": 0.5, "e_sel": 40,
                "a_rcut": 3.5, "a_rcut_smth": 0.5, "a_sel": 12, "axis_neuron": 4,
            },
            "seed": 1,
        },
        "fitting_net": {"neuron": [16, 16], "seed": 1},
    },
    "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
    "loss": {
        "type": "ener",
        "start_pref_e": 0.2, "limit_pref_e": 20,
        "start_pref_f": 100, "limit_pref_f": 60,
        "start_pref_v": 0.02, "limit_pref_v": 1,
    },
    "training": {
        "training_data": {"systems": [], "batch_size": 1},
        "numb_steps": 10, "seed": 1, "disp_freq": 5, "save_freq": 10,
    },
}


@pytest.fixture(scope="session")
def frozen_dpa3(tmp_path_factory, lips_structures) -> Path:
    """A tiny DPA-3 trained for 10 steps on CHGNet-labelled Li2S / Li3PS4 frames, then frozen."""
    pytest.importorskip("deepmd")
    import dpdata
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import GPa
    from pymatgen.io.ase import AseAtomsAdaptor

    work = tmp_path_factory.mktemp("dpa3")
    structures = [_rattled(lips_structures["mp-1153"], seed=i, sigma=0.08, strain=0.02 * (i - 2))
                  for i in range(5)]
    labels = single_points(structures, get_calculator(ForceFieldSettings()))
    systems = dpdata.MultiSystems(type_map=["Li", "P", "S"])
    for s, lab in zip(structures, labels):
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms.calc = SinglePointCalculator(
            atoms, energy=lab["energy"], forces=lab["forces"], stress=lab["stress"] * GPa
        )
        systems.append(dpdata.LabeledSystem(atoms, fmt="ase/structure"))
    systems.to_deepmd_npy(str(work / "data"))
    config = json.loads(json.dumps(DPA3_INPUT))
    config["training"]["training_data"]["systems"] = sorted(
        str(p.parent) for p in (work / "data").glob("*/type.raw")
    )
    (work / "input.json").write_text(json.dumps(config))
    # `dp --pt train` then `dp --pt freeze`, in one interpreter to pay the import once
    script = (
        "from deepmd.main import main\n"
        "main(['--pt', 'train', 'input.json', '--skip-neighbor-stat'])\n"
        "main(['--pt', 'freeze', '-o', 'frozen.pth'])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DP_INTER_OP_PARALLELISM_THREADS": "1",
           "DP_INTRA_OP_PARALLELISM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    frozen = work / "frozen.pth"
    assert proc.returncode == 0 and frozen.is_file(), proc.stderr[-3000:]
    return frozen


def test_deepmd_calculator_from_frozen_model(frozen_dpa3, li2s, lips_structures):
    settings = ForceFieldSettings()  # backend chgnet: a model_path still means DeePMD
    calc = get_calculator(settings, model_path=frozen_dpa3)
    assert type(calc).__name__ == "DP"
    assert get_calculator(settings, model_path=str(frozen_dpa3)) is calc
    assert model_tag(settings, frozen_dpa3).startswith("deepmd:frozen.pth#")
    li3ps4 = next(s for s in lips_structures.values() if s.composition.reduced_formula == "Li3PS4")
    out = single_points([li2s, li3ps4], calc)
    for res, s in zip(out, [li2s, li3ps4]):
        assert np.isfinite(res["energy"])
        assert res["forces"].shape == (len(s), 3) and np.isfinite(res["forces"]).all()
        assert res["stress"].shape == (3, 3) and np.isfinite(res["stress"]).all()
    # the frames were Li2S at ~ -4.1 eV/atom: ten steps fit at least the energy scale
    assert -8.0 < out[0]["energy"] / len(li2s) < -1.0


def test_relax_with_deepmd_model(frozen_dpa3, li2s):
    from cscflow.relax import relax_candidates
    from cscflow.schemas import Candidate, Provenance

    calc = get_calculator(ForceFieldSettings(), model_path=frozen_dpa3)
    tag = model_tag(ForceFieldSettings(), frozen_dpa3)
    cand = Candidate(provenance=Provenance(candidate_id="dp-0", iteration=0, generator="seed"),
                     structure=_rattled(li2s, seed=3, sigma=0.1))
    out = relax_candidates([cand], calc, RelaxSettings(steps=20), tag, progress=False)
    assert out[0].status == "relaxed", out[0].reject_reason
    assert out[0].model == tag
    assert np.isfinite(out[0].energy) and out[0].relax_steps is not None


# --------------------------------------------------------------------------- trained-model families
def test_model_family_is_read_from_the_file(tmp_path, li2s):
    """A model_path argument is loaded by its own family (cscflow.trainers exports), whatever
    the settings' backend; a file of no known family still means DeePMD."""
    from chgnet.model import CHGNet
    from chgnet.trainer import Trainer

    from cscflow.downstream import atomate2_force_field, settings_calculator
    from cscflow.forcefields import model_backend

    unknown = tmp_path / "x.pth"
    unknown.write_bytes(b"not a zip")
    assert model_backend(unknown) is None and model_tag(ForceFieldSettings(), unknown).startswith("deepmd:")

    ckpt = tmp_path / "chgnet_model.pth.tar"
    Trainer(model=CHGNet.load(verbose=False), epochs=0).save(str(ckpt))
    assert model_backend(ckpt) == "chgnet"
    settings = ForceFieldSettings(backend="deepmd", model_path=unknown)  # the settings' family is ignored
    calc = get_calculator(settings, ckpt)
    assert model_tag(settings, ckpt).startswith("chgnet:chgnet_model.pth.tar#")
    wheel = get_calculator(ForceFieldSettings())
    ours = single_points([li2s], calc)[0]
    np.testing.assert_allclose(ours["energy"], single_points([li2s], wheel)[0]["energy"], rtol=1e-6)
    # atomate2 (QHA) gets the same model through cscflow's calculator factory
    meta, kwargs = atomate2_force_field(ForceFieldSettings(), model_path=ckpt)
    assert meta["@callable"] == "settings_calculator" and kwargs["override_model_path"] == str(ckpt.resolve())
    assert single_points([li2s], settings_calculator(**kwargs))[0]["energy"] == pytest.approx(ours["energy"])


def test_sevenn_wheel_model(li2s):
    settings = ForceFieldSettings(backend="sevenn")
    assert model_tag(settings) == "sevenn-7net-0"
    result = single_points([li2s], get_calculator(settings))[0]
    assert np.isfinite(result["energy"]) and result["forces"].shape == (len(li2s), 3)
    assert -6 < result["energy"] / len(li2s) < -2  # eV/atom of Li2S near PBE
    with pytest.raises(ValueError, match="forcefield.sevenn_model"):
        model_tag(ForceFieldSettings(backend="sevenn", sevenn_model="7net-nope"))
