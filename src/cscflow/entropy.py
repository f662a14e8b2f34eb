"""Information entropy of local atomic environments (QUESTS), paper Methods eqs. (1)-(2).

Descriptors are QUESTS' 63-dimensional species-agnostic environment vectors (k nearest
neighbours within `cutoff`). H (eq. 1) is a Gaussian kernel-density entropy; the kernel sums
come from ``quests.entropy.kernel_sum`` (numba, batched).

Per-structure score. Eq. (2) gives δH of one *environment*; selection ranks *structures*
(the quota counts structures to label). We score a structure by the entropy the reference
set gains when all its environments are added at once:

    ΔH_s = H(X ∪ Y_s) - H(X)

It is exact (no approximation beyond the kernel), finite (H ≤ log of the set size, whereas
the per-environment -log Σ K is +inf for an environment far from everything in X),
accounts for redundancy *inside* the structure (16 copies of one new motif count less than
16 different new motifs), and is the quantity the loop wants to grow. With no reference it
reduces to the structure's self-entropy H(Y_s). Its cost is the same as eq. (2) for all the
structure's atoms: kernel sums of Y_s against X (plus one X-vs-X pass, shared by all s).

Scale: H is quadratic in the number of environments. Sets larger than `max_environments`
are subsampled uniformly with a seeded numpy Generator, and kernel sums run in blocks of
`batch_size` (much lower than QUESTS' default 20000, whose blocks take gigabytes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pymatgen.core import Structure

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_ENVIRONMENTS",
    "dataset_entropy",
    "environment_descriptors",
    "stack_descriptors",
    "structure_descriptors",
    "structure_entropy_gain",
    "subsample",
]

logger = logging.getLogger(__name__)

DEFAULT_BANDWIDTH = 0.015
DEFAULT_BATCH_SIZE = 2000
# ~14 s for H on 2 cores; 50k took 71 s and 8.9 GB in the field notes.
DEFAULT_MAX_ENVIRONMENTS = 20000
def _dim(k: int) -> int:
    """QUESTS descriptor length: k distances + (k - 1) neighbour-pair terms (63 for k=32)."""
    return 2 * k - 1


def environment_descriptors(structure: Structure, k: int = 32, cutoff: float = 5.0) -> np.ndarray:
    """QUESTS descriptors of every atom of one periodic structure: (n_atoms, 2k-1)."""
    from pymatgen.io.ase import AseAtomsAdaptor
    from quests.descriptor import get_descriptors

    if not isinstance(structure, Structure):
        raise TypeError(f"expected a pymatgen Structure, got {type(structure).__name__}")
    if k < 1 or cutoff <= 0:
        raise ValueError(f"need k >= 1 and cutoff > 0 (got k={k}, cutoff={cutoff})")
    if len(structure) == 0:
        return np.zeros((0, _dim(k)))
    atoms = AseAtomsAdaptor.get_atoms(structure)
    return np.ascontiguousarray(get_descriptors([atoms], k=k, cutoff=cutoff), dtype=np.float64)


def structure_descriptors(
    structures: Sequence[Structure], k: int = 32, cutoff: float = 5.0
) -> list[np.ndarray]:
    """One descriptor matrix per structure (kept apart so scores can be per structure)."""
    return [environment_descriptors(s, k=k, cutoff=cutoff) for s in structures]


def stack_descriptors(descriptors: Sequence[np.ndarray], k: int = 32) -> np.ndarray:
    """Concatenate per-structure matrices; an empty list gives a (0, 2k-1) array."""
    blocks = [np.asarray(d, dtype=np.float64) for d in descriptors if len(d)]
    if not blocks:
        return np.zeros((0, _dim(k)))
    return np.ascontiguousarray(np.concatenate(blocks))


def subsample(
    x: np.ndarray, max_environments: int | None, seed: int | Sequence[int] = 0
) -> np.ndarray:
    """At most `max_environments` rows of x, drawn without replacement (deterministic)."""
    x = np.asarray(x, dtype=np.float64)
    if max_environments is None or len(x) <= max_environments:
        return np.ascontiguousarray(x)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x), size=max_environments, replace=False))
    logger.info("entropy: subsampled %d of %d environments", max_environments, len(x))
    return np.ascontiguousarray(x[idx])


def _check_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_environments, d) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf descriptors")
    return np.ascontiguousarray(x)


def _kernel_sum(x: np.ndarray, y: np.ndarray, bandwidth: float, batch_size: int) -> np.ndarray:
    """Σ_j K_h(x_i, y_j) for every row of x (zeros when y is empty)."""
    from quests.entropy import kernel_sum

    if len(x) == 0:
        return np.zeros(0)
    if len(y) == 0:
        return np.zeros(len(x))
    return kernel_sum(x, y, h=bandwidth, batch_size=batch_size)


def dataset_entropy(
    x: np.ndarray,
    bandwidth: float = DEFAULT_BANDWIDTH,
    max_environments: int | None = DEFAULT_MAX_ENVIRONMENTS,
    seed: int | Sequence[int] = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """H of a set of environments (eq. 1), in nats; 0.0 for an empty set (no information)."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    x = _check_matrix(x, "x")
    if len(x) == 0:
        return 0.0
    x = subsample(x, max_environments, seed)
    p = _kernel_sum(x, x, bandwidth, batch_size)
    return float(np.log(len(x)) - np.mean(np.log(p)))


def structure_entropy_gain(
    candidates: Sequence[np.ndarray],
    reference: np.ndarray | None,
    bandwidth: float = DEFAULT_BANDWIDTH,
    max_environments: int | None = DEFAULT_MAX_ENVIRONMENTS,
    seed: int | Sequence[int] = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """ΔH_s = H(X ∪ Y_s) - H(X) for each structure's descriptors Y_s (see module docstring).

    `reference` None or empty: the self-entropy H(Y_s). A structure without atoms scores 0.
    The reference is subsampled to `max_environments` (seeded) before use.
    """
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    ys = [_check_matrix(y, f"candidates[{i}]") for i, y in enumerate(candidates)]
    out = np.zeros(len(ys))
    if not ys:
        return out
    x = None if reference is None else _check_matrix(reference, "reference")
    if x is not None and len(x):
        x = subsample(x, max_environments, seed)
        dims = {y.shape[1] for y in ys if len(y)}
        if dims and dims != {x.shape[1]}:
            raise ValueError(
                f"descriptor length mismatch: reference has {x.shape[1]}, candidates {sorted(dims)}"
                " (compute both with the same k)"
            )
        n = len(x)
        log_p = np.log(_kernel_sum(x, x, bandwidth, batch_size))
        h_x = np.log(n) - log_p.mean()
        for i, y in enumerate(ys):
            if len(y) == 0:
                continue
            m = len(y)
            q = _kernel_sum(x, y, bandwidth, batch_size)  # Y's mass on each x
            r = _kernel_sum(y, x, bandwidth, batch_size) + _kernel_sum(y, y, bandwidth, batch_size)
            s_log = np.log(np.exp(log_p) + q).sum() + np.log(r).sum()
            out[i] = np.log(n + m) - s_log / (n + m) - h_x
    else:
        for i, y in enumerate(ys):
            if len(y):
                p = _kernel_sum(y, y, bandwidth, batch_size)
                out[i] = np.log(len(y)) - np.mean(np.log(p))
    return out
