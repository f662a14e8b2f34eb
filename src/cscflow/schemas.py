"""Documents passed between stages and written to the store.

Units: energies eV, forces eV/Å, stress GPa with ASE's sign convention
(``atoms.get_stress(voigt=False) / ase.units.GPa``: positive = tensile), E_hull eV/atom.
Candidates and frames are stored one document each (:mod:`cscflow.structure_store`);
stage outputs carry the sets of their keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Structure

__all__ = [
    "field_of",
    "flatten_documents",
    "Candidate",
    "MatchKey",
    "Frame",
    "IterationDocument",
    "LoopState",
    "Provenance",
    "ReferenceEntry",
]


class _Doc(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


class Provenance(_Doc):
    """Where a candidate came from; copied onto every frame made from it."""

    candidate_id: str
    iteration: int
    generator: str = Field(..., description="pyxtal, mattergen, chggen, prototype, seed")
    condition: dict[str, Any] = Field(default_factory=dict, description="e.g. {'e_hull': 0.03}")
    parent: str | None = Field(None, description="id of the structure this one came from")
    sample_index: int | None = None
    seed: int | None = None


class MatchKey(_Doc):
    """What S.U.N. matching needs to know about a structure, computed once (cscflow.score).

    `n_sites`, `minima` and `lengths` describe the cell StructureMatcher compares (Niggli,
    then primitive): two structures can only match if both formulas and n_sites agree and
    minima(new) < (1 + ltol) * lengths(old) componentwise. `spacegroup` and
    `volume_per_atom` only order the comparisons (matcher tolerances and volume scaling
    let matching structures differ in both).
    """

    formula: str
    n_sites: int = Field(..., description="sites of the reduced (Niggli + primitive) cell")
    minima: list[float] = Field(..., description="successive minima of the reduced lattice / (V/n)^(1/3)")
    lengths: list[float] = Field(..., description="sorted reduced-cell lengths / (V/n)^(1/3)")
    spacegroup: int | None = Field(None, description="when known (Score does not run spglib for it)")
    volume_per_atom: float


class Candidate(_Doc):
    """One structure moving through an iteration; stages fill in their fields."""

    provenance: Provenance
    structure: Structure
    status: Literal["generated", "relaxed", "rejected"] = "generated"
    reject_reason: str | None = None
    # Relax
    energy: float | None = None
    energy_per_atom: float | None = None
    max_force: float | None = None
    stress: list[list[float]] | None = None
    relax_steps: int | None = None
    converged: bool | None = None
    model: str | None = Field(None, description="force field that produced the energy")
    # Score
    e_hull: float | None = None
    is_stable: bool | None = None
    is_unique: bool | None = None
    is_novel: bool | None = None
    match_key: MatchKey | None = Field(None, description="S.U.N. matching key, stored by Score")
    # Select
    delta_entropy: float | None = None
    selected: bool = False

    @property
    def id(self) -> str:
        return self.provenance.candidate_id

    @property
    def is_sun(self) -> bool:
        return bool(self.is_stable and self.is_unique and self.is_novel)

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


class ReferenceEntry(_Doc):
    """A structure on the reference hull side, with its energy from `model`."""

    entry_id: str
    structure: Structure
    energy_per_atom: float
    model: str
    source: str = Field(..., description="prototype, seed file, materials_project, iteration k")
    match_key: MatchKey | None = None


class Frame(_Doc):
    """A labelled configuration for training: energy, forces, stress."""

    frame_id: str
    structure: Structure
    energy: float
    forces: list[list[float]]
    stress: list[list[float]] | None = None
    kind: Literal["unperturbed", "perturbed", "relax_step", "static"]
    labeller: str = Field(..., description="e.g. 'teacher:chgnet-0.3.0 (stand-in for DFT)', 'cp2k'")
    provenance: Provenance
    label_seed: int | None = None
    delta_entropy: float | None = None

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.structure)


class IterationDocument(_Doc):
    """Everything one iteration measured: what the loop and `cscflow status` read."""

    iteration: int
    n_generated: int = 0
    n_relaxed: int = 0
    n_rejected: int = 0
    n_stable: int = 0
    n_unique: int = 0
    n_novel: int = 0
    n_sun: int = 0
    n_selected: int = 0
    n_labelled: int = 0
    n_train_total: int = 0
    entropy_candidates: float | None = None
    entropy_training: float | None = Field(None, description="H (eq. 1, all environments) of the training set")
    dh_dn: float | None = Field(None, description="dH/dN at N = n_train along the δH ranking (Fig. 3a)")
    n_train: int | None = Field(None, description="frames in the training set (N_train)")
    dh_dn_curve: list[list[float | None]] = Field(
        default_factory=list, description="[N, H, dH/dN] along the δH ranking of the training set"
    )
    entropy_gain: float | None = None
    sun_ratio: float | None = None
    stable_ratio: float | None = None
    unique_ratio: float | None = None
    novel_ratio: float | None = None
    e_hull_by_condition: dict[str, list[float]] = Field(default_factory=dict)
    energy_rmse: float | None = Field(None, description="eV/atom, held-out frames")
    force_rmse: float | None = Field(None, description="eV/Å, held-out frames")
    model_path: str | None = None
    rejection_reasons: dict[str, int] = Field(default_factory=dict)


class LoopState(_Doc):
    """Serialisable state handed from one iteration's trigger to the next.

    Holds ids and uuids, never structures: stages receive OutputReferences built from
    these uuids and jobflow resolves them from the store.
    """

    run_id: str
    spec: dict[str, Any]
    iteration: int = 0
    reference_uuid: str | None = Field(None, description="job holding the iteration-0 references")
    scored_uuids: list[str] = Field(default_factory=list, description="Score jobs of past iterations")
    labelled_uuids: list[str] = Field(default_factory=list, description="Label jobs of past iterations")
    train_uuid: str | None = Field(None, description="Train job of the last iteration (its train_frame_ids)")
    model_path: str | None = Field(None, description="frozen force field of the last Train")
    model_checkpoint: str | None = Field(None, description="training checkpoint to continue from")
    generator_checkpoint: str | None = Field(None, description="generator model for the next Generate")
    history: list[IterationDocument] = Field(default_factory=list)
    converged: bool = False
    stop_reason: str | None = None


def field_of(obj, name: str, default=None):
    """A field of a stage output whether it arrives as the pydantic document or, from a store,
    as its dict form; `default` when absent or None."""
    if obj is None:
        return default
    value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return default if value is None else value


def flatten_documents(items, model: type[BaseModel]) -> list:
    """`model` documents of one iteration or of (nested) per-iteration lists, in order; dict
    forms (from a store) are decoded, anything else is a TypeError."""
    flat: list = []
    for item in items or ():
        if isinstance(item, model):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(flatten_documents(item, model))
        elif isinstance(item, dict):
            from monty.json import MontyDecoder

            decoded = MontyDecoder().process_decoded(item)  # a dict still when its class cannot be imported
            if not isinstance(decoded, model):
                decoded = model.model_validate({k: v for k, v in decoded.items() if not k.startswith("@")})
            flat.append(decoded)
        else:
            raise TypeError(f"expected {model.__name__} or a list of them, got {type(item).__name__}")
    return flat
