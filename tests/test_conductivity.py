"""Conductivity screening: units of D and sigma on a synthetic trajectory, filters, a short CHGNet MD."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cscflow.downstream import Item
from cscflow.downstream.conductivity import (
    ConductivityMaker,
    ConductivityResult,
    ConductivitySettings,
    MdTrajectory,
    analyse_trajectory,
    candidate_table,
    screen_conductivity,
    screen_reason,
    diffusion_analyzers,
    trajectory_structures,
    write_conductivity_report,
)


@pytest.fixture(scope="module")
def li3ps4(lips_structures):
    return lips_structures["mp-985583"]


def synthetic_trajectory(structure, d_li_cm2_s: float, frame_fs: float, n_frames: int) -> MdTrajectory:
    """Li atoms move so that MSD_Li(t) = 6 D t exactly; P and S stay put; positions wrapped."""
    d_A2_fs = d_li_cm2_s * 10.0  # 1 cm^2/s = 1e16 Å^2 / 1e15 fs
    li = [i for i, s in enumerate(structure) if s.specie.symbol == "Li"]
    directions = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    t = np.arange(n_frames) * frame_fs
    cart = np.repeat(structure.cart_coords[None], n_frames, axis=0)
    for k, i in enumerate(li):  # ± pairs: the Li centre of mass does not drift
        cart[:, i] += np.sqrt(6 * d_A2_fs * t)[:, None] * directions[k % 6]
    frac = (cart @ structure.lattice.inv_matrix) % 1.0
    return MdTrajectory(structure, frac, structure.lattice.matrix, frame_fs, np.full(n_frames, 700.0))


def test_synthetic_msd_gives_known_d_and_sigma(li3ps4):
    d_true = 2.0e-5  # cm^2/s
    traj = synthetic_trajectory(li3ps4, d_true, frame_fs=20.0, n_frames=2501)  # 50 ps
    # the trajectory wraps through the cell: unwrapping must recover the straight paths
    li = diffusion_analyzers(trajectory_structures(traj), 700.0, traj.frame_interval_fs)["Li"]
    assert li.max_ion_displacements.max() > 5.0
    settings = ConductivitySettings(temperature=700.0)
    out = analyse_trajectory(traj, settings)
    assert out["diffusivity"]["Li"] == pytest.approx(d_true, rel=1e-3)
    assert out["diffusivity"]["P"] < 1e-12 and out["diffusivity"]["S"] < 1e-12
    n_li = 12 / li3ps4.volume * 1e24  # cm^-3
    sigma_hand = n_li * (1.602176634e-19) ** 2 * d_true / (1.380649e-23 * 700.0) * 1e3  # mS/cm
    assert out["sigma"] == pytest.approx(sigma_hand, rel=1e-3)
    # same number as pymatgen-analysis-diffusion's own Nernst-Einstein factor (z_Li = 1)
    from pymatgen.analysis.diffusion.analyzer import get_conversion_factor

    assert out["sigma"] == pytest.approx(get_conversion_factor(li3ps4, "Li", 700.0) * d_true, rel=1e-3)
    assert out["kinetically_stable"] is True
    assert out["conductor"] is (out["sigma"] >= 400.0)
    assert out["msd"]["Li"][-1] == pytest.approx(6 * d_true * 10 * 50000, rel=1e-3)


def test_framework_motion_fails_kinetic_gate(li3ps4):
    traj = synthetic_trajectory(li3ps4, 2.0e-5, frame_fs=20.0, n_frames=501)
    # S atoms diffuse as fast as Li: the phase decomposes, it is no electrolyte
    s_idx = [i for i, s in enumerate(li3ps4) if s.specie.symbol == "S"]
    cart = traj.frac_positions @ li3ps4.lattice.matrix
    t = np.arange(501) * 20.0
    for k, i in enumerate(s_idx):
        cart[:, i, (k // 2) % 3] += (-1) ** k * np.sqrt(6 * 2e-4 * t)
    traj.frac_positions = (cart @ li3ps4.lattice.inv_matrix) % 1.0
    out = analyse_trajectory(traj, ConductivitySettings())
    assert out["diffusivity"]["S"] > 1e-6
    assert out["kinetically_stable"] is False and out["conductor"] is False


def test_nernst_einstein_units(li3ps4):
    # 1e22 Li/cm^3, D = 1e-5 cm^2/s, 700 K: 1e22 * e^2 * 1e-5 / (kB 700) S/cm (library factor)
    from pymatgen.analysis.diffusion.analyzer import get_conversion_factor

    sigma = get_conversion_factor(li3ps4, "Li", 700.0) * li3ps4.volume / 12 * 1e22 / 1e24 * 1e-5
    assert sigma == pytest.approx(1e22 * 1.602176634e-19**2 * 1e-5 / (1.380649e-23 * 700) * 1e3)
    assert 200 < sigma < 300
    traj = synthetic_trajectory(li3ps4, 2.0e-5, frame_fs=20.0, n_frames=501)
    z1 = analyse_trajectory(traj, ConductivitySettings())["sigma"]
    assert analyse_trajectory(traj, ConductivitySettings(mobile_charge=2))["sigma"] == pytest.approx(4 * z1)
    with pytest.raises(ValueError, match="temperature"):
        ConductivitySettings(temperature=0.0)


def test_filters_follow_the_paper(lips_structures, li3ps4):
    s = ConductivitySettings()
    assert screen_reason(Item("a", li3ps4, 0, 0.02), s) is None
    assert "E_hull" in screen_reason(Item("b", li3ps4, 0, 0.05), s)
    assert "unknown" in screen_reason(Item("c", li3ps4, 0, None), s)
    assert screen_reason(Item("c", li3ps4, 0, None), ConductivitySettings(e_hull_max=None)) is None
    assert "x_P" in screen_reason(Item("d", lips_structures["mp-1153"], 0, 0.0), s)  # Li2S
    assert "x_S" in screen_reason(Item("d", lips_structures["mp-1211324"], 0, 0.0), s)  # Li7PS6: x_S=0.43
    assert "x_Li" in screen_reason(Item("e", lips_structures["mp-1006118"], 0, 0.0), s)  # P2S7
    tight = ConductivitySettings(max_volume_per_mobile=20.0)
    assert "volume per Li" in screen_reason(Item("f", li3ps4, 0, 0.0), tight)
    with pytest.raises(ValueError, match="analysis_ps"):
        ConductivitySettings(nvt_ps=10, analysis_ps=50)


def test_maker_records_screened_out_structures(lips_structures):
    from jobflow import run_locally

    structures = [lips_structures["mp-1153"], lips_structures["mp-1006118"]]
    job = ConductivityMaker().make(structures)
    responses = run_locally(job, ensure_success=True)
    out = responses[job.uuid][1].output
    assert out.n_input == 2 and out.n_passed_filters == 0 and out.n_simulated == 0
    assert all(r.status == "screened_out" and r.reason for r in out.results)


def test_table_is_sorted_and_in_paper_units(tmp_path):
    base = dict(formula="Li3PS4", volume_per_atom=21.84, status="done", kinetically_stable=True,
                msd_time_ps=[0, 1], msd={"Li": [0, 1]})
    results = [
        ConductivityResult(id="a", iteration=1, e_hull=0.0288, sigma=500.0, conductor=True, **base),
        ConductivityResult(id="b", iteration=3, e_hull=0.01, sigma=1872.5, conductor=True, **base),
        ConductivityResult(id="c", iteration=2, e_hull=0.01, sigma=100.0, conductor=False, **base),
    ]
    rows = candidate_table(results)
    assert [r["name"] for r in rows] == ["b", "a"]
    assert rows[1]["e_hull_meV_atom"] == 28.8 and rows[0]["v_atom"] == 21.8
    from cscflow.downstream.conductivity import ConductivityOutput

    files = write_conductivity_report(ConductivityOutput(results=results, table=rows), tmp_path)
    assert "1872.5" in files["table"].read_text()
    assert files["msd"].stat().st_size > 1000


def test_short_chgnet_md_on_li3ps4(li3ps4):
    """A real (short) NPT -> NVT run: 30 + 150 steps of 2 fs on the 32-atom cell."""
    settings = ConductivitySettings(min_length=0.0, npt_ps=0.06, nvt_ps=0.3, analysis_ps=0.2,
                                    sample_every=5, e_hull_max=None)
    out = screen_conductivity([li3ps4], settings=settings)
    (r,) = out.results
    assert r.status == "done", r.reason
    assert r.n_atoms_md == 32 and set(r.diffusivity) == {"Li", "P", "S"}
    assert all(math.isfinite(d) and d >= 0 for d in r.diffusivity.values())
    assert r.sigma is not None and r.sigma >= 0
    assert 300 < r.mean_temperature < 1300
    assert abs(r.volume_per_atom_md / r.volume_per_atom - 1) < 0.25
    assert r.seconds["nvt"] > 0 and "npt" in r.seconds
    assert len(r.msd_time_ps) == len(r.msd["Li"]) > 10
    print("wall time per phase (s):", r.seconds)
