"""Frames -> DeePMD npy / extxyz round trips and the entropy-ranked train/test split.

Frames are real labels: CHGNet single points on rattled, strained copies of MP structures.
"""

from __future__ import annotations

import numpy as np
import pytest

from cscflow.datasets import (
    flatten_frames,
    frames_to_deepmd,
    frames_to_extxyz,
    greedy_entropy_ranking,
    read_extxyz_frames,
    split_frames,
    stress_to_virial,
    virial_to_stress,
)

TYPE_MAP = ["Li", "P", "S"]
# Li2S, Li3P, P, S, Li3PS4
MP_IDS = ["mp-1153", "mp-736", "mp-157", "mp-7", "mp-985583"]


_CACHE: dict = {}


def _labelled_frames(structures_key: tuple, copies: int = 5, seed: int = 0):
    from ase.units import GPa
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    from cscflow.schemas import Frame, Provenance

    calc = CHGNetCalculator(CHGNet.load(verbose=False), use_device="cpu")
    rng = np.random.default_rng(seed)
    frames = []
    for mp_id, s0 in structures_key:
        for c in range(copies):
            strain = np.eye(3) + rng.normal(0, 0.02, (3, 3))
            strain = (strain + strain.T) / 2
            cart = s0.cart_coords @ strain + rng.normal(0, 0.1, (len(s0), 3))
            s = Structure(s0.lattice.matrix @ strain, s0.species, cart, coords_are_cartesian=True)
            atoms = AseAtomsAdaptor.get_atoms(s)
            atoms.calc = calc
            frames.append(
                Frame(
                    frame_id=f"{mp_id}-{c}",
                    structure=s,
                    energy=float(atoms.get_potential_energy()),
                    forces=atoms.get_forces().tolist(),
                    stress=(atoms.get_stress(voigt=False) / GPa).tolist(),
                    kind="perturbed",
                    labeller="teacher:chgnet-0.3.0 (stand-in for DFT)",
                    # iterations 0..4 so that the split has a later, test-only iteration
                    provenance=Provenance(candidate_id=mp_id, iteration=c, generator="seed"),
                )
            )
    return frames


def make_labelled_frames(lips_structures, copies: int = 5):
    """25 frames: 5 rattled copies of each of MP_IDS, labelled by CHGNet (cached)."""
    key = (tuple(MP_IDS), copies)
    if key not in _CACHE:
        _CACHE[key] = _labelled_frames(tuple((i, lips_structures[i]) for i in MP_IDS), copies)
    return _CACHE[key]


@pytest.fixture(scope="module")
def frames(lips_structures):
    return make_labelled_frames(lips_structures)


def test_virial_convention_matches_dpdata_ase_plugin(frames):
    """Our virial = -stress*V must equal what dpdata derives from an ASE stress."""
    import dpdata
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import GPa
    from pymatgen.io.ase import AseAtomsAdaptor

    frame = frames[-1]  # Li3PS4
    atoms = AseAtomsAdaptor.get_atoms(frame.structure)
    stress = np.asarray(frame.stress)
    atoms.calc = SinglePointCalculator(
        atoms, energy=frame.energy, forces=np.asarray(frame.forces), stress=stress * GPa
    )
    ref = dpdata.LabeledSystem(atoms, fmt="ase/structure")["virials"][0]
    ours = stress_to_virial(stress, frame.structure.volume)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(virial_to_stress(ours, frame.structure.volume), stress, atol=1e-10)
    # compressive stress (negative, ASE sign) -> positive virial diagonal
    assert np.sign(ours[0, 0]) == -np.sign(stress[0, 0])


def test_deepmd_round_trip(frames, tmp_path):
    import dpdata

    systems = frames_to_deepmd(frames, tmp_path, TYPE_MAP)
    assert len(systems) == len(MP_IDS)  # one system per composition
    n_seen = 0
    for system_dir in systems:
        assert (system_dir / "type_map.raw").read_text().split() == TYPE_MAP
        sys_ = dpdata.LabeledSystem(str(system_dir), fmt="deepmd/npy")
        assert sys_["atom_names"] == TYPE_MAP
        # find the frames of this composition in order of writing
        counts = dict(zip(sys_["atom_names"], sys_["atom_numbs"]))
        members = [
            f for f in frames
            if all(f.structure.composition[el] == counts[el] for el in TYPE_MAP)
        ]
        assert len(members) == len(sys_)
        for i, frame in enumerate(members):
            assert sys_["energies"][i] == pytest.approx(frame.energy, abs=1e-8)
            # dpdata sorts atoms by type; compare per-species sorted force rows
            order = np.argsort([TYPE_MAP.index(s.specie.symbol) for s in frame.structure], kind="stable")
            np.testing.assert_allclose(sys_["forces"][i], np.asarray(frame.forces)[order], atol=1e-8)
            virial = stress_to_virial(np.asarray(frame.stress), frame.structure.volume)
            np.testing.assert_allclose(sys_["virials"][i], virial, atol=1e-8)
            np.testing.assert_allclose(sys_["cells"][i], frame.structure.lattice.matrix, atol=1e-8)
            n_seen += 1
    assert n_seen == len(frames)


def test_deepmd_rejects_foreign_elements(frames, tmp_path):
    with pytest.raises(ValueError, match="not in the type map"):
        frames_to_deepmd(frames, tmp_path, ["Li", "S"])
    with pytest.raises(ValueError, match="no frames"):
        frames_to_deepmd([], tmp_path, TYPE_MAP)


def test_frames_without_stress_get_their_own_systems(frames, tmp_path):
    no_stress = [f.model_copy(update={"stress": None, "frame_id": f.frame_id + "-ns"}) for f in frames[:5]]
    systems = frames_to_deepmd(list(frames[:5]) + no_stress, tmp_path, TYPE_MAP)
    with_virial = [p for p in systems if (p / "set.000" / "virial.npy").exists()]
    assert len(systems) == 2 and len(with_virial) == 1


@pytest.mark.parametrize("prefix", ["", "REF_"])
def test_extxyz_round_trip(frames, tmp_path, prefix):
    path = frames_to_extxyz([frames[:10], frames[10:]], tmp_path / "train.xyz", key_prefix=prefix)
    back = read_extxyz_frames(path, key_prefix=prefix)
    assert [d["frame_id"] for d in back] == [f.frame_id for f in frames]
    for frame, d in zip(frames, back):
        assert d["energy"] == pytest.approx(frame.energy, abs=1e-6)
        np.testing.assert_allclose(d["forces"], frame.forces, atol=1e-6)
        np.testing.assert_allclose(d["stress"], frame.stress, atol=1e-5)
        assert d["atoms"].get_chemical_symbols() == [s.specie.symbol for s in frame.structure]
        np.testing.assert_allclose(d["atoms"].get_positions(), frame.structure.cart_coords, atol=1e-6)


def test_flatten_rejects_garbage():
    with pytest.raises(TypeError, match="expected Frame"):
        flatten_frames([1, 2])


def test_flatten_documents_keeps_order_across_nesting_and_store_forms():
    from monty.json import jsanitize
    from pymatgen.core import Lattice, Structure

    from cscflow.schemas import Candidate, Provenance, flatten_documents

    def cand(i):
        return Candidate(provenance=Provenance(candidate_id=f"c{i}", iteration=i, generator="seed"),
                         structure=Structure(Lattice.cubic(3.0 + i), ["Li"], [[0, 0, 0]]))

    stored = jsanitize(cand(1), strict=True)  # what a store gives back, Structure as its dict
    stored_unimportable = {**jsanitize(cand(2), strict=True), "@module": "gone.module", "@class": "Candidate"}
    flat = flatten_documents([cand(0), [stored, [stored_unimportable]], ()], Candidate)
    assert [c.id for c in flat] == ["c0", "c1", "c2"]
    assert all(isinstance(c.structure, Structure) for c in flat) and flat[2].structure.lattice.a == 5.0
    with pytest.raises(TypeError, match="expected Candidate"):
        flatten_documents([cand(0), "c1"], Candidate)


def _siblings(n_candidates=30, per_candidate=(2, 3), envs=4, seed=0):
    """Candidates far apart; each candidate's frames are near-identical copies of it."""
    rng = np.random.default_rng(seed)
    descriptors, owner = [], []
    for c in range(n_candidates):
        centre = rng.normal(0, 5, (envs, 4))
        for _ in range(per_candidate[c % len(per_candidate)]):
            descriptors.append(centre + rng.normal(0, 0.01, centre.shape))
            owner.append(c)
    return descriptors, owner


def test_greedy_ranking_never_takes_a_sibling_while_a_new_candidate_remains():
    descriptors, owner = _siblings()
    ranking = greedy_entropy_ranking(descriptors, 60, bandwidth=0.5, device="cpu")
    seen: set[int] = set()
    for n, i in enumerate(ranking.order):
        if owner[i] in seen:  # a second frame of a candidate ...
            assert len(seen) == len(set(owner)), f"pick {n} repeats a candidate while others remain"
        seen.add(owner[i])
    assert len(set(owner[i] for i in ranking.order[:30])) == 30
    # a sibling adds (almost) nothing: δH of the 31st pick is far below that of the 30th
    assert ranking.delta_entropy[30] < ranking.delta_entropy[29] - 1.0
    # H grows (dH/dN > 0) while new candidates come in, then siblings leave it ~flat
    h = ranking.entropy
    assert all(r > 0 for r in ranking.dh_dn()[1:30])
    assert abs(h[-1] - h[29]) < 0.1 * (h[29] - h[0])


def test_split_follows_iterations(frames):
    # pool: iterations 0-2 (15 frames), top 6 by δH train; the rest + iterations 3-4 test
    split = split_frames(frames, n_train=6, train_iterations_max=2, seed=1, device="cpu")
    assert len(split.train) == 6 and len(split.test) == len(frames) - 6
    assert all(f.provenance.iteration <= 2 for f in split.train)
    later = {f.frame_id for f in frames if f.provenance.iteration > 2}
    pool_unselected = {f.frame_id for f in frames if f.provenance.iteration <= 2} - set(split.train_ids)
    assert set(split.test_ids) == later | pool_unselected
    assert not set(split.train_ids) & set(split.test_ids)
    assert not split.random_holdout and split.n_pool == 15
    # entropy ranking spreads picks over compositions instead of five copies of one
    assert len({f.structure.composition.reduced_formula for f in split.train}) >= 4
    assert len(split.train_entropy) == 6 and split.train_entropy[-1] > split.train_entropy[0]
    again = split_frames(frames, n_train=6, train_iterations_max=2, seed=1, device="cpu")
    assert again.train_ids == split.train_ids
    # the last training iteration is a setting: with 0, iterations 1-4 are all test
    early = split_frames(frames, n_train=6, train_iterations_max=0, seed=1, device="cpu")
    assert {f.provenance.iteration for f in early.train} == {0} and len(early.train) == 5
    assert len(early.test) == 20 and not early.random_holdout


def test_previous_training_frames_stay_in_training(frames):
    pool_02 = [f for f in frames if f.provenance.iteration <= 2]
    first = split_frames(pool_02[:10], n_train=4, train_iterations_max=2, device="cpu")
    grown = split_frames(pool_02, n_train=6, train_iterations_max=2, device="cpu", previous_train_ids=first.train_ids)
    assert grown.train_ids[:4] == first.train_ids and len(grown.train) == 6
    assert not set(first.train_ids) & set(grown.test_ids)


def test_holdout_is_stable_as_the_pool_grows(frames):
    """When no later iteration exists yet, a seeded per-frame holdout: the same frames stay
    out as iterations are added, so RMSEs of successive iterations share their test frames."""
    kw = dict(n_train=1000, train_iterations_max=10, test_fraction=0.3, seed=3, device="cpu")
    small = split_frames([f for f in frames if f.provenance.iteration <= 2], **kw)
    big = split_frames(frames, **kw)
    assert small.random_holdout and big.random_holdout and small.test
    assert set(small.test_ids) == {i for i in big.test_ids if int(i.rsplit("-", 1)[1]) <= 2}
    assert len(big.train) + len(big.test) == len(frames)
    other = split_frames(frames, **{**kw, "seed": 4})
    assert other.test_ids != big.test_ids  # seeded, not fixed
    none = split_frames(frames, **{**kw, "test_fraction": 0.0})
    assert none.test == [] and len(none.train) == len(frames)


def test_split_errors(frames):
    with pytest.raises(ValueError, match="no frames from iterations"):
        split_frames([f for f in frames if f.provenance.iteration == 4], n_train=3, train_iterations_max=2)
    with pytest.raises(ValueError, match="duplicate frame ids"):
        split_frames([frames[0], frames[0]], n_train=1)
    with pytest.raises(ValueError, match="no labelled frames"):
        split_frames([], n_train=1)
