"""Anion motifs (paper SI §1.2): bonded clusters of the non-Li atoms and a catalogue per run.

A bond graph over the framework atoms (Li and other excluded cations dropped) is built with
per-pair cutoffs and periodic images; its connected components are the motifs. Finite
components get a Weisfeiler–Lehman hash (networkx) with species as node and bond type as
edge attributes; components bonded to their own periodic image (Larsen's algorithm in
pymatgen) are chains/layers/frameworks and are hashed on the periodic graph, so a
(PS3)n chain is never mistaken for a finite cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import click
import networkx as nx
import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Composition, Molecule, Structure

__all__ = [
    "DEFAULT_PAIR_CUTOFFS",
    "Motif",
    "MotifCatalog",
    "MotifCatalogMaker",
    "MotifRecord",
    "MotifSettings",
    "build_motif_catalog",
    "export_clusters",
    "find_motifs",
    "motif_counts",
    "motifs_command",
]

# Li–P–S bond cutoffs (Å) from the issue / SI §1.2. P–S bonds are 2.0–2.15 Å, S–S 2.05 Å,
# P–P 2.2–2.3 Å; the shortest non-bonded S···S contacts in thiophosphates are > 3 Å.
DEFAULT_PAIR_CUTOFFS: dict[str, float] = {"P-S": 2.35, "S-S": 2.20, "P-P": 2.50}
_DIM_NAMES = {1: "chain", 2: "layer", 3: "framework"}
_WL_ITERATIONS = 4


def _pair(a: str, b: str) -> str:
    return "-".join(sorted((a, b)))


class MotifSettings(BaseModel):
    """Which atoms form the anion graph and when two of them are bonded."""

    model_config = ConfigDict(extra="forbid")

    cutoffs: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_PAIR_CUTOFFS),
        description="bond cutoff per element pair, 'A-B' (order free), Å",
    )
    exclude: list[str] = Field(default_factory=lambda: ["Li"], description="cations left out of the graph")
    covalent_factor: float | None = Field(
        1.1,
        description="pairs without a cutoff bond below this x (sum of covalent radii); None: never",
    )

    def cutoff(self, a: str, b: str) -> float:
        table = {_pair(*k.split("-")): v for k, v in self.cutoffs.items()}
        key = _pair(a, b)
        if key in table:
            return float(table[key])
        if self.covalent_factor is None:
            return 0.0
        from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

        radii = CovalentRadius.radius
        if a not in radii or b not in radii:
            return 0.0
        return self.covalent_factor * (radii[a] + radii[b])

    @classmethod
    def for_elements(cls, elements: Sequence[str], **overrides) -> MotifSettings:
        """Defaults for a chemical system: metals are the cations left out of the graph."""
        from pymatgen.core.periodic_table import Element

        exclude = [e for e in elements if Element(e).is_metal]
        return cls(exclude=exclude, **overrides)


@dataclass
class Motif:
    """One connected component of the anion graph in one structure."""

    hash: str
    formula: str
    periodic: bool
    dimensionality: int
    name: str | None
    charge: int | None
    site_indices: tuple[int, ...]
    molecule: Molecule | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "formula": self.formula,
            "hash": self.hash,
            "periodic": self.periodic,
            "dimensionality": self.dimensionality,
            "name": self.name,
            "charge": self.charge,
        }


# ----------------------------------------------------------------------------- graph


def _framework(structure: Structure, exclude: Iterable[str]) -> tuple[Structure, list[int]]:
    """The structure without excluded (also partially occupied excluded) sites."""
    excluded = set(exclude)
    keep = [
        i for i, site in enumerate(structure)
        if not any(el.symbol in excluded for el in site.species.elements)
    ]
    kept_sites = [structure[i] for i in keep]
    for i, site in zip(keep, kept_sites):
        if not site.is_ordered:
            raise ValueError(
                f"site {i} ({site.species}) is disordered; only sites of the excluded "
                f"elements {sorted(excluded)} may be partially occupied"
            )
    if not kept_sites:
        return Structure(structure.lattice, [], []), []
    return Structure.from_sites(kept_sites), keep


def bond_graph(structure: Structure, settings: MotifSettings | None = None):
    """StructureGraph of the non-excluded atoms, bonds within the per-pair cutoffs.

    pymatgen's `CutOffDictNN` with one cutoff per element pair present (the table, else the
    covalent fallback). Returns (structure graph, indices of its sites in the input structure).
    """
    from pymatgen.analysis.graphs import StructureGraph
    from pymatgen.analysis.local_env import CutOffDictNN

    settings = settings or MotifSettings()
    sub, keep = _framework(structure, settings.exclude)
    if len(sub) == 0:
        return StructureGraph.from_empty_graph(sub, name="bonds"), keep
    sub.remove_oxidation_states()  # CutOffDictNN matches species strings: "S", not "S2-"
    elements = sorted({site.specie.symbol for site in sub})
    cutoffs = {(a, b): settings.cutoff(a, b) for a in elements for b in elements}
    strategy = CutOffDictNN({pair: d for pair, d in cutoffs.items() if d > 0})
    return StructureGraph.from_local_env_strategy(sub, strategy, weights=True), keep


def _formula(composition: Composition) -> str:
    """Element counts in pymatgen's electronegativity order without ones: PS4, P2S7."""
    return re.sub(r"(?<=[A-Za-z])1(?![0-9])", "", composition.formula.replace(" ", ""))


def _neighbours(graph, nodes) -> dict[int, list[int]]:
    """Neighbours of each site on the infinite (periodic) graph, with multiplicity."""
    nbrs: dict[int, list[int]] = {n: [] for n in nodes}
    for u, v in graph.edges():
        nbrs[u].append(v)
        nbrs[v].append(u)
    return nbrs


def _periodic_hash(nodes, nbrs, symbols, dimensionality) -> str:
    """WL refinement on the quotient graph: equal to WL on the infinite periodic graph.

    Label counts are divided by their gcd so a chain gets the same hash in any supercell.
    """

    def h(text: str) -> str:
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    labels = {n: symbols[n] for n in nodes}
    seen: Counter = Counter(labels.values())
    for _ in range(_WL_ITERATIONS):
        labels = {
            n: h(labels[n] + "|" + ",".join(sorted(
                _pair(symbols[n], symbols[m]) + ":" + labels[m] for m in nbrs[n]
            )))
            for n in nodes
        }
        seen.update(labels.values())
    g = reduce(math.gcd, seen.values())
    signature = sorted((k, v // g) for k, v in seen.items())
    return h(f"periodic-{dimensionality}|{signature}")


def _formal_charge(nodes, nbrs, symbols) -> int | None:
    """Formal charge of a P/S component: S −2 (+1 per S–S bond); P(V) if 4-, P(III) if 3-coordinated (−1 per P–P)."""
    charge = 0
    for n in nodes:
        el = symbols[n]
        around = [symbols[m] for m in nbrs[n]]
        if el == "S":
            charge += -2 + around.count("S")
        elif el == "P":
            base = {4: 5, 3: 3}.get(len(around))
            if base is None:
                return None
            charge += base - around.count("P")
        else:
            return None
    return charge


def _superscript(charge: int) -> str:
    if charge == 0:
        return ""
    digits = str(abs(charge)) if abs(charge) > 1 else ""
    table = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
    return digits.translate(table) + ("⁻" if charge < 0 else "⁺")


def _name(formula: str, periodic: bool, dimensionality: int, nodes, nbrs, symbols, charge) -> str | None:
    """Chemical name of known thiophosphate / sulfide / phosphide motifs; None if unknown."""
    n_pp = sum(1 for n in nodes if symbols[n] == "P" for m in nbrs[n] if symbols[m] == "P") // 2
    n_ss = sum(1 for n in nodes if symbols[n] == "S" for m in nbrs[n] if symbols[m] == "S") // 2
    bridging = sum(
        1 for n in nodes if symbols[n] == "S" and sum(symbols[m] == "P" for m in nbrs[n]) >= 2
    )
    q = _superscript(charge) if charge is not None else ""
    if periodic:
        kind = _DIM_NAMES[dimensionality]
        if formula == "PS3" and dimensionality == 1 and n_pp == 0 and n_ss == 0:
            return f"(PS3)n{q} chain (catena-metathiophosphate)"
        return f"({formula})n {kind}"
    known = {
        ("PS4", 0, 0, 0): "tetrahedron (ortho-thiophosphate)",
        ("P2S7", 0, 0, 1): "corner-sharing dimer (pyro-thiophosphate)",
        ("P2S6", 1, 0, 0): "dimer with P–P bond (hypo-thiodiphosphate)",
        ("P2S6", 0, 0, 2): "edge-sharing dimer",
        ("P3S9", 0, 0, 3): "ring (cyclo-thiophosphate)",
        ("PS3", 0, 0, 0): "trigonal pyramid (thiophosphite)",
        ("S", 0, 0, 0): "sulfide",
        ("S2", 0, 1, 0): "disulfide",
        ("P", 0, 0, 0): "phosphide",
        ("P2", 1, 0, 0): "diphosphide",
    }
    tail = known.get((formula, n_pp, n_ss, bridging))
    if tail:
        return f"{formula}{q} {tail}"
    if re.fullmatch(r"P4S\d+", formula) and charge == 0:
        return f"{formula} cage"
    if formula == "P4" and n_pp == 6:
        return "P4 tetrahedron"
    if re.fullmatch(r"S\d+", formula):
        n = int(formula[1:])
        return f"{formula} ring" if n_ss == n else f"{formula}{q} polysulfide chain"
    return None


def find_motifs(structure: Structure, settings: MotifSettings | None = None) -> list[Motif]:
    """Every connected component of the anion graph of `structure` (one per occurrence)."""
    from pymatgen.analysis.dimensionality import get_structure_components

    if not isinstance(structure, Structure):
        raise TypeError(f"find_motifs needs a pymatgen Structure, got {type(structure).__name__}")
    settings = settings or MotifSettings()
    sg, keep = bond_graph(structure, settings)
    if len(sg.structure) == 0:
        return []
    symbols = [site.specie.symbol for site in sg.structure]
    graph = sg.graph
    motifs = []
    for comp in get_structure_components(sg, inc_site_ids=True, inc_molecule_graph=True):
        nodes = sorted(comp["site_ids"])
        dim = int(comp["dimensionality"])
        sub = graph.subgraph(nodes)
        nbrs = _neighbours(sub, nodes)
        composition = Composition(Counter(symbols[n] for n in nodes))
        charge = _formal_charge(nodes, nbrs, symbols)
        if dim == 0:
            simple = nx.Graph()
            for n in nodes:
                simple.add_node(n, species=symbols[n])
            for u, v in sub.edges():
                simple.add_edge(u, v, bond=_pair(symbols[u], symbols[v]))
            digest = nx.weisfeiler_lehman_graph_hash(
                simple, node_attr="species", edge_attr="bond", iterations=_WL_ITERATIONS
            )
            formula = _formula(composition)
            molecule = comp["molecule_graph"].molecule
        else:
            digest = _periodic_hash(nodes, nbrs, symbols, dim)
            reduced, _ = composition.get_reduced_composition_and_factor()
            formula = _formula(reduced)
            if charge is not None:
                charge = int(round(charge / (composition.num_atoms / reduced.num_atoms)))
            molecule = None
        motifs.append(
            Motif(
                hash=digest,
                formula=formula,
                periodic=dim > 0,
                dimensionality=dim,
                name=_name(formula, dim > 0, dim, nodes, nbrs, symbols, charge),
                charge=charge,
                site_indices=tuple(keep[n] for n in nodes),
                molecule=molecule,
            )
        )
    return motifs


def motif_counts(motifs: Iterable[Motif]) -> list[dict[str, Any]]:
    """Motifs grouped by hash: summary + count, most frequent first."""
    groups: dict[str, dict[str, Any]] = {}
    for m in motifs:
        entry = groups.setdefault(m.hash, {**m.summary(), "count": 0})
        entry["count"] += 1
    return sorted(groups.values(), key=lambda e: (-e["count"], e["formula"]))


# ------------------------------------------------------------------------- catalogue


class MotifRecord(BaseModel):
    """One unique motif of a run."""

    hash: str
    formula: str
    name: str | None = None
    periodic: bool = False
    dimensionality: int = 0
    charge: int | None = None
    count: int = Field(0, description="occurrences over all structures")
    n_structures: int = Field(0, description="structures containing it")
    first_iteration: int | None = None
    example_ids: list[str] = Field(default_factory=list)
    in_references: bool = False
    example: dict | None = Field(None, description="Molecule.as_dict() of one finite cluster")


class MotifCatalog(BaseModel):
    """The motif catalogue of a run: records sorted by count."""

    records: list[MotifRecord] = Field(default_factory=list)
    n_structures: int = 0
    n_references: int = 0
    failures: dict[str, str] = Field(default_factory=dict, description="structure id -> error")

    def table(self) -> list[dict[str, Any]]:
        return [r.model_dump(exclude={"example"}) for r in self.records]


def _as_item(obj, index: int) -> tuple[str, int | None, Structure]:
    if isinstance(obj, Structure):
        return f"structure-{index}", None, obj
    if isinstance(obj, tuple) and len(obj) == 3:
        return str(obj[0]), obj[1], obj[2]
    provenance = getattr(obj, "provenance", None)
    if provenance is not None:  # Candidate or Frame
        return provenance.candidate_id, provenance.iteration, obj.structure
    if hasattr(obj, "entry_id"):  # ReferenceEntry
        return obj.entry_id, None, obj.structure
    raise TypeError(
        f"cannot take motifs of {type(obj).__name__}: give Candidate, Frame, ReferenceEntry, "
        "Structure or (id, iteration, Structure)"
    )


def _flatten_items(items) -> list:
    """One level of per-iteration lists; an (id, iteration, Structure) tuple is one item. Not
    schemas.flatten_documents: the items are mixed (Candidate, Frame, ReferenceEntry, Structure, tuple)."""
    out = []
    for item in items:
        if isinstance(item, (list, tuple)) and not (
            isinstance(item, tuple) and len(item) == 3 and isinstance(item[2], Structure)
        ):
            out.extend(item)
        else:
            out.append(item)
    return out


def build_motif_catalog(
    structures: Iterable,
    references: Iterable = (),
    settings: MotifSettings | None = None,
    max_examples: int = 5,
    include_rejected: bool = False,
) -> MotifCatalog:
    """Catalogue of the motifs in `structures` (Candidates, lists of them per iteration, ...).

    A structure whose graph cannot be built is recorded in `failures`, never raised.
    """
    settings = settings or MotifSettings()
    records: dict[str, MotifRecord] = {}
    failures: dict[str, str] = {}
    n = 0
    for index, obj in enumerate(_flatten_items(structures)):
        if not include_rejected and getattr(obj, "status", None) == "rejected":
            continue
        ident, iteration, structure = _as_item(obj, index)
        n += 1
        try:
            motifs = find_motifs(structure, settings)
        except Exception as exc:  # one bad structure never stops a catalogue
            failures[ident] = f"{type(exc).__name__}: {exc}"
            continue
        for digest, group in _group(motifs).items():
            first = group[0]
            rec = records.get(digest)
            if rec is None:
                rec = records[digest] = MotifRecord(
                    hash=digest, formula=first.formula, name=first.name, periodic=first.periodic,
                    dimensionality=first.dimensionality, charge=first.charge,
                    example=first.molecule.as_dict() if first.molecule is not None else None,
                )
            rec.count += len(group)
            rec.n_structures += 1
            if iteration is not None and (rec.first_iteration is None or iteration < rec.first_iteration):
                rec.first_iteration = iteration
            if len(rec.example_ids) < max_examples and ident not in rec.example_ids:
                rec.example_ids.append(ident)
    ref_hashes: set[str] = set()
    n_ref = 0
    for index, obj in enumerate(_flatten_items(references)):
        ident, _, structure = _as_item(obj, index)
        n_ref += 1
        try:
            ref_hashes.update(m.hash for m in find_motifs(structure, settings))
        except Exception as exc:
            failures[f"reference:{ident}"] = f"{type(exc).__name__}: {exc}"
    for digest, rec in records.items():
        rec.in_references = digest in ref_hashes
    ordered = sorted(records.values(), key=lambda r: (-r.count, r.formula))
    return MotifCatalog(records=ordered, n_structures=n, n_references=n_ref, failures=failures)


def _group(motifs: list[Motif]) -> dict[str, list[Motif]]:
    groups: dict[str, list[Motif]] = {}
    for m in motifs:
        groups.setdefault(m.hash, []).append(m)
    return groups


def export_clusters(
    catalog: MotifCatalog, directory: str | Path, box: float = 20.0, fmt: str = "extxyz"
) -> list[Path]:
    """Write each unique finite cluster centred in a cubic `box` (Å) as CIF or extxyz."""
    if fmt not in ("extxyz", "cif"):
        raise ValueError(f"unknown cluster format {fmt!r}: use 'extxyz' or 'cif'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in catalog.records:
        if rec.periodic or rec.example is None:
            continue
        molecule = Molecule.from_dict(rec.example)
        extent = np.ptp(molecule.cart_coords, axis=0).max() if len(molecule) > 1 else 0.0
        if extent >= box:
            raise ValueError(f"cluster {rec.formula} spans {extent:.1f} Å: larger than the {box} Å box")
        boxed = molecule.get_boxed_structure(box, box, box, reorder=False)
        path = directory / f"{rec.formula}_{rec.hash[:8]}.{fmt}"
        if fmt == "cif":
            from pymatgen.io.cif import CifWriter

            CifWriter(boxed).write_file(path)
        else:
            from ase.io import write
            from pymatgen.io.ase import AseAtomsAdaptor

            atoms = AseAtomsAdaptor.get_atoms(boxed)
            atoms.info.update({"motif_hash": rec.hash, "formula": rec.formula, "name": rec.name or ""})
            write(path, atoms, format="extxyz")
        paths.append(path)
    return paths


@dataclass
class MotifCatalogMaker(Maker):
    """Motif catalogue of a run's candidates, flagged against the reference structures."""

    name: str = "motif catalog"
    settings: MotifSettings = field(default_factory=MotifSettings)
    export_dir: str | None = None
    export_format: str = "extxyz"

    @job
    def make(self, candidates: list, references: list = ()) -> MotifCatalog:
        catalog = build_motif_catalog(candidates, references, self.settings)
        if self.export_dir:
            export_clusters(catalog, self.export_dir, fmt=self.export_format)
        return catalog


# ------------------------------------------------------------------------------- CLI


def _file_motifs(path: str, settings: MotifSettings) -> list[dict[str, Any]]:
    """Motif counts of every structure in one file; raises on an unreadable or disordered file."""
    from cscflow.structures_io import read_structures

    found: list[Motif] = []
    for seed in read_structures(path):
        try:
            found.extend(find_motifs(seed.structure, settings))
        except ValueError as exc:
            raise ValueError(f"{seed.label}: {exc}") from None
    return [
        {k: e[k] for k in ("formula", "hash", "count", "periodic", "name")}
        for e in motif_counts(found)
    ]


@click.command("motifs")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print a JSON list, one object per file")
def motifs_command(files, as_json):
    """Anion motifs (non-Li bonded clusters) in structure FILEs: CIF, POSCAR, extxyz, JSON records.

    A file that cannot be read or holds disordered anions is reported as that file's error
    (one line on stderr, "error" in --json) and the others go on; exit 2 if any failed.
    """
    from cscflow.structures_io import StructureReadError

    settings = MotifSettings()
    results = []
    for path in files:
        try:
            results.append({"file": str(path), "motifs": _file_motifs(path, settings)})
        except (StructureReadError, ValueError, OSError) as exc:
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            results.append({"file": str(path), "error": message})
            click.echo(f"error: {message}", err=True)
    if as_json:
        click.echo(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for res in results:
            if "error" in res:
                continue
            click.echo(res["file"])
            if not res["motifs"]:
                click.echo("  (no non-Li atoms)")
            for m in res["motifs"]:
                kind = "periodic" if m["periodic"] else "finite"
                click.echo(
                    f"  {m['formula']:<10} x{m['count']:<4} {kind:<9} {m['hash'][:12]}  {m['name'] or ''}"
                )
    failed = sum("error" in res for res in results)
    if failed:
        click.get_current_context().exit(2)
