"""Figures of the run report (paper Figs. 2a, 2d, 2e, 3a–c), drawn with matplotlib (Agg).

A figure named after the paper shows the paper's quantity, or its docstring and title say
how it differs (per condition, per iteration, frames instead of DFT runs).

Each function takes plain numbers (no store access) and writes one PNG, so it can be
tested on its own and reused from a notebook. Empty input raises ValueError: the report
turns that into a "missing" note instead of drawing an empty axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cscflow.analysis.plotting import pyplot as _pyplot, save_figure as _save

__all__ = [
    "plot_dh_dn_vs_ntrain",
    "plot_entropy_and_frames",
    "plot_ehull_density",
    "plot_parity",
    "plot_rmse_vs_ntrain",
    "plot_sun_ratios",
]


def _density(ax, values: np.ndarray, grid: np.ndarray, label: str, color) -> None:
    """Gaussian KDE of the values inside the grid, weighted by their share of all values
    (far outliers would otherwise flatten it); a rug of ticks when too few spread out."""
    from scipy.stats import gaussian_kde

    inside = values[(values >= grid[0]) & (values <= grid[-1])]
    text = f"{label} (n={len(values)}" + (f", {len(values) - len(inside)} off axis)" if len(inside) < len(values) else ")")
    if len(inside) >= 3 and np.ptp(inside) > 1e-6:
        try:
            ax.plot(grid, gaussian_kde(inside)(grid) * len(inside) / len(values), color=color, label=text)
            ax.plot(inside, np.zeros_like(inside), "|", color=color, ms=8)
            return
        except np.linalg.LinAlgError:  # degenerate spread: fall through to the rug
            pass
    ax.plot(inside, np.zeros_like(inside), "|", color=color, ms=14, mew=2, label=text)


def plot_ehull_density(
    e_hull: Mapping[int, Mapping[str, Sequence[float]]], path: str | Path, x_max: float | None = 0.5
) -> Path:
    """E_hull density per generator condition, one panel per iteration (Fig. 2a per condition).

    `e_hull` maps iteration -> condition label -> E_hull values (eV/atom). Values beyond
    `x_max` are counted in the legend but the axis is cut there, as in the paper. The
    condition is MatterGen's E_hull target; for pyxtal or prototypes it is only a label.
    """
    iterations = sorted(k for k, by_cond in e_hull.items() if any(len(v) for v in by_cond.values()))
    if not iterations:
        raise ValueError("no E_hull values to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(iterations), figsize=(4.2 * len(iterations), 3.4), squeeze=False, sharey=False)
    all_values = np.concatenate([np.asarray(v, float) for k in iterations for v in e_hull[k].values() if len(v)])
    lo = min(0.0, float(np.nanmin(all_values)))
    hi = float(np.nanmax(all_values)) if x_max is None else x_max
    hi = max(hi, lo + 0.05)
    grid = np.linspace(lo, hi, 300)
    conditions = sorted({c for k in iterations for c in e_hull[k]})
    cmap = plt.get_cmap("tab10")
    for ax, k in zip(axes[0], iterations):
        for j, cond in enumerate(conditions):
            values = np.asarray(e_hull[k].get(cond, []), float)
            values = values[np.isfinite(values)]
            if len(values):
                _density(ax, values, grid, f"condition {cond}", cmap(j % 10))
        ax.set_xlim(lo, hi)
        ax.set_xlabel("E_hull (eV/atom)")
        ax.set_ylabel("density")
        ax.set_title(f"iteration {k}: E_hull density per condition")
        ax.legend(fontsize=7)
    return _save(fig, path)


_RATIOS = (("stable_ratio", "stable"), ("unique_ratio", "unique"), ("novel_ratio", "novel"), ("sun_ratio", "S.U.N."))


def plot_sun_ratios(rows: Sequence[Mapping[str, float | None]], path: str | Path) -> Path:
    """Stable / unique / novel / S.U.N. fractions of generated structures vs iteration (Fig. 2d).

    `rows`: one mapping per iteration with 'iteration' and the *_ratio keys of IterationDocument.
    """
    rows = [r for r in rows if any(r.get(key) is not None for key, _ in _RATIOS)]
    if not rows:
        raise ValueError("no iteration has S.U.N. ratios")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    its = [r["iteration"] for r in rows]
    for key, label in _RATIOS:
        y = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.plot(its, y, "o-", label=label, lw=2.2 if key == "sun_ratio" else 1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction of generated structures")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xticks(its)
    ax.legend(fontsize=8)
    ax.set_title("S.U.N. ratios")
    return _save(fig, path)


def plot_entropy_and_frames(rows: Sequence[Mapping[str, float | None]], path: str | Path) -> Path:
    """Fig. 2e-like: QUESTS H (eq. 1, all environments) of each iteration's relaxed candidates
    (the paper's red dots: entropy of generated local features) and of the training set (the
    top N_train frames by δH), with cumulative *labelled frames* as bars; the paper's cyan
    triangles count DFT calculations, of which one protocol yields several frames."""
    rows = [r for r in rows if r.get("entropy_training") is not None or r.get("n_train_total")]
    if not rows:
        raise ValueError("no iteration has entropies or labelled frames")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    its = [r["iteration"] for r in rows]
    for key, label, style in (("entropy_candidates", "H (iteration's candidates)", "o-"),
                              ("entropy_training", "H (training set, top N_train by δH)", "s--")):
        y = [np.nan if r.get(key) is None else r[key] for r in rows]
        if not np.all(np.isnan(y)):
            ax.plot(its, y, style, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("entropy H (nats)")
    ax.set_xticks(its)
    twin = ax.twinx()
    twin.bar(its, [r.get("n_train_total") or 0 for r in rows], alpha=0.25, color="tab:green",
             label="labelled frames (not DFT runs)")
    twin.set_ylabel("labelled frames (cumulative)")
    lines, labels = ax.get_legend_handles_labels()
    bars, blabels = twin.get_legend_handles_labels()
    ax.legend(lines + bars, labels + blabels, fontsize=8, loc="upper left")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_title("entropy and labelled frames vs iteration (cf. Fig. 2e)")
    return _save(fig, path)


def plot_dh_dn_vs_ntrain(curves: Mapping[int, Sequence[Sequence[float | None]]], path: str | Path) -> Path:
    """log10(dH/dN) vs N_train along the δH ranking of the training set (Fig. 3a upper panel).

    `curves`: iteration -> IterationDocument.dh_dn_curve ([N, H, dH/dN] points). Points with
    dH/dN <= 0 cannot be drawn on a log axis and are left out. Dotted lines: the paper's
    thresholds, 1e-3 (pre-screening) and 1e-4 (accurate models).
    """
    curves = {k: [p for p in c if p[2] is not None and p[2] > 0] for k, c in curves.items()}
    curves = {k: c for k, c in curves.items() if c}
    if not curves:
        raise ValueError("no iteration has a positive dH/dN")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for k in sorted(curves):
        pts = np.asarray([[p[0], p[2]] for p in curves[k]], float)
        ax.plot(pts[:, 0], np.log10(pts[:, 1]), ".-", label=f"iteration {k}")
    for value, label in ((1e-3, "1e-3 pre-screening"), (1e-4, "1e-4 accurate")):
        ax.axhline(np.log10(value), ls=":", color="gray", lw=0.8)
        ax.annotate(label, (ax.get_xlim()[0], np.log10(value)), fontsize=7, color="gray", va="bottom")
    ax.set_xlabel("N_train (frames, δH ranking order)")
    ax.set_ylabel("log10(dH/dN)")
    ax.set_title("entropy increase rate along the δH ranking (Fig. 3a, upper)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _log_if_wide(set_scale, values) -> None:
    """Log axis only when the values span more than a decade (else matplotlib's log ticks are unreadable)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) and np.all(v > 0) and v.max() / v.min() > 10:
        set_scale("log")


def plot_rmse_vs_ntrain(rows: Sequence[Mapping[str, float | None]], path: str | Path) -> Path:
    """Energy and force RMSE vs N_train, one point per iteration's model (Fig. 3a middle/lower
    panels, per iteration).

    The paper varies N_train on fixed data and tests every model on one test set; here each
    point is the model one iteration trained, tested on that iteration's test set (the
    paper's rule: unselected pool frames + later iterations, `cscflow.datasets.split_frames`).
    `rows`: one mapping per train stage with n_train, energy_rmse (eV/atom), force_rmse (eV/Å), iteration.
    """
    rows = [r for r in rows if r.get("n_train") and (r.get("energy_rmse") is not None or r.get("force_rmse") is not None)]
    if not rows:
        raise ValueError("no train stage reported an RMSE")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    n = np.array([r["n_train"] for r in rows], float)
    for ax, key, unit, scale in ((axes[0], "energy_rmse", "meV/atom", 1000.0), (axes[1], "force_rmse", "eV/Å", 1.0)):
        y = np.array([np.nan if r.get(key) is None else r[key] * scale for r in rows])
        ax.plot(n, y, "o-")
        for x_, y_, r in zip(n, y, rows):
            if np.isfinite(y_):
                ax.annotate(f"it{r.get('iteration', '?')}", (x_, y_), textcoords="offset points", xytext=(3, 3), fontsize=7)
        _log_if_wide(ax.set_xscale, n)
        _log_if_wide(ax.set_yscale, y)
        ax.set_xlabel("N_train (frames)")
        ax.set_ylabel(f"{key.split('_')[0]} RMSE ({unit})")
    axes[0].set_title("energy RMSE vs N_train (one model per iteration)", fontsize=9)
    axes[1].set_title("force RMSE vs N_train (one model per iteration)", fontsize=9)
    return _save(fig, path)


def plot_parity(
    energy_ref: Sequence[float], energy_pred: Sequence[float],
    forces_ref: Sequence[float], forces_pred: Sequence[float],
    path: str | Path, title: str = "",
) -> tuple[Path, dict[str, float]]:
    """Energy (eV/atom) and force-component (eV/Å) parity plots (Figs. 3b–c) and their RMSE/MAE.

    Labels are whatever labelled the frames (DFT, or the teacher standing in for it)."""
    e_ref, e_pred = np.asarray(energy_ref, float), np.asarray(energy_pred, float)
    f_ref, f_pred = np.asarray(forces_ref, float).ravel(), np.asarray(forces_pred, float).ravel()
    if e_ref.shape != e_pred.shape or f_ref.shape != f_pred.shape:
        raise ValueError(f"reference and prediction shapes differ: {e_ref.shape}/{e_pred.shape}, {f_ref.shape}/{f_pred.shape}")
    if len(e_ref) == 0:
        raise ValueError("no frames for a parity plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    stats = {}
    for ax, ref, pred, label, unit in ((axes[0], e_ref, e_pred, "energy", "eV/atom"),
                                       (axes[1], f_ref, f_pred, "force", "eV/Å")):
        ok = np.isfinite(ref) & np.isfinite(pred)
        ref, pred = ref[ok], pred[ok]
        rmse = float(np.sqrt(np.mean((pred - ref) ** 2))) if len(ref) else float("nan")
        mae = float(np.mean(np.abs(pred - ref))) if len(ref) else float("nan")
        stats[f"{label}_rmse"], stats[f"{label}_mae"] = rmse, mae
        ax.scatter(ref, pred, s=10, alpha=0.6)
        if len(ref):
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel(f"label {label} ({unit})")
        ax.set_ylabel(f"model {label} ({unit})")
        ax.set_title(f"{label}: RMSE {rmse:.3g}, MAE {mae:.3g} {unit}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path), stats
