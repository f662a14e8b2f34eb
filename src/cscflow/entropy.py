"""Information entropy of local atomic environments (QUESTS), paper Methods 4.3 eqs. (1)-(2).

Descriptors are QUESTS' 63-dimensional species-agnostic environment vectors (k nearest
neighbours within `cutoff`). Every number here comes from QUESTS' own kernels:

- H (eq. 1) = ``quests.entropy.entropy`` (``quests.gpu.entropy.entropy`` on a GPU);
- δH(y|X) = -log Σ_i K_h(y, X_i) (eq. 2), one value per environment y =
  ``quests.entropy.delta_entropy`` (GPU: ``quests.gpu.entropy.delta_entropy``);
- incremental sums (greedy ranking, H along a ranking) add ``kernel_sum`` blocks of the
  newly added environments, so they equal the one-shot functions to rounding.

Frame score: the mean of its environments' δH against the set chosen so far, each δH capped
at -log(float64 tiny) ≈ 708 where the kernel sum underflows (an environment far from all of X).

Scale (issue 13): everything is exact over *all* environments. Kernel sums run in blocks of
`batch_size` rows (QUESTS' default 20000 makes 20000² blocks of gigabytes), numba-parallel on
CPU and on CUDA via ``quests.gpu`` when ``torch.cuda.is_available()`` (device="auto"). H is
quadratic in the number of environments; for sets too big for exact H on CPU,
:func:`entropy_estimate` gives a Monte-Carlo estimate whose standard error it returns
(benchmarks/entropy_scale.py measures it against the exact value). Descriptors are computed
once per frame: :class:`DescriptorCache` keys them by frame/candidate id (see docs/design.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_BATCH_SIZE",
    "DH_CAP",
    "DescriptorCache",
    "EntropyRanking",
    "delta_entropy",
    "dh_dn",
    "entropy",
    "entropy_along",
    "entropy_estimate",
    "environment_descriptors",
    "frame_scores",
    "greedy_entropy_ranking",
    "kernel_sums",
    "resolve_device",
    "stack_descriptors",
    "structure_descriptors",
]

logger = logging.getLogger(__name__)

DEFAULT_BANDWIDTH = 0.015  # QUESTS' default h (the paper: "default value used")
DEFAULT_BATCH_SIZE = 2000
DH_CAP = float(-np.log(np.finfo(np.float64).tiny))  # δH where Σ K underflows to 0


def _dim(k: int) -> int:
    """QUESTS descriptor length: k distances + (k - 1) neighbour-pair terms (63 for k=32)."""
    return 2 * k - 1


# --------------------------------------------------------------------------- descriptors
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


@dataclass
class DescriptorCache:
    """Descriptors computed once per structure id (frame_id / candidate_id) and (k, cutoff).

    A stage passes one cache to every entropy call so nothing is recomputed; `save`/`load`
    keep them in one .npz next to the stage's outputs for later stages of the run.
    """

    k: int = 32
    cutoff: float = 5.0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    computed: int = 0

    def get(self, key: str, structure: Structure) -> np.ndarray:
        x = self.arrays.get(key)
        if x is None:
            x = environment_descriptors(structure, self.k, self.cutoff)
            self.arrays[key] = x
            self.computed += 1
        return x

    def many(self, keys: Sequence[str], structures: Sequence[Structure]) -> list[np.ndarray]:
        return [self.get(key, s) for key, s in zip(keys, structures)]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez_compressed(path, __meta__=np.array([self.k, self.cutoff]), **self.arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DescriptorCache:
        with np.load(Path(path)) as data:
            k, cutoff = data["__meta__"]
            arrays = {key: data[key] for key in data.files if key != "__meta__"}
        return cls(k=int(k), cutoff=float(cutoff), arrays=arrays)


def structure_descriptors(
    structures: Sequence[Structure],
    k: int = 32,
    cutoff: float = 5.0,
    keys: Sequence[str] | None = None,
    cache: DescriptorCache | None = None,
) -> list[np.ndarray]:
    """One descriptor matrix per structure; with `cache` and `keys`, each computed once."""
    if cache is not None and keys is not None:
        if (cache.k, cache.cutoff) != (k, cutoff):
            raise ValueError(f"descriptor cache is for k={cache.k}, cutoff={cache.cutoff}; asked k={k}, cutoff={cutoff}")
        return cache.many(keys, structures)
    return [environment_descriptors(s, k=k, cutoff=cutoff) for s in structures]


def stack_descriptors(descriptors: Sequence[np.ndarray], k: int = 32) -> np.ndarray:
    """Concatenate per-structure matrices; an empty list gives a (0, 2k-1) array."""
    blocks = [np.asarray(d, dtype=np.float64) for d in descriptors if len(d)]
    if not blocks:
        return np.zeros((0, _dim(k)))
    return np.ascontiguousarray(np.concatenate(blocks))


def _check_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_environments, d) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf descriptors")
    return np.ascontiguousarray(x)


def _check_bandwidth(h: float) -> None:
    if not h > 0:
        raise ValueError(f"bandwidth must be > 0, got {h}")


# --------------------------------------------------------------------------- kernels
def resolve_device(device: str | None = "auto") -> str:
    """'cuda' when asked for or ('auto') when torch sees a GPU, else 'cpu' (numba).

    'torch-cpu' runs QUESTS' torch (GPU) kernels on the CPU: a check of that path without a GPU.
    """
    if device in (None, "auto"):
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover - torch is a core dependency
            return "cpu"
    if device not in ("cpu", "cuda", "torch-cpu") and not str(device).startswith("cuda:"):
        raise ValueError(f"entropy device must be 'auto', 'cpu', 'cuda' or 'torch-cpu', got {device!r}")
    return device


def _torch_device(device: str) -> str | None:
    """The torch device of QUESTS' GPU kernels, None for the numba CPU kernels."""
    return None if device == "cpu" else "cpu" if device == "torch-cpu" else device


class _Kernels:
    """QUESTS kernel sums on one device; keeps arrays resident there (torch on CUDA)."""

    def __init__(self, bandwidth: float, batch_size: int, device: str | None):
        _check_bandwidth(bandwidth)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.h, self.batch_size = bandwidth, int(batch_size)
        self.device = _torch_device(resolve_device(device))

    @property
    def gpu(self) -> bool:
        return self.device is not None

    def put(self, x: np.ndarray):
        if not self.gpu:
            return np.ascontiguousarray(x, dtype=np.float64)
        import torch

        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64), device=self.device)

    def sums(self, y, x) -> np.ndarray:
        """Σ_i K_h(y_j, x_i) for every row y_j (zeros when x is empty)."""
        if len(y) == 0:
            return np.zeros(0)
        if len(x) == 0:
            return np.zeros(len(y))
        if self.gpu:
            from quests.gpu.entropy import kernel_sum

            return kernel_sum(y, x, h=self.h, batch_size=self.batch_size, device=self.device).numpy()
        from quests.entropy import kernel_sum

        return kernel_sum(y, x, h=self.h, batch_size=self.batch_size)


def kernel_sums(
    y: np.ndarray,
    x: np.ndarray,
    bandwidth: float = DEFAULT_BANDWIDTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = "auto",
) -> np.ndarray:
    """Σ_i K_h(y_j, x_i) for each row of y (QUESTS ``kernel_sum``, CPU or GPU)."""
    kern = _Kernels(bandwidth, batch_size, device)
    y, x = _check_matrix(y, "y"), _check_matrix(x, "x")
    return kern.sums(kern.put(y), kern.put(x))


def entropy(
    x: np.ndarray,
    bandwidth: float = DEFAULT_BANDWIDTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = "auto",
) -> float:
    """H of a set of environments (eq. 1), exact over all rows, in nats; 0.0 when empty.

    ``quests.entropy.entropy`` on CPU, ``quests.gpu.entropy.entropy`` on CUDA.
    """
    _check_bandwidth(bandwidth)
    x = _check_matrix(x, "x")
    if len(x) == 0:
        return 0.0
    kern = _Kernels(bandwidth, batch_size, device)
    if kern.gpu:
        from quests.gpu.entropy import entropy as gpu_entropy

        return float(gpu_entropy(kern.put(x), h=bandwidth, batch_size=batch_size, device=kern.device))
    from quests.entropy import entropy as quests_entropy

    return float(quests_entropy(x, h=bandwidth, batch_size=batch_size))


def entropy_estimate(
    x: np.ndarray,
    n_queries: int,
    bandwidth: float = DEFAULT_BANDWIDTH,
    seed: int | Sequence[int] = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = "auto",
) -> tuple[float, float]:
    """Monte-Carlo H: (estimate, standard error), for sets too big for exact H.

    Eq. (1) is a mean over environments of -log(p_i / n) with p_i = Σ_j K_h(x_i, x_j) over
    *all* n environments. We evaluate that term exactly for `n_queries` environments drawn
    without replacement (seeded) and average: unbiased for H, cost n_queries·n instead of n²,
    standard error std(terms)/sqrt(n_queries)·sqrt(1 - m/n). Exact (stderr 0) when
    n_queries >= n. (The old cap subsampled *both* sides, which bounds H by log(cap).)
    """
    x = _check_matrix(x, "x")
    n = len(x)
    if n == 0:
        return 0.0, 0.0
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    if n_queries >= n:
        return entropy(x, bandwidth, batch_size, device), 0.0
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=n_queries, replace=False))
    kern = _Kernels(bandwidth, batch_size, device)
    terms = np.log(n) - np.log(kern.sums(kern.put(x[rows]), kern.put(x)))
    stderr = float(terms.std(ddof=1) / np.sqrt(n_queries) * np.sqrt(1 - n_queries / n)) if n_queries > 1 else float("nan")
    return float(terms.mean()), stderr


def delta_entropy(
    y: np.ndarray,
    x: np.ndarray,
    bandwidth: float = DEFAULT_BANDWIDTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = "auto",
) -> np.ndarray:
    """δH(y | X) = -log Σ_i K_h(y, X_i) for every row y (eq. 2); +inf where X is empty or far.

    ``quests.entropy.delta_entropy`` on CPU, ``quests.gpu.entropy.delta_entropy`` on CUDA.
    """
    _check_bandwidth(bandwidth)
    y, x = _check_matrix(y, "y"), _check_matrix(x, "x")
    if len(y) and len(x) and y.shape[1] != x.shape[1]:
        raise ValueError(f"descriptor length mismatch: y has {y.shape[1]}, x has {x.shape[1]} (same k for both)")
    if len(y) == 0:
        return np.zeros(0)
    if len(x) == 0:
        return np.full(len(y), np.inf)
    kern = _Kernels(bandwidth, batch_size, device)
    with np.errstate(divide="ignore"):
        if kern.gpu:
            from quests.gpu.entropy import delta_entropy as gpu_delta

            return gpu_delta(kern.put(y), kern.put(x), h=bandwidth, batch_size=batch_size, device=kern.device).numpy()
        from quests.entropy import delta_entropy as quests_delta

        return np.asarray(quests_delta(y, x, h=bandwidth, batch_size=batch_size))


def frame_scores(dh: np.ndarray, owner: np.ndarray, n_frames: int) -> np.ndarray:
    """A frame's score: mean over its environments of min(δH, DH_CAP)."""
    sizes = np.bincount(owner, minlength=n_frames)
    capped = np.minimum(np.asarray(dh, dtype=float), DH_CAP)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(owner, weights=capped, minlength=n_frames) / sizes


# --------------------------------------------------------------------------- rankings
@dataclass
class EntropyRanking:
    """A greedy δH ranking: frame order, each frame's δH score when picked, and H of the
    chosen set (eq. 1, all its environments) after each pick."""

    order: list[int]
    delta_entropy: list[float]
    entropy: list[float]
    n_environments: list[int]

    def dh_dn(self, window: int = 1) -> list[float | None]:
        return dh_dn(self.entropy, window)


def dh_dn(entropies: Sequence[float], window: int = 1) -> list[float | None]:
    """dH/dN after each added frame: (H_N - H_{N-w}) / w, w = min(window, N-1); None at N=1."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out: list[float | None] = [None] * len(entropies)
    for n in range(1, len(entropies)):
        w = min(window, n)
        out[n] = (entropies[n] - entropies[n - w]) / w
    return out


class _Accumulator:
    """Kernel sums of every pool environment against the environments chosen so far."""

    def __init__(self, descriptors: Sequence[np.ndarray], kern: _Kernels, reference: np.ndarray | None):
        sizes = np.array([len(x) for x in descriptors], dtype=int)
        if np.any(sizes == 0):
            raise ValueError("a frame has no environments (empty descriptor array)")
        dims = {np.asarray(x).shape[1] for x in descriptors}
        if len(dims) != 1:
            raise ValueError(f"descriptor lengths differ between frames: {sorted(dims)}")
        self.kern, self.sizes = kern, sizes
        self.n = len(descriptors)
        self.owner = np.repeat(np.arange(self.n), sizes)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        pool = _check_matrix(np.concatenate(descriptors, axis=0), "descriptors")
        self.pool = kern.put(pool)
        self.ksel = np.zeros(len(pool))  # Σ K against chosen environments
        self.kref = np.zeros(len(pool))  # Σ K against the fixed reference
        if reference is not None and len(reference):
            reference = _check_matrix(reference, "reference")
            if reference.shape[1] != pool.shape[1]:
                raise ValueError(f"descriptor length mismatch: reference {reference.shape[1]}, frames {pool.shape[1]}")
            self.kref = kern.sums(self.pool, kern.put(reference))
        self.chosen_envs = np.zeros(len(pool), dtype=bool)

    def envs(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.starts[i + 1]))

    def add(self, i: int) -> None:
        self.ksel += self.kern.sums(self.pool, self.pool[self.envs(i)])
        self.chosen_envs[self.envs(i)] = True

    def scores(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            dh = -np.log(self.ksel + self.kref)
        return frame_scores(dh, self.owner, self.n)

    def chosen_entropy(self) -> float:
        """H of the chosen environments: each one's Σ K over the chosen set is in ksel."""
        p = self.ksel[self.chosen_envs]
        return float(np.log(len(p)) - np.mean(np.log(p)))


def greedy_entropy_ranking(
    descriptors: Sequence[np.ndarray],
    n_select: int | None = None,
    bandwidth: float = DEFAULT_BANDWIDTH,
    reference: np.ndarray | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = "auto",
    start: Sequence[int] = (),
) -> EntropyRanking:
    """Training set built one frame at a time by largest δH against the set chosen so far.

    Each step scores every remaining frame by :func:`frame_scores` of δH(y | reference ∪
    chosen) and takes the best, then adds its environments' kernel blocks to the running sums
    (cost: pool environments × the new frame's environments per pick; memory O(pool)).
    Ties (e.g. the first pick, when every δH is the cap) go to the frame with the highest
    own H (QUESTS' msc starts the same way), then the lower index. `n_select` None: all.
    `start`: frames taken first, in that order (e.g. last iteration's training set, so a
    fine-tuned model's training frames stay training frames); greedy continues from them.
    Not ``quests.compression.msc``: it scores a frame by its single most novel environment plus
    its own H (not the mean δH of Methods 4.3), takes no reference set or start, and runs on CPU only.
    """
    n_pool = len(descriptors)
    n_select = n_pool if n_select is None else min(int(n_select), n_pool)
    ranking = EntropyRanking([], [], [], [])
    if n_select <= 0 or n_pool == 0:
        return ranking
    kern = _Kernels(bandwidth, batch_size, device)
    acc = _Accumulator(descriptors, kern, reference)
    own_h = np.array([entropy(np.asarray(x), bandwidth, batch_size, "cpu") for x in descriptors])
    remaining = np.ones(n_pool, dtype=bool)
    forced = list(dict.fromkeys(int(i) for i in start))
    if any(not 0 <= i < n_pool for i in forced):
        raise ValueError(f"start indices must be in 0..{n_pool - 1}")
    for n in range(n_select):
        score = acc.scores()
        score[~remaining] = -np.inf
        best = np.flatnonzero(score == score.max())
        i = int(best[np.argmax(own_h[best])]) if len(best) > 1 else int(best[0])
        if n < len(forced):
            i = forced[n]
        ranking.order.append(i)
        ranking.delta_entropy.append(float(score[i]))
        remaining[i] = False
        acc.add(i)
        ranking.entropy.append(acc.chosen_entropy())
        ranking.n_environments.append(int(acc.chosen_envs.sum()))
    return ranking


def entropy_along(
    descriptors: Sequence[np.ndarray],
    bandwidth: float = DEFAULT_BANDWIDTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = "auto",
) -> list[float]:
    """H (eq. 1) of the first N frames, for N = 1..len, in the given order (incremental,
    exact: the same numbers as QUESTS' ``compression.metrics.sequential_metrics``, which recomputes
    every prefix from scratch on CPU; this one adds the new frame's kernel blocks, GPU too)."""
    if not len(descriptors):
        return []
    acc = _Accumulator(descriptors, _Kernels(bandwidth, batch_size, device), None)
    out = []
    for i in range(len(descriptors)):
        acc.add(i)
        out.append(acc.chosen_entropy())
    return out
