"""MatterGen backend: worker, tiny model trained here, conditioned sampling, fine-tuning.

Tests that need MatterGen's own environment (.venv-mattergen, scripts/bootstrap-mattergen)
skip when it is absent. A session fixture trains one tiny MatterGen from scratch on the
real Li-P-S structures of ../shared/data/lips.json and fine-tunes it once with both
adapters on CHGNet-labelled E_hull (the teacher standing in for DFT).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from cscflow.config import ChemicalSystem, GeneratorSettings
from cscflow.mattergen_worker.core import check_sample
from cscflow.schemas import Frame, Provenance, ReferenceEntry

LIPS = ChemicalSystem(elements=["Li", "P", "S"], min_atoms=1, max_atoms=16)
TEACHER = "teacher:chgnet-0.3.0 (stand-in for DFT)"


def have_mattergen() -> bool:
    from cscflow.generators.mattergen import mattergen_python

    try:
        mattergen_python()
    except FileNotFoundError:
        return False
    return True


needs_mattergen = pytest.mark.skipif(
    not have_mattergen(), reason="MatterGen environment absent: run scripts/bootstrap-mattergen"
)


def _frame(structure, energy, i, kind="unperturbed", labeller=TEACHER) -> Frame:
    prov = Provenance(candidate_id=f"test-{i}", iteration=0, generator="seed")
    return Frame(frame_id=f"f{i}", structure=structure, energy=float(energy),
                 forces=[[0.0, 0.0, 0.0]] * len(structure), kind=kind, labeller=labeller, provenance=prov)


# ------------------------------------------------------------ no MatterGen environment needed


def test_check_sample_guard(lips_structures):
    s = lips_structures["mp-1153"].copy()  # Li2S
    assert check_sample(s) is None
    blown = s.copy()
    blown.scale_lattice(s.volume * 500)  # the exploded-lattice failure of barely trained models
    assert check_sample(blown) == "exploded_lattice"
    close = Structure(Lattice.cubic(5.0), ["Li", "S"], [[0, 0, 0], [0.02, 0, 0]])
    assert check_sample(close) == "atoms_too_close"
    flat = Structure(Lattice([[5, 0, 0], [0, 5, 0], [0, 0, 1e-9]]), ["Li"], [[0, 0, 0]])
    assert check_sample(flat) == "collapsed_lattice"


def test_needle_thin_cells_are_reduced_to_the_same_crystal(lips_structures):
    """A sample on a skewed basis (lengths of hundreds of Å, angles near 0°) is the same
    crystal: it comes back Niggli-reduced, not as a cell that makes every neighbour list huge."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from cscflow.mattergen_worker.core import reduce_sample

    li2s = lips_structures["mp-1153"].copy()
    skewed = li2s.copy()
    skewed.make_supercell([[1, 60, 0], [0, 1, 70], [0, 0, 1]])  # unimodular: same cell, needle basis
    assert max(skewed.lattice.abc) > 100 and min(skewed.lattice.angles) < 5
    assert check_sample(skewed) is None  # volume per atom and distances are normal: the old guard let it pass
    reduced, reason = reduce_sample(skewed)
    assert reason is None and len(reduced) == len(li2s)
    assert max(reduced.lattice.abc) < 2 * max(li2s.lattice.abc)
    assert StructureMatcher().fit(reduced, li2s)
    flat = Structure(Lattice.from_parameters(3, 3, 3, 89, 1e-4, 90), ["Li"], [[0, 0, 0]])
    assert reduce_sample(flat) == (None, "degenerate_lattice")


def test_labelled_e_hull_uses_labeller_energies_only():
    from cscflow.generators.mattergen import labelled_e_hull

    li = Structure(Lattice.cubic(3.5), ["Li", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    s = Structure(Lattice.cubic(4.0), ["S"], [[0, 0, 0]])
    li2s = Structure(Lattice.cubic(5.7), ["Li", "Li", "S"], [[0.25] * 3, [0.75] * 3, [0, 0, 0]])
    frames = [
        _frame(li2s, 3 * -4.0, 0),  # on the hull built from the references below
        _frame(li2s, 3 * -3.9, 1),  # 0.1 eV/atom above it
        _frame(li2s, 3 * -1.0, 2, kind="perturbed"),  # off-equilibrium: ignored
    ]
    refs = [
        ReferenceEntry(entry_id="Li", structure=li, energy_per_atom=-2.0, model="chgnet-0.3.0", source="prototype"),
        ReferenceEntry(entry_id="S", structure=s, energy_per_atom=-4.0, model="chgnet-0.3.0", source="prototype"),
        # another model's energy would put Li2S far above the hull: must be ignored
        ReferenceEntry(entry_id="S2", structure=s, energy_per_atom=-9.0, model="mace", source="prototype"),
    ]
    pairs = labelled_e_hull([frames], refs)
    assert [f.frame_id for f, _ in pairs] == ["f0", "f1"]
    e = dict((f.frame_id, v) for f, v in pairs)
    # Li2S at -4.0 eV/atom vs 2/3*(-2) + 1/3*(-4) = -2.667: it is the hull, E_hull 0
    assert e["f0"] == pytest.approx(0.0, abs=1e-9)
    assert e["f1"] == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="elemental references"):
        labelled_e_hull(frames[:2], [])
    with pytest.raises(ValueError, match="no relaxed"):
        labelled_e_hull(frames[2:], refs)


def test_finetune_targets_are_relaxed_frames_against_the_labelled_hull():
    """Paper: targets are the DFT E_hull of the relaxed (final) structures, against the DFT
    hull that includes the references (labelled in iteration 0 by the same protocol)."""
    from cscflow.generators.mattergen import labelled_e_hull

    li = Structure(Lattice.cubic(3.5), ["Li", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    s = Structure(Lattice.cubic(4.0), ["S"], [[0, 0, 0]])
    li2s = Structure(Lattice.cubic(5.7), ["Li", "Li", "S"], [[0.25] * 3, [0.75] * 3, [0, 0, 0]])
    squeezed = li2s.copy()
    squeezed.scale_lattice(li2s.volume * 0.9)

    def protocol(cid, structure, n, epa, iteration):
        """Frames as label.protocol writes them: relax<j>-s<step> steps and statics."""
        out = []
        for j, (steps, final) in enumerate(epa["relax"]):
            for step, e in steps:
                st = squeezed if step < max(k for k, _ in steps) else structure
                out.append(Frame(frame_id=f"{cid}-relax{j}-s{step:03d}", structure=st, energy=e * n,
                                 forces=[[0.0] * 3] * n, kind="relax_step", labeller=TEACHER,
                                 provenance=Provenance(candidate_id=cid, iteration=iteration, generator="pyxtal")))
        for k, e in enumerate(epa["static"]):
            out.append(Frame(frame_id=f"{cid}-static{k}", structure=squeezed, energy=e * n,
                             forces=[[0.0] * 3] * n, kind="static", labeller=TEACHER,
                             provenance=Provenance(candidate_id=cid, iteration=iteration, generator="pyxtal")))
        return out

    # iteration 0: the references' protocol frames (Li, S); the relaxations end at -2 and -4
    ref_frames = protocol("ref-li", li, 2, {"relax": [([(0, -1.5), (3, -2.0)], None)], "static": [-1.9]}, 0)
    ref_frames += protocol("ref-s", s, 1, {"relax": [([(0, -3.0), (2, -4.0)], None)], "static": [-3.9]}, 0)
    # a Li2S candidate: copy 0 ends at -3.8, copy 1 at -3.9 (the converged one); first steps
    # and statics are off-equilibrium (a static even lies lower: it must not be the target)
    cand = protocol("it1-li2s", li2s, 3, {"relax": [([(0, -3.0), (2, -3.5), (4, -3.8)], None),
                                                    ([(0, -3.1), (5, -3.9)], None)], "static": [-4.5]}, 1)
    other = protocol("it1-li2s-b", li2s, 3, {"relax": [([(0, -3.0), (1, -3.7)], None)], "static": [-3.6]}, 1)
    pairs = labelled_e_hull([ref_frames, cand + other], references=[])
    targets = {f.provenance.candidate_id: (f, e) for f, e in pairs}
    assert set(targets) == {"ref-li", "ref-s", "it1-li2s", "it1-li2s-b"}
    frame, e_hull = targets["it1-li2s"]
    assert frame.frame_id == "it1-li2s-relax1-s005" and frame.structure == li2s
    # relaxed Li2S at -3.9 eV/atom is the hull (references at 2/3*(-2) + 1/3*(-4) = -2.67);
    # the other Li2S relaxed to -3.7 is 0.2 above it (a static of -4.5 would have said 0.8)
    assert e_hull == pytest.approx(0.0, abs=1e-9)
    assert targets["it1-li2s-b"][1] == pytest.approx(0.2, abs=1e-6)
    assert targets["ref-li"][1] == pytest.approx(0.0, abs=1e-9)
    assert all(f.kind == "relax_step" for f, _ in pairs)


def test_missing_environment_and_checkpoint_are_clear_errors(tmp_path, monkeypatch):
    from cscflow.generators import get_generator
    from cscflow.generators.mattergen import MatterGenGenerator, mattergen_python

    monkeypatch.setenv("CSCFLOW_MATTERGEN_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(FileNotFoundError, match="CSCFLOW_MATTERGEN_PYTHON"):
        mattergen_python()
    with pytest.raises(ValueError, match="generator.checkpoint"):
        GeneratorSettings(backend="mattergen", checkpoint=tmp_path / "missing")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    gen = get_generator(GeneratorSettings(backend="mattergen", checkpoint=ckpt))
    assert isinstance(gen, MatterGenGenerator) and gen.name == "mattergen"
    assert gen._worker is None  # nothing started before the first generate


# ------------------------------------------------------------ with the MatterGen environment


def _small(lips_structures, max_atoms=16):
    return [s for _, s in sorted(lips_structures.items()) if len(s) <= max_atoms]


@pytest.fixture(scope="session")
def chgnet_frames(lips_structures):
    """Unperturbed frames labelled by CHGNet (the teacher) for the small Li-P-S structures."""
    from chgnet.model import CHGNet

    structures = _small(lips_structures)
    model = CHGNet.load(verbose=False)
    preds = model.predict_structure(structures, task="ef", batch_size=16)
    return [_frame(s, float(p["e"]) * len(s), i) for i, (s, p) in enumerate(zip(structures, preds))]


@pytest.fixture(scope="session")
def tiny_mattergen(tmp_path_factory, lips_structures, chgnet_frames):
    """One tiny MatterGen trained from scratch, then fine-tuned once with both adapters."""
    if not have_mattergen():
        pytest.skip("MatterGen environment absent: run scripts/bootstrap-mattergen")
    from cscflow.generators.mattergen import MatterGenWorker, finetune_generator
    from cscflow.mattergen_worker.modelconf import ModelSpec

    root = tmp_path_factory.mktemp("mattergen")
    worker = MatterGenWorker(workdir=root / "worker")
    base = root / "tiny-base"
    trained = worker.train(_small(lips_structures), base, spec=ModelSpec.tiny().as_dict(),
                           max_steps=int(os.environ.get("CSCFLOW_TINY_MATTERGEN_STEPS", 600)),
                           batch_size=16, device="cpu", seed=0)
    tuned = finetune_generator(chgnet_frames, base, iteration=0, seed=0, max_steps=20, batch_size=16,
                               device="cpu", output_dir=root / "ft", worker=worker)
    yield {"base": base, "trained": trained, "tuned": tuned, "worker": worker, "root": root}
    worker.close()


@needs_mattergen
def test_worker_environment():
    from cscflow.generators.mattergen import MatterGenWorker

    with MatterGenWorker() as w:
        info = w.ping()
    assert info["numpy"].startswith("1.")  # mattergen needs numpy<2, the main env has 2.x
    assert info["torch"].startswith("2.13.0")
    assert info["compat_scatter"] is True  # no compiled torch_scatter/torch_sparse here


@needs_mattergen
def test_tiny_checkpoints_load(tiny_mattergen):
    w = tiny_mattergen["worker"]
    base = w.load(tiny_mattergen["base"], device="cpu")
    assert base["conditions"] == []  # unconditional base model
    assert base["num_steps"] == 20 and 1e4 < base["n_parameters"] < 1e6
    assert (tiny_mattergen["base"] / "config.yaml").is_file()
    assert (tiny_mattergen["base"] / "checkpoints" / "last.ckpt").is_file()
    assert tiny_mattergen["trained"]["n_scale_factors_fitted"] > 0
    tuned = tiny_mattergen["tuned"]
    assert tuned.parent == str(tiny_mattergen["base"].resolve())
    assert tuned.n_structures == len(tiny_mattergen["trained"]["num_atoms_distribution"]) or tuned.n_structures > 0
    info = w.load(tuned.checkpoint, device="cpu")
    assert info["conditions"] == ["chemical_system", "energy_above_hull"]
    assert info["meta"]["kind"] == "adapter" and info["meta"]["n_new_parameters"] > 0


@needs_mattergen
def test_conditioned_generation_filters_and_records(tiny_mattergen):
    from cscflow.generators import generate_candidates
    from cscflow.generators.mattergen import MatterGenGenerator

    settings = GeneratorSettings(backend="mattergen", checkpoint=tiny_mattergen["tuned"].checkpoint,
                                 num_per_condition=4, conditions=[0.0, 0.06], batch_size=8,
                                 guidance_factor=2.0, device="cpu", max_attempts_per_structure=6)
    gen = MatterGenGenerator(settings, worker=tiny_mattergen["worker"])
    cands, failures = generate_candidates(LIPS, settings, iteration=1, seed=3, generator=gen)
    assert cands, f"no valid samples at all: {dict(failures)}"
    for c in cands:
        assert {el.symbol for el in c.structure.composition.elements} <= {"Li", "P", "S"}
        assert check_sample(c.structure) is None and c.structure.is_valid(tol=0.5)
        p = c.provenance
        assert p.generator == "mattergen" and p.iteration == 1 and p.sample_index is not None
        assert p.condition["chemical_system"] == "Li-P-S" and p.condition["e_hull"] in (0.0, 0.06)
    assert len({c.id for c in cands}) == len(cands)
    assert set(gen.stats) == {"e_hull=0", "e_hull=0.06"}
    for st in gen.stats.values():
        assert st["sampled"] >= st["accepted"]
        rate = st["violation_rate"]
        assert rate is None or 0.0 <= rate <= 1.0
    outside = sum(st["outside_chemical_system"] for st in gen.stats.values())
    assert failures.get("outside_chemical_system", 0) == outside


@needs_mattergen
def test_base_model_cannot_be_conditioned(tiny_mattergen):
    from cscflow.generators.mattergen import MatterGenGenerator

    settings = GeneratorSettings(backend="mattergen", checkpoint=tiny_mattergen["base"], device="cpu")
    gen = MatterGenGenerator(settings, worker=tiny_mattergen["worker"])
    with pytest.raises(ValueError, match="cannot condition"):
        gen.generate(LIPS, 2, {"e_hull": 0.0}, np.random.default_rng(0))


@needs_mattergen
def test_exploded_lattice_guard_rejects_and_records(tiny_mattergen):
    """A lattice prior 10^4 x too dilute blows cells up: rejected and counted, worker survives."""
    w = tiny_mattergen["worker"]
    samples, res = w.sample(tiny_mattergen["tuned"].checkpoint, 4,
                            {"chemical_system": "Li-P-S", "energy_above_hull": 0.0},
                            batch_size=4, seed=0, device="cpu", limit_density=1e-6,
                            num_atoms_distribution={"4": 1.0})
    assert samples == [] and res["n_accepted"] == 0
    assert sum(res["reasons"].values()) == 4
    assert set(res["reasons"]) <= {"exploded_lattice", "non_finite_coordinates"} | {
        r for r in res["reasons"] if r.startswith("sampling_crashed:")
    }
    assert w.ping()["pid"] > 0  # still alive


@needs_mattergen
def test_finetune_maker_then_generate_with_new_checkpoint(tiny_mattergen, chgnet_frames, tmp_path):
    """generate -> fine-tune (jobflow Maker) -> generate with the new checkpoint."""
    from jobflow import Flow, run_locally

    from cscflow.generators import GenerateMaker
    from cscflow.generators.mattergen import FinetuneGeneratorMaker

    settings = GeneratorSettings(backend="mattergen", checkpoint=tiny_mattergen["tuned"].checkpoint,
                                 num_per_condition=2, conditions=[0.0], batch_size=4, device="cpu",
                                 max_attempts_per_structure=8)
    ft = FinetuneGeneratorMaker(max_steps=5, batch_size=16, device="cpu", output_dir=str(tmp_path / "ft"))
    ft_job = ft.make(chgnet_frames, tiny_mattergen["tuned"].checkpoint, iteration=1, seed=1)
    gen_job = GenerateMaker(chemical_system=LIPS, settings=settings).make(
        iteration=2, seed=5, checkpoint=ft_job.output.checkpoint
    )
    responses = run_locally(Flow([ft_job, gen_job]), ensure_success=True, log=False)
    out_ft = responses[ft_job.uuid][1].output
    out_gen = responses[gen_job.uuid][1].output
    assert Path(out_ft.checkpoint).is_dir() and out_ft.parent == str(Path(tiny_mattergen["tuned"].checkpoint))
    assert out_ft.steps == 5 and out_ft.n_structures == len(chgnet_frames)
    assert out_gen.generator == "mattergen"
    assert all(c.provenance.iteration == 2 for c in out_gen.candidates)
    assert out_gen.n_requested == 2


@pytest.mark.slow  # ~6 min here (tiny model, DPA-3 training twice); run with -m slow
@needs_mattergen
def test_loop_with_mattergen_generator_and_finetuning(tiny_mattergen, tmp_path):
    """Two iterations: generate -> ... -> fine-tune -> generate with the fine-tuned checkpoint."""
    from cscflow.runner import explore, load_run
    from cscflow.stores import build_job_store

    spec = tmp_path / "mg.yaml"
    spec.write_text(
        f"""
name: mattergen_tiny
chemical_system: {{elements: [Li, P, S], min_atoms: 2, max_atoms: 8}}
builtin_references: prototypes
seed: 5
generator:
  backend: mattergen
  checkpoint: {tiny_mattergen["tuned"].checkpoint}
  num_per_condition: 4
  conditions: [0.0]
  diffusion_steps: 20
  batch_size: 8
  device: cpu
  finetune_steps: 5
  finetune_batch_size: 8
relax: {{fmax: 0.2, steps: 30}}
selection: {{only_sun: false, bins: [{{high: 0.0, quota: 1}}, {{low: 0.0, high: 10.0, quota: 2}}]}}
labeller: {{backend: teacher, copies_per_structure: 1, statics_per_structure: 1}}
training: {{backend: deepmd, numb_steps: 10, decay_steps: 5, n_dim: 8, e_dim: 8, a_dim: 4, nlayers: 1}}
convergence: {{max_iterations: 2, dh_dn_threshold: 0.0}}
"""
    )
    run_dir = tmp_path / "run"
    final = explore(spec, run_dir)
    assert [d.iteration for d in final.history] == [1, 2]
    run_id, spec_obj = load_run(run_dir)
    store = build_job_store(spec_obj.store, run_dir)
    store.connect()
    tuned = {
        d["metadata"]["iteration"]: d["output"]["checkpoint"]
        for d in store.query({"metadata.run_id": run_id, "metadata.stage": "finetune_generator"})
    }
    assert set(tuned) == {1, 2}
    assert Path(tuned[1]).exists() and tuned[1] != tuned[2]
    gen2 = store.query_one({"metadata.run_id": run_id, "metadata.stage": "generate", "metadata.iteration": 2}, load=True)
    store.close()
    for cand in gen2["output"]["candidates"]:
        prov = cand["provenance"]
        assert prov["generator"] == "mattergen" and prov["iteration"] == 2
        assert prov["condition"]["e_hull"] == 0.0
    # Iteration 2 sampled from iteration 1's fine-tuned checkpoint.
    assert final.generator_checkpoint == tuned[2]


@needs_mattergen
def test_tiny_conditioned_model_from_prototypes_knows_both_conditions(tmp_path):
    """`python -m cscflow.chggen.tiny OUT --elements Li P S --conditioned`: the demo's generator."""
    from cscflow.chggen.tiny import train_tiny_conditioned_model
    from cscflow.generators.mattergen import CONDITIONS, MatterGenWorker

    out = train_tiny_conditioned_model(["Li", "P", "S"], tmp_path / "tiny", steps=20, finetune_steps=3)
    assert out == (tmp_path / "tiny" / "it0").resolve()
    assert (tmp_path / "tiny" / "base" / "checkpoints" / "last.ckpt").is_file()
    with MatterGenWorker(workdir=tmp_path / "w") as w:
        info = w.load(out, device="cpu")
    assert set(CONDITIONS) <= set(info["conditions"])
    stamp = (out / "checkpoints" / "last.ckpt").stat().st_mtime
    assert train_tiny_conditioned_model(["Li", "P", "S"], tmp_path / "tiny") == out  # second call: no retraining
    assert (out / "checkpoints" / "last.ckpt").stat().st_mtime == stamp
