"""Per-iteration metrics (IterationDocument) and the loop's stopping rule.

Entropies are QUESTS H (eq. 1, ``cscflow.entropy.entropy``) over *all* environments, with
the selection settings' k, cutoff, bandwidth and device:
- entropy_candidates: this iteration's relaxed candidates;
- entropy_training, n_train, dh_dn_curve: H of the first N frames of the training set in
  its δH ranking order (the train stage's ``train_frame_ids``; without them the split is
  ranked here with the training settings), for N = 1..N_train;
- dh_dn: Fig. 3a's increase of H per added frame along that ranking at N = N_train,
  averaged over the last ``convergence.dh_dn_window`` frames;
- entropy_gain: H_train - H_train of the previous iteration.
Ratios are over the generated candidates: a structure the relaxation rejected counts as
not stable / unique / novel, as in MatterGen's S.U.N. rate.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jobflow import Maker, job

from cscflow.checkpoint import resumable
from cscflow.config import ConvergenceSettings, SelectionSettings, TrainingSettings
from cscflow.datasets import flatten_frames, split_frames
from cscflow.entropy import DescriptorCache, dh_dn, entropy, entropy_along, stack_descriptors, structure_descriptors
from cscflow.schemas import Candidate, field_of, Frame, IterationDocument
from cscflow.structure_store import load_candidates

__all__ = ["EvaluateMaker", "condition_key", "evaluate_iteration", "reason_key", "should_stop"]

logger = logging.getLogger(__name__)


def condition_key(condition: dict[str, Any]) -> str:
    """The generator condition as a string key: '0.03' for {'e_hull': 0.03}."""
    if not condition:
        return "none"
    if len(condition) == 1:
        return str(next(iter(condition.values())))
    return ",".join(f"{k}={v}" for k, v in sorted(condition.items()))


def reason_key(reason: str | None) -> str:
    """Group rejection reasons by their text before the first ':' (numbers follow it)."""
    if not reason:
        return "unknown"
    return reason.split(":", 1)[0].strip() or "unknown"




def _curve_points(h: list[float], rates: list[float | None], max_points: int = 200) -> list[list[float | None]]:
    """[N, H, dH/dN] at <= max_points log-spaced N (always the first and the last)."""
    if not h:
        return []
    idx = np.unique(np.geomspace(1, len(h), num=min(max_points, len(h))).round().astype(int)) - 1
    return [[int(i + 1), float(h[i]), rates[i]] for i in idx]


def training_entropy_curve(
    frames: Sequence[Frame],
    train: Any | None,
    selection: SelectionSettings,
    training: TrainingSettings,
    cache: DescriptorCache,
    iteration: int = 1,
) -> list[float]:
    """H of the first N training frames in ranking order (see module docstring)."""
    k, cutoff = selection.entropy_k, selection.entropy_cutoff
    ids = list(field_of(train, "train_frame_ids") or [])
    by_id = {f.frame_id: f for f in frames}
    if ids and all(i in by_id for i in ids):
        ordered = [by_id[i] for i in ids]
        desc = structure_descriptors(
            [f.structure for f in ordered], k, cutoff, keys=[f.frame_id for f in ordered], cache=cache
        )
        return entropy_along(
            desc, selection.bandwidth, batch_size=selection.entropy_batch_size, device=selection.entropy_device
        )
    if not frames or not any(f.provenance.iteration <= training.train_iterations_max for f in frames):
        return []
    split = split_frames(
        frames, n_train=training.n_train_at(iteration), train_iterations_max=training.train_iterations_max,
        test_fraction=training.test_fraction, seed=training.seed, k=k, cutoff=cutoff,
        bandwidth=selection.bandwidth, cache=cache, device=selection.entropy_device,
    )
    return split.train_entropy


def evaluate_iteration(
    iteration: int,
    scored: Sequence[Candidate],
    selected: Sequence[Candidate],
    frames: Sequence[Frame] | Sequence[Sequence[Frame]],
    train: Any | None = None,
    history: Sequence[IterationDocument] = (),
    selection: SelectionSettings | None = None,
    seed: int = 0,
    training: TrainingSettings | None = None,
    convergence: ConvergenceSettings | None = None,
) -> IterationDocument:
    """Everything one iteration measured (see module docstring for definitions)."""
    selection = selection or SelectionSettings()
    training = training or TrainingSettings()
    convergence = convergence or ConvergenceSettings()
    all_frames = flatten_frames(frames)
    scored, selected = load_candidates(scored), load_candidates(selected)
    relaxed = [c for c in scored if c.status == "relaxed"]
    rejected = [c for c in scored if c.status == "rejected"]
    n_gen = len(scored)
    cache = DescriptorCache(k=selection.entropy_k, cutoff=selection.entropy_cutoff)

    e_hull: dict[str, list[float]] = defaultdict(list)
    for c in relaxed:
        if c.e_hull is not None:
            e_hull[condition_key(c.provenance.condition)].append(float(c.e_hull))

    h_cand = None
    if relaxed:
        desc = structure_descriptors(
            [c.structure for c in relaxed], selection.entropy_k, selection.entropy_cutoff,
            keys=[f"candidate:{c.id}" for c in relaxed], cache=cache,
        )
        h_cand = entropy(
            stack_descriptors(desc, selection.entropy_k), selection.bandwidth,
            batch_size=selection.entropy_batch_size, device=selection.entropy_device,
        )
    curve = training_entropy_curve(all_frames, train, selection, training, cache, iteration)
    rates = dh_dn(curve, convergence.dh_dn_window)
    h_train = curve[-1] if curve else None
    gain = None
    prev = history[-1] if history else None
    if prev is not None and prev.entropy_training is not None and h_train is not None:
        gain = h_train - prev.entropy_training

    def ratio(n: int) -> float | None:
        return n / n_gen if n_gen else None

    counts = {
        "n_stable": sum(bool(c.is_stable) for c in relaxed),
        "n_unique": sum(bool(c.is_unique) for c in relaxed),
        "n_novel": sum(bool(c.is_novel) for c in relaxed),
        "n_sun": sum(c.is_sun for c in relaxed),
    }
    return IterationDocument(
        iteration=iteration,
        n_generated=n_gen,
        n_relaxed=len(relaxed),
        n_rejected=len(rejected),
        **counts,
        n_selected=len(selected),
        n_labelled=sum(f.provenance.iteration == iteration for f in all_frames),
        n_train_total=len(all_frames),
        n_train=len(curve) or None,
        entropy_candidates=h_cand,
        entropy_training=h_train,
        dh_dn=rates[-1] if rates else None,
        dh_dn_curve=_curve_points(curve, rates),
        entropy_gain=gain,
        sun_ratio=ratio(counts["n_sun"]),
        stable_ratio=ratio(counts["n_stable"]),
        unique_ratio=ratio(counts["n_unique"]),
        novel_ratio=ratio(counts["n_novel"]),
        e_hull_by_condition=dict(e_hull),
        energy_rmse=field_of(train, "energy_rmse"),
        force_rmse=field_of(train, "force_rmse"),
        model_path=field_of(train, "model_path"),
        rejection_reasons=dict(Counter(reason_key(c.reject_reason) for c in rejected)),
    )


def should_stop(history: Sequence[IterationDocument], convergence: ConvergenceSettings) -> str | None:
    """Why the loop stops after the last iteration in `history`, or None to go on."""
    if not history:
        return None
    last = history[-1]
    if len(history) < convergence.min_iterations:
        return None
    if last.dh_dn is not None and last.dh_dn < convergence.threshold:
        return f"entropy saturated: dH/dN={last.dh_dn:.3g} < {convergence.threshold:g} ({convergence.target})"
    if last.entropy_gain is not None and last.entropy_gain < convergence.entropy_gain_epsilon:
        return f"entropy gain {last.entropy_gain:.3g} < epsilon {convergence.entropy_gain_epsilon:g}"
    if last.iteration >= convergence.max_iterations:
        return f"max_iterations ({convergence.max_iterations}) reached"
    return None


@dataclass
class EvaluateMaker(Maker):
    """Metrics of one iteration as an IterationDocument."""

    name: str = "evaluate"
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    convergence: ConvergenceSettings = field(default_factory=ConvergenceSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    @job
    @resumable
    def make(
        self,
        iteration: int,
        scored: list[Candidate],
        selected: list[Candidate],
        frames: list[Frame] | list[list[Frame]],
        train: Any | None = None,
        history: list[IterationDocument] = (),
        seed: int = 0,
    ) -> IterationDocument:
        return evaluate_iteration(
            iteration, scored, selected, frames, train, history, selection=self.selection, seed=seed,
            training=self.training, convergence=self.convergence,
        )
