"""Joint t-SNE maps of structure fingerprints over all iterations (paper Fig. 4a, Supp. Fig. 2).

All iterations are embedded together (one t-SNE), so positions are comparable between
iterations; the overlap plots show iteration k against k+1 on that shared map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel, Field

from cscflow.analysis.plotting import pyplot, save_figure

__all__ = [
    "FingerprintMapMaker",
    "FingerprintMapOutput",
    "fingerprint_map",
    "plot_consecutive_overlap",
    "plot_tsne",
    "tsne_embedding",
]


def tsne_embedding(features: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the rows of `features`; NaN rows (failed fingerprints) stay NaN.

    Perplexity is capped at (n-1)/3 so small runs still embed.
    """
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array, got shape {x.shape}")
    ok = ~np.isnan(x).any(axis=1)
    out = np.full((len(x), 2), np.nan)
    n = int(ok.sum())
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 fingerprinted structures, got {n}")
    perp = float(min(perplexity, max(1.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed)
    out[ok] = tsne.fit_transform(x[ok])
    return out


def plot_tsne(embedding: np.ndarray, iterations: Sequence[int], path: str | Path, title: str | None = None) -> Path:
    """All structures on the joint map, coloured by iteration."""
    plt = pyplot()
    emb = np.asarray(embedding)
    its = np.asarray(iterations)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("viridis")
    uniq = sorted(set(its.tolist()))
    for k, it in enumerate(uniq):
        sel = its == it
        ax.scatter(*emb[sel].T, s=12, alpha=0.7, color=cmap(k / max(1, len(uniq) - 1)), label=f"iteration {it}")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title or "CrystalNN fingerprints, joint t-SNE")
    ax.legend(fontsize=8, markerscale=1.5)
    return save_figure(fig, path, dpi=120)


def plot_consecutive_overlap(embedding: np.ndarray, iterations: Sequence[int], path: str | Path) -> Path:
    """One panel per consecutive pair (k, k+1) on the shared map; the rest in grey."""
    plt = pyplot()
    emb = np.asarray(embedding)
    its = np.asarray(iterations)
    uniq = sorted(set(its.tolist()))
    pairs = list(zip(uniq[:-1], uniq[1:])) or [(uniq[0], None)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4.2), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        ax.scatter(*emb.T, s=6, color="0.85")
        ax.scatter(*emb[its == a].T, s=12, alpha=0.8, color="tab:blue", label=f"iteration {a}")
        if b is not None:
            ax.scatter(*emb[its == b].T, s=12, alpha=0.8, color="tab:orange", label=f"iteration {b}")
        ax.set_title(f"{a} vs {b}" if b is not None else f"iteration {a}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


class FingerprintMapOutput(BaseModel):
    """Joint embedding of all candidates: one row per candidate id."""

    ids: list[str] = Field(default_factory=list)
    iterations: list[int] = Field(default_factory=list)
    embedding: list[list[float | None]] = Field(default_factory=list)
    oxidation_states: list[bool] = Field(default_factory=list, description="False: fingerprint without charges")
    failed: dict[str, str] = Field(default_factory=dict, description="id -> why it has no fingerprint")
    figures: list[str] = Field(default_factory=list)


@dataclass
class FingerprintMapMaker(Maker):
    """Fingerprint every candidate of every iteration, embed jointly, plot overlap."""

    name: str = "fingerprint map"
    remove_li: bool = False
    perplexity: float = 30.0
    seed: int = 0

    @job
    def make(self, candidates: list, out_dir: str, cache: dict | None = None) -> FingerprintMapOutput:
        return fingerprint_map(candidates, out_dir, self.remove_li, self.perplexity, self.seed, cache)


def fingerprint_map(candidates, out_dir, remove_li=False, perplexity=30.0, seed=0, cache=None) -> FingerprintMapOutput:
    """Plain-function form of FingerprintMapMaker (Candidates, or lists of them per iteration)."""
    from cscflow.analysis.fingerprints import FingerprintCache, fingerprint_structures

    flat = []
    for item in candidates:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    flat = [c for c in flat if getattr(c, "status", None) != "rejected"]
    ids = [c.provenance.candidate_id for c in flat]
    its = [c.provenance.iteration for c in flat]
    store = cache if isinstance(cache, FingerprintCache) else FingerprintCache.from_dict(cache or {})
    result = fingerprint_structures([c.structure for c in flat], ids, remove_li=remove_li, cache=store)
    emb = tsne_embedding(result.features, perplexity=perplexity, seed=seed)
    out = Path(out_dir)
    tag = "_noLi" if remove_li else ""
    figures = [
        str(plot_tsne(emb, its, out / f"tsne{tag}.png")),
        str(plot_consecutive_overlap(emb, its, out / f"tsne_overlap{tag}.png")),
    ]
    return FingerprintMapOutput(
        ids=ids,
        iterations=its,
        embedding=[[None if np.isnan(v) else float(v) for v in row] for row in emb],
        oxidation_states=result.oxidation_states.tolist(),
        failed=result.errors,
        figures=figures,
    )
