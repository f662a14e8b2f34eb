"""CrystalNN fingerprints (with/without oxidation states, Li removed), cache, joint t-SNE maps."""

from __future__ import annotations

import numpy as np
import pytest

from cscflow.analysis.fingerprints import (
    FingerprintCache,
    fingerprint_structures,
    guess_oxidation_states,
    structure_fingerprint,
    structure_key,
)
from cscflow.analysis.maps import FingerprintMapMaker, fingerprint_map, tsne_embedding
from cscflow.schemas import Candidate, Provenance

SMALL = ["mp-1153", "mp-557142", "mp-32641", "mp-1057216", "mp-130", "mp-7245", "mp-7"]


def _rattled(structure, rng, sigma=0.05):
    s = structure.copy()
    for i in range(len(s)):
        s.translate_sites([i], rng.normal(0, sigma, 3), frac_coords=False)
    return s


def test_oxidation_guess_and_fallback(lips_structures):
    assert guess_oxidation_states(lips_structures["mp-985583"]) == {"Li": 1.0, "P": 5.0, "S": -2.0}
    assert guess_oxidation_states(lips_structures["mp-157"]) is None  # element: no charges
    # 125-atom Li48P16S61 has no single-valence balance: answered at once, not enumerated
    assert guess_oxidation_states(lips_structures["mp-1001069"]) is None

    vec, used = structure_fingerprint(lips_structures["mp-1153"])
    assert used and vec.shape == (61,) and np.isfinite(vec).all()
    vec_p, used_p = structure_fingerprint(lips_structures["mp-130"])
    assert not used_p and np.isfinite(vec_p).all()


def test_li_removed_variant_differs(lips_structures):
    beta = lips_structures["mp-985583"]
    full, _ = structure_fingerprint(beta)
    frame, used = structure_fingerprint(beta, remove_li=True)
    assert used
    assert not np.allclose(full, frame)
    # the anion framework of β-Li3PS4 is isolated PS4: P sites are 4-coordinated tetrahedra
    from matminer.featurizers.site import CrystalNNFingerprint

    labels = CrystalNNFingerprint.from_preset("ops").feature_labels()
    assert frame[labels.index("tetrahedral CN_4")] > 0.1


def test_batch_cache_and_failures(lips_structures):
    structures = [lips_structures[m] for m in ("mp-1153", "mp-130")]
    disordered = lips_structures["mp-1153"].copy()
    disordered.replace(0, {"Li": 0.5, "Na": 0.5})
    only_li = lips_structures["mp-135"]
    cache = FingerprintCache()
    res = fingerprint_structures([*structures, disordered, only_li], ["a", "b", "c", "d"],
                                 remove_li=True, cache=cache)
    assert res.failed.tolist() == [False, False, True, True]
    assert np.isnan(res.features[2:]).all() and set(res.errors) == {"c", "d"}
    assert res.oxidation_states.tolist() == [True, False, False, False]
    assert set(cache) == {"a|noLi", "b|noLi"}
    # cached values are reused: a poisoned entry shows up in the result
    cache["a|noLi"] = (np.full(61, 7.0), True)
    again = fingerprint_structures(structures, ["a", "b"], remove_li=True, cache=cache)
    assert (again.features[0] == 7.0).all()
    restored = FingerprintCache.from_dict(cache.to_dict())
    assert np.allclose(restored["b|noLi"][0], cache["b|noLi"][0])
    # default keys are content hashes, stable for the same structure
    assert structure_key(structures[0]) == structure_key(structures[0].copy())
    assert structure_key(structures[0]) != structure_key(structures[1])


def test_tsne_and_maker(lips_structures, tmp_path):
    rng = np.random.default_rng(0)
    candidates = []
    for it in range(3):
        for j, mp in enumerate(SMALL):
            candidates.append(Candidate(
                provenance=Provenance(candidate_id=f"{it}-{j}", iteration=it, generator="seed"),
                structure=_rattled(lips_structures[mp], rng), status="relaxed",
            ))
    out = fingerprint_map(candidates, tmp_path, seed=1)
    assert len(out.embedding) == len(candidates) and not out.failed
    assert all((tmp_path / name).stat().st_size > 5000 for name in ("tsne.png", "tsne_overlap.png"))
    emb = np.array(out.embedding, dtype=float)
    assert np.isfinite(emb).all()
    # rattled copies of one structure sit closer together than different structures
    d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    same = [d[i, i + len(SMALL)] for i in range(len(SMALL))]
    assert np.median(same) < np.median(d[np.triu_indices(len(d), 1)])
    # seeded: same input, same map
    again = tsne_embedding(np.vstack([np.arange(61) * 0.01 + k for k in range(5)]), seed=3)
    assert np.allclose(again, tsne_embedding(np.vstack([np.arange(61) * 0.01 + k for k in range(5)]), seed=3))
    with pytest.raises(ValueError, match="at least 3"):
        tsne_embedding(np.ones((2, 61)))

    from jobflow import run_locally

    job = FingerprintMapMaker(seed=1).make(candidates[:7], str(tmp_path / "maker"))
    res = run_locally(job, ensure_success=True)[job.uuid][1].output
    assert len(res.ids) == 7 and len(res.figures) == 2
