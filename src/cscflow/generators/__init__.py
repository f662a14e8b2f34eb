"""Candidate generators: one small interface, several backends.

A backend turns (chemical system, target condition, rng) into ``n`` Candidates whose
Provenance it creates (and every later stage copies). ``get_generator`` picks the backend
named in ``GeneratorSettings.backend``; ``GenerateMaker`` is the jobflow stage that asks
for ``settings.num_per_condition`` structures for each target E_hull condition.

Backends that are not available yet (MatterGen, CHGGen) raise a clear error from
``get_generator``; a backend registers itself in ``GENERATORS``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel, Field

from cscflow.checkpoint import resumable
from cscflow.config import ChemicalSystem, GeneratorSettings
from cscflow.schemas import Candidate, Provenance
from cscflow.structure_store import CandidateSet, save_candidates

__all__ = [
    "GENERATORS",
    "GenerateMaker",
    "GenerateCollectMaker",
    "GenerateFanOutMaker",
    "GenerateOutput",
    "Generator",
    "candidate_id",
    "generate_candidates",
    "generation_batches",
    "get_generator",
]

logger = logging.getLogger(__name__)


def candidate_id(iteration: int, generator: str, condition: dict[str, Any], index: int) -> str:
    """Readable, unique-per-iteration id: ``it1-pyxtal-e0.03-00017``."""
    e_hull = condition.get("e_hull")
    if isinstance(e_hull, (int, float)):
        tag = f"e{e_hull:.2f}" if round(e_hull, 2) == e_hull else f"e{e_hull:g}"
    else:
        tag = "any"
    return f"it{iteration}-{generator}-{tag}-{index:05d}"


class Generator(ABC):
    """A structure generator backend.

    ``generate`` never raises for one bad draw: it retries, and counts what went wrong
    in ``self.failures`` (reason -> count, accumulated over calls) so that the stage can
    report it. It may return fewer than ``n`` candidates when every retry failed.
    """

    #: name written into Provenance.generator and candidate ids
    name: str = "generator"

    def __init__(self, settings: GeneratorSettings):
        self.settings = settings
        self.failures: Counter[str] = Counter()

    @abstractmethod
    def generate(
        self,
        chemical_system: ChemicalSystem,
        n: int,
        condition: dict[str, Any],
        rng: np.random.Generator,
        iteration: int = 0,
        start_index: int = 0,
    ) -> list[Candidate]:
        """``n`` candidates for ``condition``; sample_index runs from ``start_index``."""

    def _candidate(
        self,
        structure,
        condition: dict[str, Any],
        iteration: int,
        index: int,
        seed: int | None,
    ) -> Candidate:
        prov = Provenance(
            candidate_id=candidate_id(iteration, self.name, condition, index),
            iteration=iteration,
            generator=self.name,
            condition=dict(condition),
            sample_index=index,
            seed=seed,
        )
        return Candidate(provenance=prov, structure=structure)


def _pyxtal(settings: GeneratorSettings) -> Generator:
    from cscflow.generators.pyxtal_random import PyXtalGenerator

    return PyXtalGenerator(settings)


#: backend name -> factory(settings) -> Generator. MatterGen / CHGGen add themselves here.
GENERATORS: dict[str, Callable[[GeneratorSettings], Generator]] = {"pyxtal": _pyxtal}


def get_generator(settings: GeneratorSettings) -> Generator:
    """The backend named in ``settings.backend``."""
    backend = settings.backend
    if backend not in GENERATORS:
        # Backends in other modules register on import; try the conventional module name.
        import importlib

        try:
            importlib.import_module(f"cscflow.generators.{backend}")
        except ImportError as exc:
            if exc.name != f"cscflow.generators.{backend}":
                raise  # the backend module exists but its own imports failed: say so
    if backend not in GENERATORS:
        raise NotImplementedError(
            f"generator backend {backend!r} is not installed yet in cscflow "
            f"(available: {', '.join(sorted(GENERATORS))}); use generator.backend: pyxtal"
        )
    return GENERATORS[backend](settings)


def generation_batches(settings: GeneratorSettings) -> list[tuple[int, int, int]]:
    """(condition index, first structure of the condition, count) of every Generate job."""
    size = settings.per_job or settings.num_per_condition
    return [
        (idx, start, min(size, settings.num_per_condition - start))
        for idx in range(len(settings.conditions))
        for start in range(0, settings.num_per_condition, size)
    ]


def generate_candidates(
    chemical_system: ChemicalSystem,
    settings: GeneratorSettings,
    iteration: int,
    seed: int,
    generator: Generator | None = None,
    batches: list[tuple[int, int, int]] | None = None,
) -> tuple[list[Candidate], Counter]:
    """``num_per_condition`` candidates per condition (or the given `batches`).

    rng = default_rng([seed, iteration, idx]) for a whole condition, default_rng([seed,
    iteration, idx, start]) for a batch of it; candidate numbering is global, so a fan-out
    over batches gives unique ids."""
    gen = generator if generator is not None else get_generator(settings)
    out: list[Candidate] = []
    n = settings.num_per_condition
    whole = [(idx, 0, n) for idx in range(len(settings.conditions))]
    for idx, start, count in (whole if batches is None else batches):
        key = [seed, iteration, idx] if (start, count) == (0, n) else [seed, iteration, idx, start]
        batch = gen.generate(
            chemical_system,
            count,
            {"e_hull": float(settings.conditions[idx])},
            np.random.default_rng(key),
            iteration=iteration,
            start_index=idx * n + start,
        )
        out.extend(batch)
    return out, Counter(gen.failures)


class GenerateOutput(BaseModel):
    """Generated candidates and what failed on the way."""

    candidates: CandidateSet = Field(default_factory=CandidateSet, description="one stored document each")
    n_generated: int = 0
    n_requested: int = 0
    n_failed: int = Field(0, description="requested structures not produced after all retries")
    failures: dict[str, int] = Field(default_factory=dict, description="reason -> failed attempts")
    generator: str = ""
    seconds: float = 0.0


@dataclass
class GenerateMaker(Maker):
    """Generate candidates for every target condition of one iteration."""

    name: str = "generate"
    chemical_system: ChemicalSystem = field(
        default_factory=lambda: ChemicalSystem(elements=["Li", "P", "S"])
    )
    settings: GeneratorSettings = field(default_factory=GeneratorSettings)

    @job(data=["candidates"])
    @resumable
    def make(
        self, iteration: int, seed: int, checkpoint: str | None = None, batches: list[list[int]] | None = None
    ) -> GenerateOutput:
        """``checkpoint`` (a fine-tuned generator model) overrides settings.checkpoint;
        ``batches`` ([condition index, start, count] each, see generation_batches) limits the
        job to part of the iteration (GenerateFanOutMaker)."""
        settings = self.settings
        if checkpoint is not None:
            # validated copy: the checkpoint must exist
            settings = GeneratorSettings.model_validate(
                {**settings.model_dump(), "checkpoint": checkpoint}
            )
        t0 = time.perf_counter()
        gen = get_generator(settings)
        parts = [tuple(b) for b in batches] if batches is not None else None
        candidates, failures = generate_candidates(
            self.chemical_system, settings, iteration, seed, generator=gen, batches=parts
        )
        n_requested = sum(b[2] for b in parts) if parts else settings.num_per_condition * len(settings.conditions)
        if len(candidates) < n_requested:
            logger.warning(
                "generated %d of %d structures; failures: %s",
                len(candidates), n_requested, dict(failures),
            )
        return GenerateOutput(
            candidates=save_candidates(candidates, "generate"),
            n_generated=len(candidates),
            n_requested=n_requested,
            n_failed=n_requested - len(candidates),
            failures=dict(failures),
            generator=gen.name,
            seconds=time.perf_counter() - t0,
        )


@dataclass
class GenerateCollectMaker(Maker):
    """Join the Generate batches' outputs: their stored candidates by key, counts summed."""

    name: str = "generate collect"

    @job(data=["candidates"])
    def make(self, outputs: list[GenerateOutput]) -> GenerateOutput:
        from collections import Counter as _Counter

        from cscflow.structure_store import merge_sets

        docs = [o if isinstance(o, GenerateOutput) else GenerateOutput.model_validate(o) for o in outputs]
        failures: _Counter[str] = _Counter()
        for d in docs:
            failures.update(d.failures)
        return GenerateOutput(
            candidates=merge_sets([d.candidates for d in docs], CandidateSet),
            n_generated=sum(d.n_generated for d in docs),
            n_requested=sum(d.n_requested for d in docs),
            n_failed=sum(d.n_failed for d in docs),
            failures=dict(failures),
            generator=next((d.generator for d in docs if d.generator), ""),
            seconds=sum(d.seconds for d in docs),
        )


@dataclass
class GenerateFanOutMaker(Maker):
    """The Generate stage as one job per (condition, batch of ``generator.per_job``) and a
    collect: MatterGen's 3 x 3328 structures of a paper iteration on several GPU workers.

    The job replaces itself when it runs; each batch job has its own checkpoint key, so a
    resumed fan-out regenerates only the batches that did not finish.
    """

    generate_maker: GenerateMaker = field(default_factory=GenerateMaker)
    name: str = "generate batches"
    collect_maker: GenerateCollectMaker = field(default_factory=GenerateCollectMaker)

    @job
    @resumable
    def make(self, iteration: int, seed: int, checkpoint: str | None = None):
        from jobflow import Response

        from cscflow.checkpoint import fan_out

        batches = generation_batches(self.generate_maker.settings)
        jobs = []
        for i, batch in enumerate(batches):
            j = self.generate_maker.make(iteration, seed, checkpoint=checkpoint, batches=[list(batch)])
            j.name = f"{self.generate_maker.name} it{iteration} {i + 1}/{len(batches)}"
            j.metadata["batch"] = list(batch)
            jobs.append(j)
        collect = self.collect_maker.make([j.output for j in jobs])
        return Response(replace=fan_out(jobs, collect, "generate", "batch", self.name))
