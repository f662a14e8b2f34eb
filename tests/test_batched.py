"""Batched relaxation with torch-sim: CHGNet wrapper, and batched vs sequential on MP Li–P–S."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.calculators.lj import LennardJones
from ase.units import GPa
from pymatgen.core import Lattice, Structure

from cscflow.config import ForceFieldSettings, RelaxSettings
from cscflow.forcefields import get_calculator, single_points
from cscflow.relax import batched_model, relax_candidates
from cscflow.schemas import Candidate, Provenance

ts = pytest.importorskip("torch_sim")

from cscflow.batched import CHGNetModel, relax_structures, torchsim_model  # noqa: E402

MODEL = "chgnet-0.3.0"
# Li2S, Li3P, LiP3, P2S, LiS: real MP cells with 3-8 atoms, rattled and strained below
IDS = ["mp-1153", "mp-736", "mp-1025406", "mp-1220021", "mp-1180520"]
# stated tolerance between the engines: same FIRE, CHGNet in float32 (see cscflow.batched)
E_TOL = 2e-3  # eV/atom


@pytest.fixture(scope="module")
def chgnet():
    return get_calculator(ForceFieldSettings())


def _candidate(structure: Structure, cid: str) -> Candidate:
    return Candidate(provenance=Provenance(candidate_id=cid, iteration=1, generator="pyxtal",
                                           seed=3), structure=structure)


@pytest.fixture(scope="module")
def rattled(lips_structures) -> list[Structure]:
    rng = np.random.default_rng(11)
    out = []
    for mp_id in IDS:
        s = lips_structures[mp_id].copy()
        s.apply_strain(0.02)
        coords = s.cart_coords + rng.normal(0.0, 0.08, (len(s), 3))
        out.append(Structure(s.lattice, s.species, coords, coords_are_cartesian=True))
    return out


def test_chgnet_model_matches_the_ase_calculator(chgnet, rattled):
    model = CHGNetModel(chgnet.model)
    assert model.device.type == "cpu" and model.dtype == torch.float64
    state = ts.initialize_state(rattled[:3], model.device, model.dtype)
    out = model(state)
    ref = single_points(rattled[:3], chgnet)
    assert out["energy"].shape == (3,) and out["stress"].shape == (3, 3, 3)
    assert out["forces"].shape == (sum(len(s) for s in rattled[:3]), 3)
    start = 0
    for b, (s, r) in enumerate(zip(rattled[:3], ref)):
        assert float(out["energy"][b]) == pytest.approx(r["energy"], abs=1e-4)  # total eV
        f = out["forces"][start:start + len(s)].numpy()
        np.testing.assert_allclose(f, r["forces"], atol=1e-4)
        # torch-sim stress is eV/Å^3 with ASE's sign; cscflow's is GPa
        np.testing.assert_allclose(out["stress"][b].numpy() / GPa, r["stress"], atol=1e-3)
        start += len(s)


def test_batched_and_sequential_relaxation_agree(chgnet, rattled):
    og = Structure(Lattice.cubic(4.0), ["Og", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    overlap = Structure(Lattice.cubic(5.0), ["Li", "S"], [[0, 0, 0], [0.05, 0, 0]])
    already = _candidate(rattled[0], "c-up").model_copy(
        update={"status": "rejected", "reject_reason": "overlap"})
    cands = [_candidate(s, f"c-{i}") for i, s in enumerate(rattled)]
    cands += [_candidate(og, "c-og"), _candidate(overlap, "c-overlap"), already]
    settings = dict(fmax=0.05, steps=200)
    seq = relax_candidates(cands, chgnet, RelaxSettings(engine="ase", **settings), MODEL,
                           progress=False)
    bat = relax_candidates(cands, chgnet, RelaxSettings(engine="torchsim", **settings), MODEL,
                           progress=False)

    assert [c.id for c in bat] == [c.id for c in cands]
    # the same reject decisions
    assert [(c.status, c.reject_reason) for c in bat] == [(c.status, c.reject_reason) for c in seq]
    assert bat[5].reject_reason.startswith("calculator_error: ")
    assert bat[6].reject_reason == "overlap" and bat[7] is already
    for s, b, orig in zip(seq[:5], bat[:5], cands[:5]):
        assert b.status == "relaxed" and b.converged is s.converged is True
        assert b.energy_per_atom == pytest.approx(s.energy_per_atom, abs=E_TOL)
        assert b.energy < single_points([orig.structure], chgnet)[0]["energy"]  # went downhill
        assert abs(b.relax_steps - s.relax_steps) <= max(3, 0.1 * s.relax_steps)
        assert b.max_force <= 0.05 + 1e-6
        # FIRE paths part after ~100 steps on soft cells (float32 CHGNet): both stop anywhere
        # inside the fmax basin, whose stress width is ~ fmax * N / V
        assert b.structure.volume == pytest.approx(s.structure.volume, rel=1e-2)
        stress_tol = 2 * 0.05 * len(b.structure) / b.structure.volume / GPa  # GPa
        assert b.provenance == orig.provenance and b.model == MODEL
        # stored energy is the model's energy of the stored structure
        assert single_points([b.structure], chgnet)[0]["energy"] == pytest.approx(b.energy, abs=1e-3)
        np.testing.assert_allclose(b.stress, s.stress, atol=stress_tol)

    # the energy gate decides alike
    tight = dict(max_abs_energy_per_atom=1.0, steps=5)
    a = relax_candidates(cands[:2], chgnet, RelaxSettings(engine="ase", **tight), MODEL, progress=False)
    b = relax_candidates(cands[:2], chgnet, RelaxSettings(engine="torchsim", **tight), MODEL,
                         progress=False)
    assert [c.reject_reason for c in a] == [c.reject_reason for c in b] == ["energy_out_of_range"] * 2


def test_batched_step_limit_and_positions_only(chgnet, rattled):
    settings = RelaxSettings(engine="torchsim", steps=6, fmax=1e-4, cell_filter="none")
    out = relax_candidates([_candidate(s, f"p-{i}") for i, s in enumerate(rattled[:2])], chgnet,
                           settings, MODEL, progress=False)
    for c, s in zip(out, rattled):
        assert c.status == "relaxed" and c.relax_steps == 6 and c.converged is False
        np.testing.assert_allclose(c.structure.lattice.matrix, s.lattice.matrix, atol=1e-8)


def test_exploding_cell_is_stopped_in_the_batch(lips_structures):
    """torch-sim's Lennard-Jones with its minimum far out blows the Li2S cell up: gate stops it."""
    from torch_sim.models.lennard_jones import LennardJonesModel

    # conventional 12-atom cell: torch-sim 0.3.0's LJ neighbour list is wrong for the 3-atom
    # primitive cell with an 8 Å cutoff (energy 3e8 eV); on this cell it agrees with ASE's LJ
    li2s = lips_structures["mp-1153"].to_conventional()
    lj = LennardJonesModel(sigma=3.2, epsilon=0.01, cutoff=8.0, dtype=torch.float64,
                           compute_stress=True, device=torch.device("cpu"))
    settings = RelaxSettings(max_volume_per_atom=25.0, steps=300)
    (res,) = relax_structures([li2s], lj, settings)
    assert res.reject_reason == "exploded" and 0 < res.steps < 300
    # the sequential path with the ASE potential of the same form decides the same
    (seq,) = relax_candidates([_candidate(li2s, "boom")],
                              LennardJones(sigma=3.2, epsilon=0.01, rc=8.0), settings, "lj",
                              progress=False)
    assert seq.reject_reason == "exploded"


def test_engine_choice(chgnet):
    assert batched_model(chgnet, RelaxSettings(engine="ase")) is None
    if not torch.cuda.is_available():  # auto batches only on a GPU
        assert batched_model(chgnet, RelaxSettings(engine="auto")) is None
    assert isinstance(batched_model(chgnet, RelaxSettings(engine="torchsim")), CHGNetModel)
    assert torchsim_model(LennardJones()) is None
    with pytest.raises(ValueError, match="relax.engine 'torchsim' has no torch-sim model"):
        batched_model(LennardJones(), RelaxSettings(engine="torchsim"))
    with pytest.raises(ValueError, match="relax.optimizer"):
        RelaxSettings(engine="torchsim", optimizer="BFGS")
    assert RelaxSettings(engine="auto", optimizer="BFGS").engine == "auto"  # auto falls back to ASE


def test_mace_calculator_maps_to_torch_sims_wrapper(tmp_path, rattled):
    """A tiny random MACE (built here, saved, loaded the cscflow way) relaxes alike batched."""
    pytest.importorskip("mace")
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    mace = modules.MACE(
        r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=1,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=1, num_elements=3, hidden_irreps=o3.Irreps("8x0e"),
        MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.array([-1.9, -5.4, -4.1]),
        avg_num_neighbors=10.0, atomic_numbers=[3, 15, 16], correlation=2,
        gate=torch.nn.functional.silu,
    ).double()
    torch.save(mace, tmp_path / "tiny.model")
    calc = get_calculator(ForceFieldSettings(backend="mace", model_path=tmp_path / "tiny.model"))
    model = batched_model(calc, RelaxSettings(engine="torchsim"))
    assert type(model).__name__ == "MaceModel"
    structures = rattled[:2]
    out = model(ts.initialize_state(structures, model.device, model.dtype))
    ref = single_points(structures, calc)
    for b, r in enumerate(ref):
        assert float(out["energy"][b]) == pytest.approx(r["energy"], abs=1e-8)
        np.testing.assert_allclose(out["stress"][b].numpy() / GPa, r["stress"], atol=1e-8)
    cands = [_candidate(s, f"m-{i}") for i, s in enumerate(structures)]
    seq = relax_candidates(cands, calc, RelaxSettings(engine="ase", steps=10), "mace", progress=False)
    bat = relax_candidates(cands, calc, RelaxSettings(engine="torchsim", steps=10), "mace",
                           progress=False)
    for a, b in zip(seq, bat):
        assert (a.status, a.reject_reason, a.relax_steps) == (b.status, b.reject_reason, b.relax_steps)
        if a.status == "relaxed":
            assert b.energy == pytest.approx(a.energy, abs=1e-6)
