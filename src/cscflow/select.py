"""Which candidates get labelled: E_hull-binned quotas (paper Methods 4.2).

Eligible: relaxed, scored, and S.U.N. when settings.only_sun. Each candidate falls in the
first bin with low <= E_hull < high; a bin takes at most round(quota * quota_scale)
candidates (at least 1 when quota > 0).

Inside a bin the paper picks by E_hull interval only, so the default
(``within_bin: random``) is a seeded random draw: the same seed gives the same picks
whatever the input order. Entropy ranks the labelled *frames* for training
(``cscflow.datasets.split_frames``), not the structures sent to DFT. ``within_bin:
entropy`` is kept as an option: greedy δH (``cscflow.entropy.greedy_entropy_ranking``)
against the training frames so far plus everything picked in earlier bins.
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
from cscflow.datasets import flatten_frames
from cscflow.entropy import DescriptorCache, greedy_entropy_ranking, stack_descriptors, structure_descriptors
from cscflow.schemas import Candidate, Frame
from cscflow.structure_store import CandidateSet, load_candidates, save_candidates

__all__ = ["SelectMaker", "SelectOutput", "bin_label", "bin_quota", "select_candidates"]

logger = logging.getLogger(__name__)


class SelectOutput(BaseModel):
    """Selected candidates (with delta_entropy) and how many each bin took."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    selected: CandidateSet = Field(default_factory=CandidateSet, description="one stored document each")
    per_bin: dict[str, int] = Field(default_factory=dict, description="bin label -> selected")
    available: dict[str, int] = Field(default_factory=dict, description="bin label -> eligible")
    quotas: dict[str, int] = Field(default_factory=dict, description="bin label -> scaled quota")
    ranking: str = Field("", description="how a bin was ordered: 'random' (seeded) or 'entropy' (greedy δH)")
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
    cache: DescriptorCache | None = None,
) -> SelectOutput:
    """Bin and pick; returns copies with `selected` set (and `delta_entropy` when ranked)."""
    t0 = time.perf_counter()
    settings = settings or SelectionSettings()
    cands = [c.model_copy(deep=True) for c in load_candidates(candidates)]
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

    entropy = settings.within_bin == "entropy"
    k, cutoff = settings.entropy_k, settings.entropy_cutoff
    cache = cache or DescriptorCache(k=k, cutoff=cutoff)
    reference: list[np.ndarray] = []
    if entropy:
        frames = flatten_frames(training_frames)
        reference = structure_descriptors(
            [f.structure for f in frames], k, cutoff, keys=[f"frame:{f.frame_id}" for f in frames], cache=cache
        )
    out = SelectOutput(ranking=settings.within_bin, n_training_environments=sum(len(x) for x in reference))
    selected: list[Candidate] = []
    for i, b in enumerate(settings.bins):
        label, quota = bin_label(b), bin_quota(b, settings.quota_scale)
        # input order must not matter: members sorted by id before any draw
        members = sorted(in_bin[i], key=lambda j: cands[j].id)
        out.available[label], out.quotas[label] = len(members), quota
        picked: list[int] = []
        if members and quota and entropy:
            desc = structure_descriptors(
                [cands[j].structure for j in members], k, cutoff,
                keys=[f"candidate:{cands[j].id}" for j in members], cache=cache,
            )
            ranking = greedy_entropy_ranking(
                desc, quota, bandwidth=settings.bandwidth, reference=stack_descriptors(reference, k),
                batch_size=settings.entropy_batch_size, device=settings.entropy_device,
            )
            for m, score in zip(ranking.order, ranking.delta_entropy):
                cands[members[m]].delta_entropy = score
                picked.append(members[m])
                reference.append(desc[m])
        elif members and quota:
            rng = np.random.default_rng([seed, i])
            picked = [members[m] for m in rng.permutation(len(members))[:quota]]
        for j in picked:
            cands[j].selected = True
        out.per_bin[label] = len(picked)
        selected.extend(cands[j] for j in picked)
        logger.info("select %s: %d of %d (quota %d, %s)", label, len(picked), len(members), quota, settings.within_bin)
    out.selected = save_candidates(selected, "select")
    out.seconds = time.perf_counter() - t0
    return out


@dataclass
class SelectMaker(Maker):
    """Pick candidates to label: E_hull bins, random inside a bin (seeded) by default."""

    name: str = "select"
    settings: SelectionSettings = field(default_factory=SelectionSettings)

    @job(data=["selected"])
    @resumable
    def make(
        self,
        candidates: CandidateSet | list[Candidate],
        training_frames: list[Frame] | list[list[Frame]] = (),
        seed: int = 0,
    ) -> SelectOutput:
        return select_candidates(candidates, self.settings, training_frames, seed=seed)
