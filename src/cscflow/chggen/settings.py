"""CHGGen settings and spec: an ExplorationSpec plus a ``chggen:`` block (paper 002)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cscflow.config import ExplorationSpec

__all__ = ["ChgGenSettings", "ChgGenSpec", "is_chggen_spec", "load_chggen_spec", "read_spec_mapping"]

CRYSTAL_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")


class ChgGenSettings(BaseModel):
    """Lattice search, unconditional generation, framework symmetrization, RePaint, ranking."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    compositions: list[str] = Field(default_factory=list, description="cell contents, e.g. Li7Si3 (whole cell)")
    n_per_composition: int = Field(4, ge=1, description="random lattices (= unconditional samples) per composition")
    # 1. lattice random search at fixed volume N*V0
    volume_per_atom: float | None = Field(None, gt=0, description="V0 in Å^3/atom; None: from references")
    crystal_systems: list[Literal[CRYSTAL_SYSTEMS]] = Field(default_factory=lambda: list(CRYSTAL_SYSTEMS))
    ratio_range: tuple[float, float] = (0.7, 1.5)
    angle_range: tuple[float, float] = (65.0, 115.0)
    # 3. framework symmetrization
    guest_species: list[str] = Field(default_factory=lambda: ["Li"])
    tolerances: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    angle_tolerance: float = Field(5.0, gt=0)
    # 4. inpainting (RePaint)
    inpaint_per_framework: int = Field(1, ge=1)
    resample_steps: int = Field(3, ge=1, description="r: denoising passes per reverse step")
    n_steps_corrector: int = Field(1, ge=0)
    fix_cell: bool = True
    fix_species: bool = True
    guidance_factor: float = Field(0.0, ge=0)
    # 5. ranking and metrics
    ed_threshold: float = Field(0.1, description="E_d below this goes on to DFT (eV/atom)")
    success_symprec: float = Field(0.1, gt=0, description="symmetry success: refinement tolerance, Å")
    success_min_space_group: int = Field(3, ge=2, le=230, description="success: space group number >= this")
    max_reference_atoms: int = Field(24, ge=1, description="references larger than this are not relaxed")
    rdf_rmax: float = Field(6.0, gt=0)
    rdf_bins: int = Field(60, ge=5)
    coordination: Literal["crystalnn", "chemenv"] = "crystalnn"

    @model_validator(mode="after")
    def _check(self) -> "ChgGenSettings":
        from pymatgen.core import Composition

        for c in self.compositions:
            try:
                Composition(c)
            except Exception:
                raise ValueError(f"not a chemical formula: {c!r}") from None
        if not self.tolerances or sorted(self.tolerances) != list(self.tolerances):
            raise ValueError("tolerances must be a non-empty increasing list")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError("ratio_range must be (low, high) with 0 < low <= high")
        if not 0 < self.angle_range[0] <= self.angle_range[1] < 180:
            raise ValueError("angle_range must be (low, high) in degrees, 0 < low <= high < 180")
        if not self.crystal_systems:
            raise ValueError("crystal_systems is empty")
        return self


class ChgGenSpec(ExplorationSpec):
    """``cscflow chggen`` spec: the exploration spec's blocks plus ``chggen``."""

    chggen: ChgGenSettings = Field(default_factory=ChgGenSettings)

    @model_validator(mode="after")
    def _need_compositions(self) -> "ChgGenSpec":
        if not self.chggen.compositions:
            raise ValueError("chggen.compositions is empty: list the cell contents to generate, e.g. [Li7Si3]")
        allowed = set(self.chemical_system.elements)
        from pymatgen.core import Composition

        for c in self.chggen.compositions:
            extra = {el.symbol for el in Composition(c).elements} - allowed
            if extra:
                raise ValueError(f"composition {c} has {sorted(extra)} outside the chemical system")
        if self.generator.checkpoint is None:
            raise ValueError("CHGGen needs a MatterGen model: set generator.checkpoint")
        return self


def load_chggen_spec(path: str | Path) -> ChgGenSpec:
    """Read and validate a CHGGen spec (relative paths relative to the spec file)."""
    from cscflow.config import load_spec

    return load_spec(path, ChgGenSpec)


def read_spec_mapping(path: str | Path) -> dict | None:
    """The spec file's YAML mapping, or None when it is missing or not a YAML mapping
    (``load_spec`` is where those problems are reported)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def is_chggen_spec(path: str | Path) -> bool:
    """A spec with a top-level ``chggen:`` block belongs to `cscflow chggen`, not `explore`."""
    raw = read_spec_mapping(path)
    return raw is not None and "chggen" in raw
