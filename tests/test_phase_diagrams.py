"""Reference hull vs references + S.U.N. candidates on real Li–P–S structures.

Energies are fixed MP-like numbers (eV/atom) given to real structures: the hull logic and
the plot are under test here, not a force field.
"""

from __future__ import annotations

import pytest
from pymatgen.core import Composition

from cscflow.analysis.phase_diagrams import PhaseDiagramMaker, compare_hulls, plot_phase_diagrams
from cscflow.schemas import Candidate, Provenance, ReferenceEntry

ENERGIES = {"mp-135": -1.91, "mp-157": -5.41, "mp-96": -4.13, "mp-1153": -4.11,
            "mp-985583": -4.46, "mp-541788": -4.70}


def _refs(lips_structures, energies=ENERGIES):
    return [ReferenceEntry(entry_id=k, structure=lips_structures[k], energy_per_atom=e,
                           model="test", source="materials_project") for k, e in energies.items()]


def _cand(cid, structure, e, sun=True):
    return Candidate(
        provenance=Provenance(candidate_id=cid, iteration=1, generator="pyxtal"),
        structure=structure, status="relaxed", energy_per_atom=e, model="test",
        is_stable=sun, is_unique=sun, is_novel=sun,
    )


def _candidates(lips_structures, refs):
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

    pd = PhaseDiagram([PDEntry(r.structure.composition, r.energy_per_atom * len(r.structure)) for r in refs])
    hull = lambda mp: pd.get_hull_energy_per_atom(Composition(lips_structures[mp].composition))  # noqa: E731
    return [
        _cand("new", lips_structures["mp-641703"], hull("mp-641703") - 0.05),    # below the hull
        _cand("meta", lips_structures["mp-1211324"], hull("mp-1211324") + 0.04),
        _cand("far", lips_structures["mp-1006118"], hull("mp-1006118") + 0.30),
        _cand("not-sun", lips_structures["mp-736"], hull("mp-736") - 0.5, sun=False),
        _cand("no-energy", lips_structures["mp-1125"], None),
    ]


def test_new_stable_and_metastable(lips_structures):
    refs = _refs(lips_structures)
    summary, pd_ref, pd_all = compare_hulls(refs, _candidates(lips_structures, refs))
    assert summary.elements == ["Li", "P", "S"]
    assert set(summary.reference_stable) == set(ENERGIES)  # all chosen refs are on the hull
    assert summary.new_stable == ["new"]
    assert list(summary.metastable) == ["meta"]
    # adding stable phases only lowers the hull: E_hull vs the combined hull is >= vs references
    assert summary.e_hull_vs_references["meta"] == pytest.approx(0.04, abs=1e-6)
    assert 0.04 - 1e-9 <= summary.metastable["meta"] <= 0.1
    assert summary.e_hull_vs_references["new"] == pytest.approx(-0.05, abs=1e-6)
    assert summary.e_hull_vs_references["far"] == pytest.approx(0.30, abs=1e-6)
    assert "not-sun" not in summary.e_hull_vs_references  # only S.U.N. structures join the hull
    assert summary.skipped == {"no-energy": "no energy"}
    # the new Li7P3S11 (Li2S–P2S5 line) pushes β-Li3PS4 off the hull
    assert summary.displaced == ["mp-985583"]
    assert len(pd_all.stable_entries) == len(pd_ref.stable_entries) + 1 - len(summary.displaced)


def test_plot_ternary_and_binary(lips_structures, tmp_path):
    refs = _refs(lips_structures)
    path, summary = plot_phase_diagrams(refs, _candidates(lips_structures, refs), tmp_path / "pd.png")
    assert path.stat().st_size > 20000 and summary.figures == [str(path)]

    binary = _refs(lips_structures, {"mp-135": -1.91, "mp-96": -4.13, "mp-1153": -4.11})
    li2s_new = _cand("li2s-new", lips_structures["mp-557142"], -4.20)
    path2, s2 = plot_phase_diagrams(binary, [li2s_new], tmp_path / "binary.png")
    assert s2.elements == ["Li", "S"] and s2.new_stable == ["li2s-new"] and path2.stat().st_size > 10000


def test_bad_inputs(lips_structures):
    with pytest.raises(ValueError, match="elemental reference"):
        compare_hulls(_refs(lips_structures, {"mp-135": -1.91, "mp-1153": -4.11}), [])
    with pytest.raises(ValueError, match="reference entries"):
        compare_hulls([], [])


def test_maker(lips_structures, tmp_path):
    from jobflow import run_locally

    refs = _refs(lips_structures)
    job = PhaseDiagramMaker().make(refs, [_candidates(lips_structures, refs)], str(tmp_path))
    out = run_locally(job, ensure_success=True)[job.uuid][1].output
    assert out.new_stable == ["new"] and (tmp_path / "phase_diagram.png").is_file()
