"""CHGGen as jobflow Makers (paper 002 §2-3) and the ``chggen_flow(spec)`` that chains them.

references (prototypes + seeds, relaxed) -> lattice search (N·V0) -> unconditional
positions in those cells -> relax -> framework symmetrization -> RePaint inpainting ->
relax -> rank by E_d -> report (symmetry success rates, ΔE/RMSD, E_d, RDF/CN, wall times).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from jobflow import Flow, Maker, job
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Composition, Lattice, Structure

from cscflow.checkpoint import resumable
from cscflow.chggen.settings import ChgGenSettings, ChgGenSpec
from cscflow.chggen.symmetrize import FrameworkResult
from cscflow.config import ForceFieldSettings, GeneratorSettings
from cscflow.schemas import Candidate, Provenance, ReferenceEntry

__all__ = [
    "ChgGenReport",
    "ChgGenReportMaker",
    "GenerationOutput",
    "InpaintMaker",
    "LatticeSearchMaker",
    "RankMaker",
    "SymmetrizeMaker",
    "UnconditionalMaker",
    "chggen_flow",
    "expand_composition",
]

logger = logging.getLogger(__name__)


class _Out(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)


class CellDraft(_Out):
    formula: str
    species: list[str]
    lattice: list[list[float]]
    crystal_system: str
    volume_per_atom: float
    v0_source: str


class LatticeSearchOutput(_Out):
    cells: list[CellDraft] = Field(default_factory=list)
    volume_per_atom: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0


class GenerationOutput(_Out):
    candidates: list[Candidate] = Field(default_factory=list)
    n_requested: int = 0
    failures: dict[str, int] = Field(default_factory=dict)
    n_score_evaluations: int = 0
    host_transport_error: float = 0.0
    seconds: float = 0.0


class SymmetrizeOutput(_Out):
    frameworks: list[FrameworkResult] = Field(default_factory=list)
    n_input: int = 0
    n_success: int = 0
    tolerances: list[float | None] = Field(default_factory=list)
    seconds: float = 0.0


class RankOutput(_Out):
    candidates: list[Candidate] = Field(default_factory=list, description="relaxed, sorted by E_d")
    decomposition_energy: dict[str, float] = Field(default_factory=dict, description="id -> E_d (eV/atom)")
    to_dft: list[str] = Field(default_factory=list, description="ids with E_d < threshold")
    seconds: float = 0.0


class ChgGenReport(_Out):
    success_unconditional: dict = Field(default_factory=dict)
    success_inpainting: dict = Field(default_factory=dict)
    framework_success: float | None = None
    delta_e: dict = Field(default_factory=dict, description="generated - relaxed, eV/atom, per mode")
    rmsd: dict = Field(default_factory=dict, description="Å, per mode")
    e_d: dict = Field(default_factory=dict, description="E_d summary per mode")
    n_to_dft: int = 0
    rdf_difference: dict = Field(default_factory=dict, description="mode -> pair -> mean |g_gen - g_ref|")
    coordination: dict = Field(default_factory=dict, description="set -> element -> CN stats")
    coordination_method: str = "crystalnn"
    funnel: dict = Field(default_factory=dict, description="mode -> requested, generated, failures, relaxed, rejected")
    structures: list[dict] = Field(default_factory=list, description="per relaxed structure, sorted by E_d")
    rdf: dict = Field(default_factory=dict, description="'r' bins and set -> pair -> mean partial RDF")
    wall_seconds: dict[str, float] = Field(default_factory=dict)


def expand_composition(formula: str) -> list[str]:
    """Species list of a whole-cell formula ('Li7Si3' -> 7 Li then 3 Si)."""
    comp = Composition(formula)
    out: list[str] = []
    for el, amt in sorted(comp.items(), key=lambda kv: kv[0].symbol):
        if abs(amt - round(amt)) > 1e-6:
            raise ValueError(f"{formula}: cell contents must be whole numbers of atoms")
        out += [el.symbol] * int(round(amt))
    return out


def _prov(cid: str, mode: str, index: int, seed: int, condition: dict, parent: str | None = None) -> Provenance:
    return Provenance(candidate_id=cid, iteration=0, generator="chggen", condition={"mode": mode, **condition},
                      parent=parent, sample_index=index, seed=seed)


def _worker():
    """One MatterGen worker process per job, in the job's folder."""
    from pathlib import Path

    from cscflow.generators.mattergen import MatterGenWorker

    return MatterGenWorker(workdir=Path.cwd() / "mattergen_worker")


@dataclass
class LatticeSearchMaker(Maker):
    """Random Bravais lattices at fixed volume N·V0 for every composition."""

    name: str = "lattice_search"
    settings: ChgGenSettings = field(default_factory=ChgGenSettings)

    @job
    @resumable
    def make(self, references: list[ReferenceEntry], seed: int = 0) -> LatticeSearchOutput:
        from cscflow.chggen.lattice import estimate_volume_per_atom, random_lattice

        t0 = time.perf_counter()
        s = self.settings
        rng = np.random.default_rng([seed, 1])
        ref_structures = [r.structure for r in references]
        cells, v0s = [], {}
        for formula in s.compositions:
            species = expand_composition(formula)
            if s.volume_per_atom is not None:
                v0, src = s.volume_per_atom, "settings"
            else:
                v0, src = estimate_volume_per_atom(formula, ref_structures)
            v0s[formula] = v0
            for _ in range(s.n_per_composition):
                system = str(rng.choice(s.crystal_systems))
                lat, system = random_lattice(len(species), v0, rng, system, s.ratio_range, s.angle_range)
                cells.append(CellDraft(formula=formula, species=species, lattice=lat.matrix.tolist(),
                                       crystal_system=system, volume_per_atom=v0, v0_source=src))
        return LatticeSearchOutput(cells=cells, volume_per_atom=v0s, seconds=time.perf_counter() - t0)


@dataclass
class UnconditionalMaker(Maker):
    """Positions generated by the diffusion model in the searched cells (species fixed)."""

    name: str = "unconditional"
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    settings: ChgGenSettings = field(default_factory=ChgGenSettings)

    @job(data=["candidates"])
    @resumable
    def make(self, cells: list[CellDraft], seed: int = 0) -> GenerationOutput:
        from cscflow.chggen.inpaint import sample_in_cells

        t0 = time.perf_counter()
        g = self.generator
        drafts = [CellDraft.model_validate(c) if isinstance(c, dict) else c for c in cells]
        with _worker() as w:
            samples, res = sample_in_cells(
                w, g.checkpoint, [(Lattice(c.lattice), c.species) for c in drafts],
                n_steps_corrector=self.settings.n_steps_corrector, guidance_factor=self.settings.guidance_factor,
                batch_size=g.batch_size, seed=int(np.random.default_rng([seed, 2]).integers(2**30)),
                device=g.device, num_steps=g.diffusion_steps)
        out = []
        for s, info in samples:
            i = int(info["input_index"])
            c = drafts[i]
            s.remove_site_property("host")
            cid = f"chggen-uncond-{c.formula}-{i:04d}"
            out.append(Candidate(provenance=_prov(cid, "unconditional", i, seed,
                                                  {"formula": c.formula, "crystal_system": c.crystal_system}),
                                 structure=s))
        return GenerationOutput(candidates=out, n_requested=len(drafts), failures=res.get("reasons", {}),
                                n_score_evaluations=res.get("n_score_evaluations", 0),
                                seconds=time.perf_counter() - t0)


@dataclass
class SymmetrizeMaker(Maker):
    """Remove guests, refine each relaxed framework at rising spglib tolerance."""

    name: str = "symmetrize"
    settings: ChgGenSettings = field(default_factory=ChgGenSettings)

    @job(data=["frameworks"])
    @resumable
    def make(self, candidates: list[Candidate]) -> SymmetrizeOutput:
        from cscflow.chggen.symmetrize import symmetrize_framework

        t0 = time.perf_counter()
        s = self.settings
        relaxed = [c for c in candidates if c.status == "relaxed"]
        fws = [symmetrize_framework(c.structure, s.guest_species, s.tolerances, s.angle_tolerance, 2, parent=c.id)
               for c in relaxed]
        return SymmetrizeOutput(frameworks=fws, n_input=len(relaxed), n_success=sum(f.success for f in fws),
                                tolerances=[f.tolerance for f in fws], seconds=time.perf_counter() - t0)


@dataclass
class InpaintMaker(Maker):
    """RePaint the guests into every symmetrized framework (host, cell and species fixed)."""

    name: str = "inpaint"
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    settings: ChgGenSettings = field(default_factory=ChgGenSettings)

    @job(data=["candidates"])
    @resumable
    def make(self, frameworks: list[FrameworkResult], seed: int = 0) -> GenerationOutput:
        from cscflow.chggen.inpaint import inpaint_guests, with_guests

        t0 = time.perf_counter()
        g, s = self.generator, self.settings
        fws = [FrameworkResult.model_validate(f) if isinstance(f, dict) else f for f in frameworks]
        fws = [f for f in fws if f.success]
        rng = np.random.default_rng([seed, 3])
        inputs, meta = [], []
        for f in fws:
            for k in range(s.inpaint_per_framework):
                inputs.append(with_guests(f.host, f.guests, rng))
                meta.append((f, k))
        if not inputs:
            return GenerationOutput(seconds=time.perf_counter() - t0)
        with _worker() as w:
            samples, res = inpaint_guests(
                w, g.checkpoint, inputs, resample_steps=s.resample_steps, n_steps_corrector=s.n_steps_corrector,
                guidance_factor=s.guidance_factor, batch_size=g.batch_size,
                seed=int(rng.integers(2**30)), fix_cell=s.fix_cell, fix_species=s.fix_species,
                device=g.device, num_steps=g.diffusion_steps)
        out = []
        for st, info in samples:
            i = int(info["input_index"])
            f, k = meta[i]
            st.remove_site_property("host")
            cid = f"chggen-inpaint-{f.parent}-{k}"
            cond = {"formula": st.composition.formula.replace(" ", ""), "framework_space_group": f.space_group,
                    "framework_tolerance": f.tolerance, "resample_steps": s.resample_steps}
            out.append(Candidate(provenance=_prov(cid, "inpaint", i, seed, cond, parent=f.parent), structure=st))
        return GenerationOutput(candidates=out, n_requested=len(inputs), failures=res.get("reasons", {}),
                                n_score_evaluations=res.get("n_score_evaluations", 0),
                                host_transport_error=res.get("host_transport_error", 0.0),
                                seconds=time.perf_counter() - t0)


@dataclass
class RankMaker(Maker):
    """E_d against the reference hull; those below ``ed_threshold`` go on to DFT."""

    name: str = "rank"
    settings: ChgGenSettings = field(default_factory=ChgGenSettings)

    @job(data=["candidates"])
    @resumable
    def make(self, candidates: list[Candidate], references: list[ReferenceEntry]) -> RankOutput:
        from cscflow.chggen.metrics import decomposition_energies

        t0 = time.perf_counter()
        good = [c for c in candidates if c.status == "relaxed" and c.energy_per_atom is not None]
        if not good:
            return RankOutput(seconds=time.perf_counter() - t0)
        ed = decomposition_energies([c.structure for c in good], [c.energy_per_atom for c in good], references)
        ranked = sorted(zip(good, ed), key=lambda p: p[1])
        return RankOutput(
            candidates=[c.model_copy(update={"e_hull": e}) for c, e in ranked],
            decomposition_energy={c.id: e for c, e in ranked},
            to_dft=[c.id for c, e in ranked if e < self.settings.ed_threshold],
            seconds=time.perf_counter() - t0,
        )


def _changes(generated: list[Candidate], relaxed: list[Candidate], calculator) -> dict[str, tuple[float, float]]:
    """id -> (ΔE generated minus relaxed in eV/atom, RMSD in Å), same force field for both."""
    from cscflow.chggen.metrics import displacement_rmsd
    from cscflow.forcefields import single_points

    by_id = {c.id: c for c in relaxed if c.status == "relaxed" and c.energy_per_atom is not None}
    pairs = [(g, by_id[g.id]) for g in generated if g.id in by_id]
    if not pairs:
        return {}
    sp = single_points([g.structure for g, _ in pairs], calculator)
    return {g.id: (r["energy"] / len(g.structure) - rel.energy_per_atom, displacement_rmsd(g.structure, rel.structure)[0])
            for (g, rel), r in zip(pairs, sp)}


@dataclass
class ChgGenReportMaker(Maker):
    """Symmetry success rates, ΔE/RMSD, E_d, RDF and CN statistics, wall times."""

    name: str = "chggen_report"
    settings: ChgGenSettings = field(default_factory=ChgGenSettings)
    forcefield: ForceFieldSettings = field(default_factory=ForceFieldSettings)

    @job
    def make(self, generated_unconditional: list[Candidate], relaxed_unconditional: list[Candidate],
             n_frameworks: int, n_frameworks_symmetrized: int, generated_inpaint: list[Candidate],
             relaxed_inpaint: list[Candidate], decomposition_energy: dict[str, float], to_dft: list[str],
             references: list[ReferenceEntry], wall_seconds: dict[str, float],
             generation: dict | None = None) -> ChgGenReport:
        from cscflow.chggen import metrics
        from cscflow.evaluate import reason_key
        from cscflow.forcefields import get_calculator

        s = self.settings
        t0 = time.perf_counter()
        calc = get_calculator(self.forcefield)
        rel = {"unconditional": [c for c in relaxed_unconditional if c.status == "relaxed"],
               "inpainting": [c for c in relaxed_inpaint if c.status == "relaxed"]}
        gen = {"unconditional": generated_unconditional, "inpainting": generated_inpaint}
        succ = {m: metrics.symmetry_success_rate([c.structure for c in rel[m]], s.success_symprec,
                                                 s.success_min_space_group) for m in rel}
        delta_e, rmsd, e_d, rows = {}, {}, {}, []
        to_dft_ids = set(to_dft)
        for m in rel:
            changes = _changes(gen[m], rel[m], calc)
            delta_e[m] = metrics.summary([v[0] for v in changes.values()])
            rmsd[m] = metrics.summary([v[1] for v in changes.values()])
            e_d[m] = metrics.summary([decomposition_energy[c.id] for c in rel[m] if c.id in decomposition_energy])
            for c, sg in zip(rel[m], succ[m]["space_groups"]):
                de, rm = changes.get(c.id, (None, None))
                rows.append({"id": c.id, "mode": m, "formula": c.structure.composition.reduced_formula,
                             "n_atoms": len(c.structure), "space_group": int(sg), "delta_e": de, "rmsd": rm,
                             "e_d": decomposition_energy.get(c.id), "to_dft": c.id in to_dft_ids,
                             "parent": c.provenance.parent})
        rows.sort(key=lambda r: (r["e_d"] is None, r["e_d"] if r["e_d"] is not None else 0.0))
        ref_structures = [r.structure for r in references]
        r_bins, rdf_ref = metrics.partial_rdfs(ref_structures, s.rdf_rmax, s.rdf_bins)
        rdf_gen = {m: metrics.partial_rdfs([c.structure for c in rel[m]], s.rdf_rmax, s.rdf_bins)[1] for m in rel}
        rdf_diff = {m: metrics.rdf_difference(rdf_gen[m], rdf_ref) for m in rel}
        rdf_curves = {"r": [float(x) for x in r_bins],
                      **{k: {pair: [float(x) for x in g] for pair, g in v.items()}
                         for k, v in {"reference": rdf_ref, **rdf_gen}.items()}}
        coord = {"reference": metrics.coordination_statistics(ref_structures, s.coordination)}
        coord.update({m: metrics.coordination_statistics([c.structure for c in rel[m]], s.coordination) for m in rel})
        relaxed_all = {"unconditional": relaxed_unconditional, "inpainting": relaxed_inpaint}
        funnel = {}
        for m in rel:  # where every requested structure went: nothing disappears silently
            g = (generation or {}).get(m, {})
            rejected = dict(Counter(reason_key(c.reject_reason) for c in relaxed_all[m] if c.status != "relaxed"))
            funnel[m] = {"requested": g.get("requested", len(gen[m])), "generation_failures": g.get("failures", {}),
                         "generated": len(gen[m]), "relaxed": len(rel[m]), "rejected": rejected}
        walls = dict(wall_seconds)
        walls["report"] = time.perf_counter() - t0
        return ChgGenReport(
            funnel=funnel, structures=rows, rdf=rdf_curves,
            success_unconditional=succ["unconditional"], success_inpainting=succ["inpainting"],
            framework_success=(n_frameworks_symmetrized / n_frameworks) if n_frameworks else None,
            delta_e=delta_e, rmsd=rmsd, e_d=e_d, n_to_dft=len(to_dft), rdf_difference=rdf_diff,
            coordination=coord, coordination_method=s.coordination, wall_seconds=walls,
        )


@job
def _collect(outputs: list[list[Candidate]]) -> list[Candidate]:
    return [c for out in outputs for c in out]


def reference_candidates(spec: ChgGenSpec) -> list[Candidate]:
    """Prototypes + seed structures (at most ``max_reference_atoms`` atoms) for the hull."""
    from cscflow.references import initial_candidates

    cands = initial_candidates(spec)
    small = [c for c in cands if len(c.structure) <= spec.chggen.max_reference_atoms]
    if len(small) < len(cands):
        logger.info("chggen: %d of %d references above %d atoms are not relaxed", len(cands) - len(small),
                    len(cands), spec.chggen.max_reference_atoms)
    return small


def chggen_flow(spec: ChgGenSpec) -> Flow:
    """The whole CHGGen workflow as one jobflow Flow; its last job's output is a ChgGenReport."""
    from cscflow.references import ReferenceMaker
    from cscflow.relax import RelaxMaker

    s, seed = spec.chggen, spec.seed
    relax = RelaxMaker(forcefield=spec.forcefield, settings=spec.relax, progress=False)
    ref_relax = relax.make(reference_candidates(spec))
    ref_relax.name = "relax_references"
    refs = ReferenceMaker().make(ref_relax.output.candidates)
    lattices = LatticeSearchMaker(settings=s).make(refs.output.references, seed)
    uncond = UnconditionalMaker(generator=spec.generator, settings=s).make(lattices.output.cells, seed)
    relax_u = relax.make(uncond.output.candidates)
    relax_u.name = "relax_unconditional"
    sym = SymmetrizeMaker(settings=s).make(relax_u.output.candidates)
    inp = InpaintMaker(generator=spec.generator, settings=s).make(sym.output.frameworks, seed)
    relax_i = relax.make(inp.output.candidates)
    relax_i.name = "relax_inpainting"
    both = _collect([relax_u.output.candidates, relax_i.output.candidates])
    rank = RankMaker(settings=s).make(both.output, refs.output.references)
    walls = {
        "relax_references": ref_relax.output.seconds, "lattice_search": lattices.output.seconds,
        "unconditional": uncond.output.seconds, "relax_unconditional": relax_u.output.seconds,
        "symmetrize": sym.output.seconds, "inpaint": inp.output.seconds,
        "relax_inpainting": relax_i.output.seconds, "rank": rank.output.seconds,
    }
    report = ChgGenReportMaker(settings=s, forcefield=spec.forcefield).make(
        uncond.output.candidates, relax_u.output.candidates, sym.output.n_input, sym.output.n_success,
        inp.output.candidates, relax_i.output.candidates, rank.output.decomposition_energy, rank.output.to_dft,
        refs.output.references, walls,
        {"unconditional": {"requested": uncond.output.n_requested, "failures": uncond.output.failures},
         "inpainting": {"requested": inp.output.n_requested, "failures": inp.output.failures}})
    jobs = [ref_relax, refs, lattices, uncond, relax_u, sym, inp, relax_i, both, rank, report]
    return Flow(jobs, output=report.output, name=f"chggen-{spec.name}")
