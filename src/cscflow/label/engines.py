"""Energy engines of the labelling protocol: the only thing that differs between labellers.

``teacher``: a pretrained force field standing in for DFT (``labeller.teacher``, any
model :mod:`cscflow.forcefields` loads: CHGNet from its wheel, a DeePMD/MACE/MatterSim
file, ...). ``cp2k``: real DFT through ASE's CP2K calculator (:mod:`cscflow.label.cp2k`).
VASP runs through atomate2 jobs instead of an ASE calculator (:mod:`cscflow.label.vasp`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile

from pymatgen.core import Structure

from cscflow.config import ForceFieldSettings, LabelSettings

__all__ = ["ENGINES", "EngineCalculator", "engine_labeller", "teacher_name"]

logger = logging.getLogger(__name__)

ENGINES = ("cp2k", "teacher")


def teacher_name(teacher: ForceFieldSettings) -> str:
    """Labeller tag written on every teacher frame: the model, named as the stand-in for DFT."""
    from cscflow.forcefields import model_tag

    return f"teacher:{model_tag(teacher)} (stand-in for DFT)"


def engine_labeller(settings: LabelSettings) -> str:
    """Labeller tag of the engine ``settings.backend`` (written on every frame)."""
    if settings.backend == "cp2k":
        from cscflow.label.cp2k import labeller_name

        return labeller_name(settings.cp2k)
    if settings.backend == "teacher":
        return teacher_name(settings.teacher)
    raise ValueError(
        f"the DFT protocol runs with labeller.backend in {ENGINES}, got {settings.backend!r} "
        "(vasp builds its own atomate2 flow: cscflow.label.vasp)"
    )


class EngineCalculator:
    """Context manager: an ASE calculator for the engine (CP2K in a scratch folder, closed after)."""

    def __init__(self, settings: LabelSettings, structure: Structure):
        self.settings, self.structure = settings, structure
        self.workdir: str | None = None
        self.calc = None

    def __enter__(self):
        if self.settings.backend == "cp2k":
            from cscflow.label.cp2k import cp2k_calculator

            self.workdir = tempfile.mkdtemp(prefix="cscflow-cp2k-")
            self.calc = cp2k_calculator(self.settings.cp2k, self.structure.lattice.matrix, self.workdir)
        elif self.settings.backend == "teacher":
            from cscflow.forcefields import get_calculator

            self.calc = get_calculator(self.settings.teacher)
        else:
            engine_labeller(self.settings)  # raises the explanation
        return self.calc

    def __exit__(self, exc_type, exc, tb):
        if self.workdir is None:
            return False  # a cached force-field calculator stays loaded
        close = getattr(self.calc, "close", None)
        if callable(close):
            close()
        if exc_type is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            logger.warning("CP2K files of the failed calculation kept in %s", self.workdir)
        return False
