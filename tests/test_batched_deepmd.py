"""The DeePMD torch-sim wrapper on a tiny self-trained DPA-3 (slow: trains the model)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.units import GPa

from cscflow.config import ForceFieldSettings, RelaxSettings
from cscflow.forcefields import get_calculator, model_tag, single_points
from cscflow.relax import batched_model, relax_candidates
from cscflow.schemas import Candidate, Provenance

pytest.importorskip("deepmd")
ts = pytest.importorskip("torch_sim")

# the session fixture that trains and freezes the tiny DPA-3 (one definition, reused)
from test_forcefields import frozen_dpa3  # noqa: E402, F401

from cscflow.batched import DeepMDModel  # noqa: E402

pytestmark = pytest.mark.slow


def _rattled(structure, seed: int, sigma: float, strain: float = 0.0):
    from pymatgen.core import Structure

    s = structure.copy()
    if strain:
        s.apply_strain(strain)
    coords = s.cart_coords + np.random.default_rng(seed).normal(0.0, sigma, (len(s), 3))
    return Structure(s.lattice, s.species, coords, coords_are_cartesian=True)


def test_deepmd_model_matches_the_ase_calculator_and_relaxes_alike(frozen_dpa3, lips_structures):
    calc = get_calculator(ForceFieldSettings(), model_path=frozen_dpa3)
    model = batched_model(calc, RelaxSettings(engine="torchsim"))
    assert isinstance(model, DeepMDModel)
    li2s = lips_structures["mp-1153"]
    # two 3-atom cells (one DeePMD call) and a 6-atom cell (another)
    structures = [_rattled(li2s, seed=1, sigma=0.05), lips_structures["mp-557142"],
                  _rattled(li2s, seed=2, sigma=0.05, strain=0.02)]
    out = model(ts.initialize_state(structures, model.device, model.dtype))
    ref = single_points(structures, calc)
    start = 0
    for b, (s, r) in enumerate(zip(structures, ref)):
        assert float(out["energy"][b]) == pytest.approx(r["energy"], abs=1e-6)
        np.testing.assert_allclose(out["forces"][start:start + len(s)].numpy(), r["forces"], atol=1e-6)
        np.testing.assert_allclose(out["stress"][b].numpy() / GPa, r["stress"], atol=1e-5)
        start += len(s)

    tag = model_tag(ForceFieldSettings(), frozen_dpa3)
    cands = [Candidate(provenance=Provenance(candidate_id=f"dp-{i}", iteration=0, generator="seed"),
                       structure=s) for i, s in enumerate(structures)]
    seq = relax_candidates(cands, calc, RelaxSettings(engine="ase", steps=15), tag, progress=False)
    bat = relax_candidates(cands, calc, RelaxSettings(engine="torchsim", steps=15), tag,
                           progress=False)
    assert [(c.status, c.reject_reason) for c in bat] == [(c.status, c.reject_reason) for c in seq]
    for a, b in zip(seq, bat):
        if a.status == "relaxed":
            assert b.relax_steps == a.relax_steps
            assert b.energy_per_atom == pytest.approx(a.energy_per_atom, abs=1e-4)
