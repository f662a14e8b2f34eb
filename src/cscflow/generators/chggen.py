"""CHGGen as the loop's generator backend (``generator.backend: chggen``).

Inside the closed loop there is no ``chggen:`` block, so compositions are drawn from the
chemical system (whole-cell contents in [min_atoms, max_atoms], every element present) and
the guest is Li when the system has it, else its first element. Per candidate: a random
lattice at N·V0 (atomic-radius estimate), positions from the diffusion model in that cell,
a quick CHGNet relaxation, framework symmetrization, RePaint of the guests. The returned
candidates are the (unrelaxed) inpainted structures: the loop's Relax stage relaxes them.
Draws whose framework does not symmetrize are counted in ``failures``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cscflow.config import ChemicalSystem, ForceFieldSettings, GeneratorSettings, RelaxSettings
from cscflow.generators import GENERATORS, Generator
from cscflow.generators.mattergen import MatterGenGenerator
from cscflow.schemas import Candidate, Provenance

__all__ = ["ChgGenGenerator"]

logger = logging.getLogger(__name__)


class ChgGenGenerator(MatterGenGenerator):
    """Lattice search -> unconditional positions -> relax -> symmetrize -> RePaint.

    A MatterGen generator with another ``generate``: the checkpoint check and the worker
    process (started on first use, closed with the generator) are MatterGen's.
    """

    name = "chggen"

    def __init__(self, settings: GeneratorSettings, chggen=None, worker=None):
        from cscflow.chggen.settings import ChgGenSettings

        super().__init__(settings, worker=worker)
        self.chggen = chggen or ChgGenSettings()

    def _composition(self, cs: ChemicalSystem, rng: np.random.Generator) -> list[str]:
        k = len(cs.elements)
        n = int(rng.integers(max(cs.min_atoms, k), max(cs.max_atoms, k) + 1))
        counts = np.ones(k, dtype=int) + rng.multinomial(n - k, np.full(k, 1.0 / k))
        return [el for el, c in zip(cs.elements, counts) for _ in range(int(c))]

    def generate(self, chemical_system: ChemicalSystem, n: int, condition: dict[str, Any],
                 rng: np.random.Generator, iteration: int = 0, start_index: int = 0) -> list[Candidate]:
        from pymatgen.core import Composition

        from cscflow.chggen.inpaint import inpaint_guests, sample_in_cells, with_guests
        from cscflow.chggen.lattice import estimate_volume_per_atom, random_lattice
        from cscflow.chggen.symmetrize import symmetrize_framework
        from cscflow.forcefields import get_calculator, model_tag
        from cscflow.relax import relax_candidates

        s, c = self.settings, self.chggen
        guests = [g for g in c.guest_species if g in chemical_system.elements] or [chemical_system.elements[0]]
        out: list[Candidate] = []
        calc = None
        attempts = 0
        while len(out) < n and attempts < n * s.max_attempts_per_structure:
            want = n - len(out)
            cells = []
            for _ in range(want):
                species = self._composition(chemical_system, rng)
                v0, _ = estimate_volume_per_atom(Composition("".join(species)))
                lat, _ = random_lattice(len(species), v0 * self.settings.volume_factor, rng,
                                        str(rng.choice(c.crystal_systems)), c.ratio_range, c.angle_range)
                cells.append((lat, species))
            attempts += want
            seed = int(rng.integers(2**30))
            samples, res = sample_in_cells(self.worker, s.checkpoint, cells, n_steps_corrector=c.n_steps_corrector,
                                           batch_size=s.batch_size, seed=seed, device=s.device,
                                           num_steps=s.diffusion_steps)
            for reason, k in res.get("reasons", {}).items():
                self.failures[reason] += k
            if calc is None:
                ff = ForceFieldSettings()
                calc, tag = get_calculator(ff), model_tag(ff)
            raw = []
            for st, _ in samples:
                st.remove_site_property("host")
                raw.append(Candidate(provenance=Provenance(candidate_id="tmp", iteration=iteration, generator=self.name),
                                     structure=st))
            relaxed = relax_candidates(raw, calc, RelaxSettings(steps=100, fmax=0.1), tag, progress=False)
            inputs, parents = [], []
            for r in relaxed:
                if r.status != "relaxed":
                    self.failures[f"relax:{r.reject_reason}"] += 1
                    continue
                fw = symmetrize_framework(r.structure, guests, c.tolerances, c.angle_tolerance)
                if not fw.success:
                    self.failures[f"symmetrize:{fw.reason}"] += 1
                    continue
                inputs.append(with_guests(fw.host, fw.guests, rng))
                parents.append(fw)
            painted, res = inpaint_guests(self.worker, s.checkpoint, inputs, resample_steps=c.resample_steps,
                                          n_steps_corrector=c.n_steps_corrector, batch_size=s.batch_size,
                                          seed=seed + 1, device=s.device, num_steps=s.diffusion_steps)
            for reason, k in res.get("reasons", {}).items():
                self.failures[f"inpaint:{reason}"] += k
            for st, info in painted:
                if len(out) >= n:
                    break
                st.remove_site_property("host")
                fw = parents[int(info["input_index"])]
                cond = {**condition, "framework_space_group": fw.space_group, "framework_tolerance": fw.tolerance}
                out.append(self._candidate(st, cond, iteration, start_index + len(out), seed))
        return out


def _chggen(settings: GeneratorSettings) -> Generator:
    return ChgGenGenerator(settings)


GENERATORS["chggen"] = _chggen
