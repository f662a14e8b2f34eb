"""Iteration 0: the shipped Materials Project Li-P-S snapshot (offline) and the prototype fallback."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher

from cscflow.config import ExplorationSpec
from cscflow.references import initial_candidates, mp_snapshot


def _spec(elements, **extra):
    return ExplorationSpec.model_validate({"chemical_system": {"elements": elements}, **extra})


def test_snapshot_ships_ids_licence_and_citation():
    raw = json.loads(resources.files("cscflow.data").joinpath("mp_lips.json").read_text())
    assert raw["licence"] == "CC-BY-4.0" and "Materials Project" in raw["attribution"]
    assert "APL Materials 1, 011002 (2013)" in raw["citation"]
    assert "CC BY 4.0" in resources.files("cscflow.data").joinpath("README.md").read_text()
    ids = [r["material_id"] for r in raw["structures"]]
    assert len(ids) == len(set(ids)) and all(i.startswith("mp-") for i in ids)
    assert {"mp-1153", "mp-736", "mp-157", "mp-985583", "mp-541788"} <= set(ids)  # Li2S Li3P P Li3PS4 P2S5
    assert max(r["nsites"] for r in raw["structures"]) <= raw["max_atoms"]


def test_lips_iteration0_is_the_mp_snapshot_offline():
    cands = initial_candidates(_spec(["Li", "P", "S"]))
    assert len(cands) == 66
    assert all(c.provenance.generator == "materials_project" and c.provenance.parent.startswith("mp-")
               for c in cands)
    li3ps4 = [c for c in cands if c.structure.composition.reduced_formula == "Li3PS4"]
    assert {c.provenance.parent for c in li3ps4} == {"mp-985583", "mp-1097036"}
    assert {el.symbol for c in cands for el in c.structure.composition.elements} == {"Li", "P", "S"}
    small = initial_candidates(_spec(["Li", "P", "S"], prototype_max_atoms=8))
    assert small and all(len(c.structure) <= 8 for c in small)
    # explicit prototypes, and other systems (here a subsystem), keep the prototypes
    protos = initial_candidates(_spec(["Li", "P", "S"], builtin_references="prototypes"))
    assert {c.provenance.generator for c in protos} == {"prototype"} and len(protos) < 10
    assert {c.provenance.generator for c in initial_candidates(_spec(["Li", "S"]))} == {"prototype"}


def test_snapshot_structures_are_the_mp_ones(lips_structures):
    matcher = StructureMatcher()
    snap = dict(mp_snapshot(["Li", "P", "S"]))
    for mp_id in ("mp-1153", "mp-985583", "mp-157"):
        assert matcher.fit(snap[mp_id], lips_structures[mp_id])
    assert all(len(s) <= 32 for s in snap.values())
    assert {i for i, _ in mp_snapshot(["Li", "S"])} < set(snap)


def test_materials_project_query_needs_a_key(monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(Exception, match="MP_API_KEY"):
        initial_candidates(_spec(["Li", "P", "S"], materials_project=True))
