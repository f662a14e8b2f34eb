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

__all__ = [
    "GENERATORS",
    "GenerateMaker",
    "GenerateOutput",
    "Generator",
    "candidate_id",
    "generate_candidates",
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


def generate_candidates(
    chemical_system: ChemicalSystem,
    settings: GeneratorSettings,
    iteration: int,
    seed: int,
    generator: Generator | None = None,
) -> tuple[list[Candidate], Counter]:
    """``num_per_condition`` candidates per condition; rng = default_rng([seed, iteration, idx])."""
    gen = generator if generator is not None else get_generator(settings)
    out: list[Candidate] = []
    start = 0
    for idx, e_hull in enumerate(settings.conditions):
        rng = np.random.default_rng([seed, iteration, idx])
        batch = gen.generate(
            chemical_system,
            settings.num_per_condition,
            {"e_hull": float(e_hull)},
            rng,
            iteration=iteration,
            start_index=start,
        )
        out.extend(batch)
        start += settings.num_per_condition
    return out, Counter(gen.failures)


class GenerateOutput(BaseModel):
    """Generated candidates and what failed on the way."""

    candidates: list[Candidate] = Field(default_factory=list)
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
    def make(self, iteration: int, seed: int, checkpoint: str | None = None) -> GenerateOutput:
        """``checkpoint`` (a fine-tuned generator model) overrides settings.checkpoint."""
        settings = self.settings
        if checkpoint is not None:
            # validated copy: the checkpoint must exist
            settings = GeneratorSettings.model_validate(
                {**settings.model_dump(), "checkpoint": checkpoint}
            )
        t0 = time.perf_counter()
        gen = get_generator(settings)
        candidates, failures = generate_candidates(
            self.chemical_system, settings, iteration, seed, generator=gen
        )
        n_requested = settings.num_per_condition * len(settings.conditions)
        if len(candidates) < n_requested:
            logger.warning(
                "generated %d of %d structures; failures: %s",
                len(candidates), n_requested, dict(failures),
            )
        return GenerateOutput(
            candidates=candidates,
            n_requested=n_requested,
            n_failed=n_requested - len(candidates),
            failures=dict(failures),
            generator=gen.name,
            seconds=time.perf_counter() - t0,
        )
