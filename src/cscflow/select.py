"""Which candidates get labelled: E_hull-binned quotas ranked by entropy gain (Methods 4.2).

Eligible: relaxed, scored, and S.U.N. when settings.only_sun. Each candidate falls in the
first bin with low <= E_hull < high; a bin takes at most round(quota * quota_scale)
candidates (at least 1 when quota > 0).

Ranking inside a bin: ΔH_s = H(X ∪ Y_s) - H(X) (cscflow.entropy.structure_entropy_gain)
against X = the environments of the training set so far (all frames of all earlier
iterations). The paper ranks by δH against the existing data; ranking every candidate
against the same fixed X keeps the cost one kernel pass per candidate.

Without a training set, X would be empty and ΔH would be each structure's self-entropy,
which ignores overlap between candidates (ten copies of one motif would all rank high).
We then pick greedily instead: X starts empty and grows by each picked structure's
environments, over the bins in order, so every pick adds the most to what was already
chosen. The greedy path costs one ΔH pass per pick; it is meant for the bootstrap case
(small pools).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel, ConfigDict, Field

from cscflow.checkpoint import resumable
from cscflow.config import EhullBin, SelectionSettings
from cscflow.entropy import (
    DEFAULT_MAX_ENVIRONMENTS,
    stack_descriptors,
    structure_descriptors,
    structure_entropy_gain,
)
from cscflow.schemas import Candidate, Frame

__all__ = ["SelectMaker", "SelectOutput", "bin_label", "bin_quota", "flatten_frames", "select_candidates"]

logger = logging.getLogger(__name__)


class SelectOutput(BaseModel):
    """Selected candidates (with delta_entropy) and how many each bin took."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    selected: list[Candidate] = Field(default_factory=list)
    per_bin: dict[str, int] = Field(default_factory=dict, description="bin label -> selected")
    available: dict[str, int] = Field(default_factory=dict, description="bin label -> eligible")
    quotas: dict[str, int] = Field(default_factory=dict, description="bin label -> scaled quota")
    ranking: str = Field("", description="'training-set' or 'greedy' (no training set)")
    n_training_environments: int = 0
    seconds: float = 0.0


def bin_label(b: EhullBin) -> str:
    low = "-inf" if b.low is None else f"{b.low:g}"
    return f"[{low}, {b.high:g})"


def bin_quota(b: EhullBin, scale: float) -> int:
    """round(quota * scale) half up, at least 1 when quota > 0."""
    if b.quota <= 0:
        return 0
    return max(1, int(math.floor(b.quota * scale + 0.5)))


def flatten_frames(frames: Sequence[Frame] | Sequence[Sequence[Frame]]) -> list[Frame]:
    """One flat list from a list of frames or a list of per-iteration lists."""
    out: list[Frame] = []
    for item in frames or ():
        if isinstance(item, Frame):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(item)
        else:
            raise TypeError(f"expected Frame or list of Frame, got {type(item).__name__}")
    return out


def _in_bin(e: float, b: EhullBin) -> bool:
    return (b.low is None or e >= b.low) and e < b.high


def _eligible(c: Candidate, only_sun: bool) -> bool:
    if c.status != "relaxed" or c.e_hull is None:
        return False
    return c.is_sun if only_sun else True


def select_candidates(
    candidates: Sequence[Candidate],
    settings: SelectionSettings | None = None,
    training_frames: Sequence[Frame] | Sequence[Sequence[Frame]] = (),
    seed: int = 0,
    max_environments: int | None = DEFAULT_MAX_ENVIRONMENTS,
) -> SelectOutput:
    """Bin, rank and pick; returns copies with `delta_entropy` and `selected` set."""
    t0 = time.perf_counter()
    settings = settings or SelectionSettings()
    k, cutoff, h = settings.entropy_k, settings.entropy_cutoff, settings.bandwidth
    frames = flatten_frames(training_frames)
    x_train = stack_descriptors(structure_descriptors([f.structure for f in frames], k, cutoff), k)
    greedy = len(x_train) == 0

    cands = [c.model_copy(deep=True) for c in candidates]
    for c in cands:
        c.selected = False
    in_bin: dict[int, list[int]] = {i: [] for i in range(len(settings.bins))}
    for j, c in enumerate(cands):
        if not _eligible(c, settings.only_sun):
            continue
        for i, b in enumerate(settings.bins):
            if _in_bin(c.e_hull, b):
                in_bin[i].append(j)
                break
    pool = sorted(j for members in in_bin.values() for j in members)
    desc = dict(zip(pool, structure_descriptors([cands[j].structure for j in pool], k, cutoff)))
    rng = np.random.default_rng([seed, 7])
    tiebreak = rng.permutation(len(cands))  # seeded, so equal gains do not favour input order

    out = SelectOutput(ranking="greedy" if greedy else "training-set", n_training_environments=len(x_train))
    chosen: list[np.ndarray] = []
    for i, b in enumerate(settings.bins):
        label, members = bin_label(b), in_bin[i]
        quota = bin_quota(b, settings.quota_scale)
        out.available[label], out.quotas[label] = len(members), quota
        picked: list[int] = []
        if not greedy and members and quota:
            gains = structure_entropy_gain(
                [desc[j] for j in members], x_train, bandwidth=h, max_environments=max_environments, seed=seed
            )
            for j, g in zip(members, gains):
                cands[j].delta_entropy = float(g)
            order = sorted(range(len(members)), key=lambda m: (-gains[m], tiebreak[members[m]]))
            picked = [members[m] for m in order[:quota]]
        elif greedy:
            left = list(members)
            while left and len(picked) < quota:
                x_sel = stack_descriptors(chosen, k)
                gains = structure_entropy_gain(
                    [desc[j] for j in left], x_sel, bandwidth=h, max_environments=max_environments, seed=seed
                )
                best = min(range(len(left)), key=lambda m: (-gains[m], tiebreak[left[m]]))
                j = left.pop(best)
                cands[j].delta_entropy = float(gains[best])
                picked.append(j)
                chosen.append(desc[j])
        for j in picked:
            cands[j].selected = True
        out.per_bin[label] = len(picked)
        out.selected.extend(cands[j] for j in picked)
        logger.info("select %s: %d of %d (quota %d)", label, len(picked), len(members), quota)
    out.seconds = time.perf_counter() - t0
    return out


@dataclass
class SelectMaker(Maker):
    """Pick candidates to label: E_hull bins, ranked by entropy gain."""

    name: str = "select"
    settings: SelectionSettings = field(default_factory=SelectionSettings)

    @job(data=["selected"])
    @resumable
    def make(
        self,
        candidates: list[Candidate],
        training_frames: list[Frame] | list[list[Frame]] = (),
        seed: int = 0,
    ) -> SelectOutput:
        return select_candidates(candidates, self.settings, training_frames, seed=seed)
