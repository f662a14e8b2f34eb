"""Per-iteration metrics (IterationDocument) and the loop's stopping rule.

Entropies are QUESTS H (cscflow.entropy.dataset_entropy) with the selection settings'
k, cutoff and bandwidth:
- entropy_candidates: environments of this iteration's relaxed candidates;
- entropy_training: environments of every labelled frame so far (the pool the loop
  grows; not the train stage's train/test split, which is re-drawn each iteration and
  would make H jump while N stays the same);
- dh_dn: (H_train - H_train_prev) / (N_train - N_train_prev) against the last document in
  `history` (None for the first iteration, or when no frame was added);
- entropy_gain: H_train - H_train_prev (None for the first iteration).
Ratios are over the generated candidates: a structure the relaxation rejected counts as
not stable / unique / novel, as in MatterGen's S.U.N. rate.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobflow import Maker, job

from cscflow.checkpoint import resumable
from cscflow.config import ConvergenceSettings, SelectionSettings
from cscflow.entropy import dataset_entropy, stack_descriptors, structure_descriptors
from cscflow.schemas import Candidate, Frame, IterationDocument
from cscflow.select import flatten_frames

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


def _attr(obj: Any, name: str):
    """Attribute of a train output, whether a pydantic object or its dict form."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _entropy(structures, selection: SelectionSettings, seed: int) -> float | None:
    if not structures:
        return None
    k = selection.entropy_k
    x = stack_descriptors(structure_descriptors(structures, k, selection.entropy_cutoff), k)
    return dataset_entropy(x, bandwidth=selection.bandwidth, seed=seed)


def evaluate_iteration(
    iteration: int,
    scored: Sequence[Candidate],
    selected: Sequence[Candidate],
    frames: Sequence[Frame] | Sequence[Sequence[Frame]],
    train: Any | None = None,
    history: Sequence[IterationDocument] = (),
    selection: SelectionSettings | None = None,
    seed: int = 0,
) -> IterationDocument:
    """Everything one iteration measured (see module docstring for definitions)."""
    selection = selection or SelectionSettings()
    all_frames = flatten_frames(frames)
    relaxed = [c for c in scored if c.status == "relaxed"]
    rejected = [c for c in scored if c.status == "rejected"]
    n_gen = len(scored)

    # The training pool is every labelled frame so far. The train stage's own split
    # (train_frame_ids) is re-drawn each iteration, so H over it jumps while N stays put.
    training = all_frames

    e_hull: dict[str, list[float]] = defaultdict(list)
    for c in relaxed:
        if c.e_hull is not None:
            e_hull[condition_key(c.provenance.condition)].append(float(c.e_hull))

    h_cand = _entropy([c.structure for c in relaxed], selection, seed)
    h_train = _entropy([f.structure for f in training], selection, seed)
    n_train = len(training)

    dh_dn = gain = None
    prev = history[-1] if history else None
    if prev is not None and prev.entropy_training is not None and h_train is not None:
        added = n_train - prev.n_train_total
        if added > 0:  # an iteration that labelled nothing says nothing about saturation
            gain = h_train - prev.entropy_training
            dh_dn = gain / added

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
        n_train_total=n_train,
        entropy_candidates=h_cand,
        entropy_training=h_train,
        dh_dn=dh_dn,
        entropy_gain=gain,
        sun_ratio=ratio(counts["n_sun"]),
        stable_ratio=ratio(counts["n_stable"]),
        unique_ratio=ratio(counts["n_unique"]),
        novel_ratio=ratio(counts["n_novel"]),
        e_hull_by_condition=dict(e_hull),
        energy_rmse=_attr(train, "energy_rmse"),
        force_rmse=_attr(train, "force_rmse"),
        model_path=_attr(train, "model_path"),
        rejection_reasons=dict(Counter(reason_key(c.reject_reason) for c in rejected)),
    )


def should_stop(history: Sequence[IterationDocument], convergence: ConvergenceSettings) -> str | None:
    """Why the loop stops after the last iteration in `history`, or None to go on."""
    if not history:
        return None
    last = history[-1]
    if len(history) < convergence.min_iterations:
        return None
    if last.dh_dn is not None and last.dh_dn < convergence.dh_dn_threshold:
        return f"entropy saturated: dH/dN={last.dh_dn:.3g} < {convergence.dh_dn_threshold:g}"
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
            iteration, scored, selected, frames, train, history, selection=self.selection, seed=seed
        )
