"""QHA: Legendre transform against an analytic F(V), real CHGNet phonons on 1-f.u. cells, Gibbs hulls."""

from __future__ import annotations

import numpy as np
import pytest

from cscflow.downstream import atomate2_force_field, isotropic_supercell_matrix
from cscflow.downstream.qha import (
    GPA_TO_EV_A3,
    QhaMaker,
    QhaSettings,
    gibbs_at,
    gibbs_from_helmholtz,
    run_qha,
    write_qha_report,
)

FAST = dict(min_length=7.0, scale_min=0.95, scale_max=1.15, scale_step=0.10, relax_fmax=0.01,
            relax_steps=500, mesh=20.0, pressures=[0.0, 2.0])


def _prim(lips_structures, mp_id):
    s = lips_structures[mp_id].get_primitive_structure()
    s.properties["id"] = mp_id
    return s


@pytest.mark.parametrize("eos", ["vinet", "polynomial"])
def test_legendre_transform_matches_parabola(eos):
    # F(V) = B/(2 V0) (V - V0)^2  =>  V*(p) = V0 (1 - p/B),  G(p) = p V0 - p^2 V0 / (2B)
    v0, b = 20.0, 30.0 * GPA_TO_EV_A3
    v = v0 * np.linspace(0.85, 1.15, 7)
    f = b / (2 * v0) * (v - v0) ** 2
    for p_gpa in (0.0, 1.0, 2.0):
        p = p_gpa * GPA_TO_EV_A3
        g, vmin, edge = gibbs_from_helmholtz(v, f, p_gpa, eos)
        assert not edge
        assert vmin == pytest.approx(v0 * (1 - p / b), abs=1e-2)
        assert g == pytest.approx(p * v0 - p**2 * v0 / (2 * b), abs=1e-5)
    # a pressure that needs volumes outside the grid is flagged, not silently extrapolated
    assert gibbs_from_helmholtz(v, f, 20.0, eos)[2]


def test_settings_grid_and_errors():
    s = QhaSettings()
    assert np.allclose(s.volume_factors, [0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15])
    assert np.allclose(QhaSettings(scale_mode="linear").volume_factors[[0, -1]], [0.85**3, 1.15**3])
    with pytest.raises(ValueError, match="bracket"):
        QhaSettings(scale_min=1.0)
    with pytest.raises(ValueError, match="t_max"):
        QhaSettings(conditions=[(900.0, 0.0)])


def test_isotropic_supercell(lips_structures):
    li2s = _prim(lips_structures, "mp-1153")  # fcc primitive: plane spacing a/sqrt(3) ~ 3.3 Å
    m = np.array(isotropic_supercell_matrix(li2s, 12.0))
    sc = li2s.copy().make_supercell(m)
    widths = sc.volume / np.linalg.norm(np.cross(sc.lattice.matrix[[1, 2, 0]], sc.lattice.matrix[[2, 0, 1]]), axis=1)
    assert widths.min() >= 12.0 - 1e-6 and np.ptp(np.diag(m)) == 0
    with pytest.raises(ValueError, match="max_atoms"):
        isotropic_supercell_matrix(li2s, 12.0, max_atoms=50)


def test_atomate2_force_field_mapping(tmp_path):
    from atomate2.forcefields.utils import ase_calculator

    from cscflow.config import ForceFieldSettings

    name, kwargs = atomate2_force_field(ForceFieldSettings())
    assert name == "CHGNet"
    calc = ase_calculator(name, **kwargs)
    assert type(calc).__name__ == "CHGNetCalculator"
    model = tmp_path / "frozen.pth"
    model.write_bytes(b"0")
    name, kwargs = atomate2_force_field(ForceFieldSettings(), model_path=model)
    assert name == "DeepMD" and kwargs["model"] == str(model.resolve())
    meta, kwargs = atomate2_force_field(ForceFieldSettings(chgnet_version="0.2.0"))
    assert meta["@callable"] == "settings_calculator" and kwargs["chgnet_version"] == "0.2.0"
    with pytest.raises(FileNotFoundError):
        atomate2_force_field(ForceFieldSettings(), model_path=tmp_path / "missing.pth")


def test_li2s_one_formula_unit_cell(lips_structures):
    """Primitive Li2S is one formula unit (atomate2's QHA analysis fails on it); 3 volumes."""
    out = run_qha([_prim(lips_structures, "mp-1153")], settings=QhaSettings(**FAST, conditions=[]))
    (r,) = out.results
    assert r.status == "done", r.reason
    assert r.n_atoms == 3 and len(r.volumes) == 3 and r.supercell == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    f = np.asarray(r.helmholtz)
    assert np.all(f[0] > np.asarray(r.energies))  # zero-point energy is positive
    g = np.asarray(r.gibbs)  # [T][p]
    t = np.asarray(r.temperatures)
    i300 = int(np.argmin(abs(t - 300)))
    assert g[i300, 0] < g[0, 0]  # dG/dT = -S < 0
    v = np.asarray(r.volume_tp)
    assert v[i300, 1] < v[i300, 0]  # compressed under 2 GPa
    dg = g[i300, 1] - g[i300, 0]  # dG/dp = V: between V(2 GPa) and V(0) times 2 GPa
    assert v[i300, 1] * 2 * GPA_TO_EV_A3 - 1e-4 <= dg <= v[i300, 0] * 2 * GPA_TO_EV_A3 + 1e-4
    assert gibbs_at(r, 300.0, 0.0) == pytest.approx(g[i300, 0], abs=1e-6)
    print("Li2S wall time per phase (s):", r.seconds)


def test_unary_gibbs_hull_through_maker(lips_structures, tmp_path):
    """bcc, fcc, hcp Li (1-2 atom cells) through QhaMaker: hull, lowest-G table, figures.

    bcc Li is dynamically unstable at low T (imaginary modes); it must be recorded as
    failed with its dropped volumes while the others still make a hull.
    """
    from jobflow import run_locally

    ids = ["mp-135", "mp-51", "mp-10173"]
    structures = [_prim(lips_structures, i) for i in ids]
    settings = QhaSettings(**FAST, conditions=[(300.0, 1e-4), (300.0, 2.0)])
    job = QhaMaker(settings=settings).make(structures)
    out = run_locally(job, ensure_success=True)[job.uuid][1].output
    status = {r.id: r for r in out.results}
    assert status["mp-51"].status == status["mp-10173"].status == "done"
    if status["mp-135"].status != "done":
        assert "imaginary" in status["mp-135"].reason and status["mp-135"].dropped_volumes
    assert set(out.hulls) == {"T=300K,p=0.0001GPa", "T=300K,p=2GPa"}
    for rows in out.hulls.values():
        assert sum(r["stable"] for r in rows) == 1
        assert all(r["e_hull"] >= 0 for r in rows)
        lowest = min(rows, key=lambda r: r["g_per_atom"])
        assert lowest["stable"]
    lowest_li = out.lowest["Li"]
    assert {(row["T"], row["p"]) for row in lowest_li} == {(300.0, 0.0), (300.0, 2.0)}
    assert all(status[row["id"]].status == "done" for row in lowest_li)
    files = write_qha_report(out, tmp_path)
    assert files["figure:T=300K,p=2GPa"].stat().st_size > 1000
    assert "mp-51" in files["csv:T=300K,p=0.0001GPa"].read_text()
