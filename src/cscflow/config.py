"""Exploration specification: one YAML file per chemical system, validated by pydantic.

Every stage reads its own settings block; unknown keys are errors so that a typo in a
spec never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "ChemicalSystem",
    "CP2KSettings",
    "ConvergenceSettings",
    "DispatchSettings",
    "ExplorationSpec",
    "ForceFieldSettings",
    "GeneratorSettings",
    "LabelSettings",
    "RelaxSettings",
    "ScoreSettings",
    "SelectionSettings",
    "SpecError",
    "read_spec_mapping",
    "StoreSettings",
    "CHGNetTrainSettings",
    "MACETrainSettings",
    "MatterSimTrainSettings",
    "SevenNetTrainSettings",
    "TrainingSettings",
    "load_spec",
]


class SpecError(ValueError):
    """A user error in an exploration spec, already phrased for the command line."""


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # MSONable protocol: FireWorks serialises each job (and the Maker holding these settings)
    # with monty's non-strict jsanitize, which turns plain pydantic models into strings.
    def as_dict(self) -> dict:
        return {"@module": type(self).__module__, "@class": type(self).__name__, **self.model_dump(mode="json")}

    @classmethod
    def from_dict(cls, d: dict):
        return cls.model_validate({k: v for k, v in d.items() if not k.startswith("@")})


def _existing_file(value: Path | None, setting: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"file not found: {path} (set {setting} to an existing path)")
    return path.resolve()


class ChemicalSystem(_Settings):
    """Elements of the explored system and the cell sizes the generators may use."""

    elements: list[str] = Field(..., description="Element symbols, e.g. [Li, P, S]")
    min_atoms: int = Field(2, ge=1, description="Fewest atoms per generated cell")
    max_atoms: int = Field(16, ge=1, description="Most atoms per generated cell")

    @field_validator("elements")
    @classmethod
    def _check_elements(cls, value: list[str]) -> list[str]:
        from pymatgen.core.periodic_table import Element

        if not value:
            raise ValueError("the chemical system is empty: list at least one element")
        cleaned = []
        for symbol in value:
            symbol = str(symbol).strip()
            if not Element.is_valid_symbol(symbol):
                raise ValueError(f"unknown element {symbol!r}")
            if symbol in cleaned:
                raise ValueError(f"element {symbol!r} is listed twice")
            cleaned.append(symbol)
        return cleaned

    @model_validator(mode="after")
    def _check_range(self) -> ChemicalSystem:
        if self.min_atoms > self.max_atoms:
            raise ValueError(
                f"min_atoms ({self.min_atoms}) is larger than max_atoms ({self.max_atoms})"
            )
        return self

    @property
    def chemsys(self) -> str:
        """pymatgen-style chemical system string, elements sorted: 'Li-P-S'."""
        return "-".join(sorted(self.elements))


class GeneratorSettings(_Settings):
    """Candidate generation per iteration: `num_per_condition` structures per condition."""

    backend: Literal["pyxtal", "mattergen", "chggen"] = "pyxtal"
    num_per_condition: int = Field(16, ge=1)
    # Fan-out: at most this many structures per Generate job (one GPU worker each); None: one
    # job per condition. Batches of a condition draw from default_rng([seed, iteration, idx, start]).
    per_job: int | None = Field(None, ge=1)
    # Target E_hull conditions (eV/atom), as in the paper: 0.00, 0.03, 0.06.
    conditions: list[float] = Field(default_factory=lambda: [0.0, 0.03, 0.06])
    # pyxtal: space groups are drawn from this range; volume prior scales atomic volumes.
    min_space_group: int = Field(2, ge=1, le=230)
    max_space_group: int = Field(230, ge=1, le=230)
    volume_factor: float = Field(1.0, gt=0.1, lt=10)
    max_attempts_per_structure: int = Field(20, ge=1)
    # MatterGen / CHGGen: checkpoint directory, sampling knobs.
    checkpoint: Path | None = None
    guidance_factor: float = Field(2.0, ge=0)
    batch_size: int = Field(16, ge=1)
    diffusion_steps: int | None = Field(None, ge=1)
    device: str = "auto"
    # Per-iteration fine-tuning of the generator on labelled E_hull (MatterGen only).
    finetune: bool = True
    finetune_steps: int = Field(200, ge=1)
    finetune_batch_size: int = Field(16, ge=1)
    finetune_lr: float | None = Field(None, gt=0)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value):
        return _existing_file(value, "generator.checkpoint")

    @model_validator(mode="after")
    def _check(self) -> GeneratorSettings:
        if not self.conditions:
            raise ValueError("conditions is empty: give at least one target E_hull")
        if self.min_space_group > self.max_space_group:
            raise ValueError("min_space_group is larger than max_space_group")
        if self.backend in ("mattergen", "chggen") and self.checkpoint is None:
            raise ValueError(
                f"backend {self.backend!r} needs a model: set generator.checkpoint"
            )
        return self


class ForceFieldSettings(_Settings):
    """The MLFF that relaxes and scores candidates (and is fine-tuned each iteration)."""

    backend: Literal["chgnet", "deepmd", "mace", "mattersim", "sevenn"] = "chgnet"
    # chgnet: a version shipped in the wheel ("0.3.0", "0.2.0", "r2scan") or a file.
    chgnet_version: str = "0.3.0"
    # sevenn: a model shipped in the wheel ("7net-0", "7net-l3i5"); a file goes in model_path.
    sevenn_model: str = "7net-0"
    # deepmd/mace/mattersim (and fine-tuned chgnet/sevenn): path of a model / checkpoint file.
    model_path: Path | None = None
    # deepmd multi-task pretrained models (e.g. DPA-3.1-3M) need a branch ("head").
    model_branch: str | None = None
    device: str = "cpu"

    @field_validator("model_path")
    @classmethod
    def _model_exists(cls, value):
        return _existing_file(value, "forcefield.model_path")

    @model_validator(mode="after")
    def _check(self) -> ForceFieldSettings:
        if self.backend not in ("chgnet", "sevenn") and self.model_path is None:
            raise ValueError(
                f"backend {self.backend!r} needs a model file: set forcefield.model_path"
            )
        return self


class RelaxSettings(_Settings):
    """Cell + positions relaxation: an optimizer, a cell filter, an engine and reject gates."""

    optimizer: Literal["FIRE", "BFGS", "LBFGS"] = "FIRE"
    fmax: float = Field(0.05, gt=0, description="eV/Å")
    steps: int = Field(300, ge=1)
    cell_filter: Literal["frechet", "exp", "none"] = "frechet"
    # ase: one structure at a time (atomate2's AseRelaxer); torchsim: batched FIRE on the
    # model's device (torch-sim autobatching); auto: torchsim on a GPU when the model has a
    # torch-sim wrapper and the optimizer is FIRE, else ase.
    engine: Literal["ase", "torchsim", "auto"] = "auto"
    # candidates per relax job when the stage fans out (cscflow.relax.RelaxShardMaker)
    shard_size: int = Field(256, ge=1)
    # Sanity gates: a structure outside them is rejected and recorded, never crashes.
    min_interatomic_distance: float = Field(0.6, ge=0, description="Å")
    max_volume_per_atom: float = Field(150.0, gt=0, description="Å^3/atom")
    max_abs_energy_per_atom: float = Field(50.0, gt=0, description="eV/atom")

    @model_validator(mode="after")
    def _engine_fits(self) -> RelaxSettings:
        if self.engine == "torchsim" and self.optimizer != "FIRE":
            raise ValueError(
                f"relax.engine 'torchsim' runs FIRE only (torch-sim 0.3.0): set relax.optimizer "
                f"to FIRE or relax.engine to ase (got optimizer {self.optimizer!r})"
            )
        return self


class ScoreSettings(_Settings):
    """E_hull against the reference hull and the S.U.N. flags (paper Methods 4.1)."""

    stability_threshold: float = Field(0.1, description="E_hull < this is 'stable' (eV/atom)")
    reevaluate_shard_size: int = Field(
        2048, ge=1, description="structures per re-evaluation job when the force field changed"
    )
    ltol: float = 0.2
    stol: float = 0.3
    angle_tol: float = 5.0


class EhullBin(_Settings):
    low: float | None = Field(None, description="inclusive lower edge (None: -inf)")
    high: float = Field(..., description="exclusive upper edge, eV/atom")
    quota: int = Field(..., ge=0)


def _paper_bins() -> list[EhullBin]:
    return [
        EhullBin(low=None, high=0.0, quota=100),
        EhullBin(low=0.0, high=0.03, quota=200),
        EhullBin(low=0.03, high=0.10, quota=300),
    ]


class SelectionSettings(_Settings):
    """Which candidates go to DFT: E_hull bins with quotas (paper Methods 4.2), random inside
    a bin (seeded) by default; entropy ranks the labelled *frames* for training (Methods 4.3).
    The entropy_* fields are the QUESTS settings every entropy stage uses."""

    bins: list[EhullBin] = Field(default_factory=_paper_bins)
    quota_scale: float = Field(1.0, gt=0)
    only_sun: bool = True
    within_bin: Literal["random", "entropy"] = Field(
        "random", description="order inside a bin: seeded random (paper) or greedy δH (option)"
    )
    entropy_cutoff: float = Field(5.0, gt=0, description="QUESTS descriptor cutoff, Å")
    entropy_k: int = Field(32, ge=1, description="QUESTS neighbours")
    bandwidth: float = Field(0.015, gt=0, description="QUESTS kernel bandwidth")
    entropy_device: str = Field("auto", description="'auto' (CUDA via quests.gpu when torch sees a GPU), 'cpu', 'cuda'")
    entropy_batch_size: int = Field(2000, ge=1, description="rows per QUESTS kernel block (memory ~ batch² × 8 B)")


class CP2KSettings(_Settings):
    """CP2K (Quickstep, GPW) labeller: PBE, MOLOPT basis, GTH potentials; light defaults for laptops/CI."""

    # None: $CSCFLOW_CP2K_COMMAND, else "cp2k_shell" (Debian's cp2k package); run in shell mode.
    command: str | None = None
    data_dir: Path | None = Field(None, description="CP2K_DATA_DIR (basis/potential files)")
    xc: str = "PBE"
    basis_set: str = "DZVP-MOLOPT-SR-GTH"
    basis_set_file: str = "BASIS_MOLOPT"
    pseudo_potential: str = "GTH-PBE"
    potential_file: str = "GTH_POTENTIALS"
    cutoff: float = Field(250.0, gt=0, description="finest grid cutoff, Ry")
    rel_cutoff: float = Field(40.0, gt=0, description="Ry")
    kspacing: float = Field(0.5, gt=0, description="Monkhorst-Pack n_i = ceil(|b_i| / kspacing), 1/Å incl. 2π")
    max_scf: int = Field(100, ge=1)
    eps_scf: float = Field(1e-6, gt=0)
    smearing_temperature: float = Field(300.0, ge=0, description="Fermi-Dirac, K; 0 = off")
    added_mos: int = Field(10, ge=0)
    threads: int = Field(1, ge=1, description="OMP_NUM_THREADS of the CP2K process")
    # Deprecated: the protocol's relaxation limits hold for every engine (labeller.relax_fmax,
    # labeller.relax_steps); values set here are moved there by LabelSettings.
    relax_fmax: float | None = Field(None, gt=0, description="deprecated: use labeller.relax_fmax")
    relax_steps: int | None = Field(None, ge=1, description="deprecated: use labeller.relax_steps")


class LabelSettings(_Settings):
    """Labelled frames for training. `teacher` is a pretrained MLFF standing in for DFT.

    Every backend runs the same protocol (cscflow.label.protocol); they differ only in the
    energy engine: `teacher` uses the force field `teacher` (any one cscflow.forcefields
    loads), cp2k/vasp real DFT.
    """

    backend: Literal["teacher", "cp2k", "vasp"] = "teacher"
    teacher: ForceFieldSettings = Field(default_factory=ForceFieldSettings)
    # Older specs: the CHGNet version of the teacher (sets teacher.chgnet_version).
    teacher_chgnet_version: str | None = None
    copies_per_structure: int = Field(3, ge=1)
    position_sigma: tuple[float, float] = (0.08, 0.15)
    lattice_strain: tuple[float, float] = (0.03, 0.05)
    # DFT protocol (paper Methods 4.2; cscflow.label.protocol): per selected structure,
    # copies_per_structure perturbed relaxations, relax_frames_kept (low, high) ionic steps
    # kept from each (first and last always), statics_per_structure perturbed statics.
    relax_frames_kept: tuple[int, int] = (1, 5)
    statics_per_structure: int = Field(5, ge=0)
    # Protocol relaxations (every engine: teacher, cp2k; vasp uses its MPRelaxSet criteria).
    relax_fmax: float = Field(0.05, gt=0, description="eV/Å, positions + cell (FrechetCellFilter)")
    relax_steps: int = Field(60, ge=1, description="most ionic steps per protocol relaxation")
    cp2k: CP2KSettings = Field(default_factory=CP2KSettings)

    @model_validator(mode="before")
    @classmethod
    def _teacher_version(cls, data):
        if isinstance(data, dict) and data.get("teacher_chgnet_version") is not None:
            data = {**data, "teacher": {"backend": "chgnet", "chgnet_version": data["teacher_chgnet_version"]},
                    "teacher_chgnet_version": None}
        return _lift_cp2k_relax_limits(data)


def _lift_cp2k_relax_limits(data):
    """Older specs set the protocol's relaxation limits as labeller.cp2k.relax_*: move them
    to labeller.relax_* (an explicit labeller.relax_* wins), with one deprecation line."""
    if not isinstance(data, dict) or data.get("cp2k") is None:
        return data
    cp2k = data["cp2k"]
    old = cp2k.model_dump(exclude_none=True) if isinstance(cp2k, CP2KSettings) else dict(cp2k)
    moved = {key: old.pop(key) for key in ("relax_fmax", "relax_steps") if old.get(key) is not None}
    if not moved:
        return data
    import logging

    logging.getLogger(__name__).warning(
        "labeller.cp2k.%s is deprecated: set labeller.%s (the protocol's relaxation limits, any engine)",
        "/".join(moved), "/".join(moved),
    )
    return {**moved, **data, "cp2k": old}


class CHGNetTrainSettings(_Settings):
    """CHGNet (``chgnet.trainer.Trainer``); fine-tunes the wheel's pretrained model by default."""

    # wheel version to fine-tune ("0.3.0", "0.2.0", "r2scan") or a model file; None: from scratch.
    pretrained: str | None = "0.3.0"
    epochs: int = Field(50, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    scheduler: Literal["CosLR", "ExponentialLR", "CosRestartLR"] = "CosLR"
    energy_loss_ratio: float = 1.0
    force_loss_ratio: float = 1.0
    stress_loss_ratio: float = 0.1
    criterion: Literal["MSE", "Huber", "MAE"] = "MSE"
    # "last_layers": freeze embeddings, basis expansions, bond/angle layers and the first
    # three atom convolutions, as CHGNet's fine-tuning example does; "all": train everything.
    trainable: Literal["all", "last_layers"] = "all"
    # Refit the per-element reference energies (AtomRef) to the training labels first:
    # another code's energy offset is absorbed there, not by the message-passing weights.
    refit_atom_ref: bool = True
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    # CHGNet(**model_args) for from-scratch models (e.g. small sizes in tests)
    model_args: dict[str, Any] = Field(default_factory=dict)


class SevenNetTrainSettings(_Settings):
    """SevenNet (``sevenn`` CLI); defaults are its ``fine_tune`` preset from 7net-0."""

    # model shipped in the wheel ("7net-0", "7net-l3i5") or a checkpoint file; None: from scratch.
    pretrained: str | None = "7net-0"
    epochs: int = Field(100, ge=1)
    learning_rate: float = Field(0.004, gt=0)
    lr_gamma: float = Field(0.99, gt=0, le=1, description="exponential decay per epoch")
    batch_size: int = Field(4, ge=1)
    force_loss_weight: float = 1.0
    stress_loss_weight: float = 0.01
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    # from-scratch sizes (a fine-tune keeps the checkpoint's architecture)
    cutoff: float = Field(5.0, gt=0)
    channel: int = Field(32, ge=1)
    lmax: int = Field(1, ge=0)
    num_convolution_layer: int = Field(3, ge=1)


class MACETrainSettings(_Settings):
    """MACE (``mace_run_train``); paper: 400 epochs EMA + 100 SWA, lr 0.01 x0.8 on plateau."""

    epochs: int = Field(400, ge=1, description="EMA epochs before SWA")
    swa_epochs: int = Field(100, ge=0, description="SWA epochs at swa_lr after `epochs`")
    lr: float = Field(0.01, gt=0)
    lr_factor: float = Field(0.8, gt=0, lt=1)
    scheduler_patience: int = Field(20, ge=1, description="epochs of validation plateau before lr x lr_factor")
    swa_lr: float = Field(1e-3, gt=0)
    ema_decay: float = Field(0.99, gt=0, lt=1)
    validation_fraction: float = Field(0.05, gt=0, lt=1)
    r_max: float = Field(5.0, gt=0)
    batch_size: int = Field(4, ge=1)
    # mace's "weighted" loss weights (its defaults)
    energy_weight: float = Field(1.0, ge=0)
    forces_weight: float = Field(100.0, ge=0)
    stress_weight: float = Field(1.0, ge=0)
    # from-scratch model size (a foundation model keeps its own)
    model: str = "MACE"
    num_channels: int = Field(32, ge=1)
    max_L: int = Field(1, ge=0)
    num_interactions: int = Field(2, ge=1)
    correlation: int = Field(3, ge=1)
    # --foundation_model FILE to fine-tune (e.g. MACE-MPA-0-medium); None: from scratch
    # (or from the previous iteration's model)
    foundation_model: Path | None = None
    # fine-tuning a foundation model:
    # multihead replay keeps the foundation head alive on replay data (local extxyz).
    multiheads_finetuning: bool = False
    replay_file: Path | None = Field(None, description="replay configurations for multihead fine-tuning")
    num_replay_samples: int = Field(10000, ge=1)
    default_dtype: Literal["float32", "float64"] = "float64"

    @field_validator("replay_file")
    @classmethod
    def _replay_exists(cls, value):
        return _existing_file(value, "training.mace.replay_file")

    @field_validator("foundation_model")
    @classmethod
    def _foundation_exists(cls, value):
        return _existing_file(value, "training.mace.foundation_model")

    @model_validator(mode="after")
    def _check(self) -> MACETrainSettings:
        if self.multiheads_finetuning and self.replay_file is None:
            raise ValueError("multiheads_finetuning needs replay data: set training.mace.replay_file")
        return self


class MatterSimTrainSettings(_Settings):
    """MatterSim (its finetune_mattersim.py); paper: 200 epochs, lr 1e-3 x0.8 every 4 epochs, 6 Å."""

    # checkpoint file to fine-tune (e.g. MatterSim-v1.0.0-5M.pth); None: a random M3GNet
    # (or the previous iteration's model)
    pretrained: Path | None = None

    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    step_size: int = Field(4, ge=1, description="epochs between lr x lr_gamma")
    lr_gamma: float = Field(0.8, gt=0, le=1)
    cutoff: float = Field(6.0, gt=0)
    threebody_cutoff: float = Field(4.0, gt=0)
    batch_size: int = Field(8, ge=1)
    force_loss_ratio: float = 1.0
    stress_loss_ratio: float = 0.1
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    early_stop_patience: int = Field(1000, ge=1)
    # refit the per-element energy shift / force scale to the training labels
    # (None: only for a model from scratch)
    re_normalize: bool | None = None
    # from-scratch M3GNet size (a fine-tune keeps the checkpoint's)
    num_blocks: int = Field(4, ge=1)
    units: int = Field(128, ge=1)

    @field_validator("pretrained")
    @classmethod
    def _pretrained_exists(cls, value):
        return _existing_file(value, "training.mattersim.pretrained")


class TrainingSettings(_Settings):
    """MLFF training (cscflow.trainers): `backend` picks the family, its block the schedule.

    The flat DPA-3 keys (pretrained, model_branch, epochs, numb_steps, lr, prefactors,
    sizes) are deepmd's and follow the paper (Methods 4.3); the chgnet/sevenn/mace/
    mattersim blocks hold theirs, each with its own start model: `mace.foundation_model`
    (MACE-MPA-0-medium), `mattersim.pretrained` (MatterSim-5M), `chgnet.pretrained` /
    `sevenn.pretrained` (a model shipped in the wheel, or a file).
    """

    backend: Literal["deepmd", "mace", "mattersim", "chgnet", "sevenn", "none"] = "deepmd"
    pretrained: Path | None = None
    model_branch: str | None = None
    n_train: int = Field(4050, ge=1, description="top-N frames of the greedy δH ranking (datasets.split_frames)")
    # Fig. 3a's axis: N_train grows as labelled frames accumulate. Iteration k trains on the
    # top min(n_train, k * n_train_per_iteration) frames; None: n_train in every iteration.
    n_train_per_iteration: int | None = Field(
        None, ge=1, description="frames added to N_train per iteration, up to n_train"
    )
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="seeded per-frame holdout, only when the paper rule leaves no test frame"
    )
    # Paper: the training pool is iterations 0-3; later iterations are test-only.
    train_iterations_max: int = Field(3, ge=0, description="last iteration whose frames may be trained on")
    # torch trainers (chgnet, sevenn, mace, mattersim): "auto" = cuda when present.
    device: str = "auto"
    # Paper: ~50 epochs (~50 x N_train steps); numb_steps overrides when set.
    epochs: float = Field(50.0, gt=0)
    numb_steps: int | None = Field(None, ge=1)
    start_lr: float = 1e-3
    stop_lr: float = 3e-5
    decay_steps: int = Field(2000, ge=1)
    start_pref_e: float = 0.2
    limit_pref_e: float = 20.0
    start_pref_f: float = 100.0
    limit_pref_f: float = 60.0
    start_pref_v: float = 0.02
    limit_pref_v: float = 1.0
    rcut: float = 6.0
    rcut_smth: float = 0.5
    # DPA-3 size (from-scratch models only); the paper fine-tunes DPA-3.1-3M.
    n_dim: int = 32
    e_dim: int = 16
    a_dim: int = 8
    nlayers: int = 2
    batch_size: int | Literal["auto"] = "auto"
    chgnet: CHGNetTrainSettings = Field(default_factory=CHGNetTrainSettings)
    sevenn: SevenNetTrainSettings = Field(default_factory=SevenNetTrainSettings)
    mace: MACETrainSettings = Field(default_factory=MACETrainSettings)
    mattersim: MatterSimTrainSettings = Field(default_factory=MatterSimTrainSettings)
    # Paper Methods 4.1: iteration k relaxes and scores (hull re-evaluated) with the model
    # fine-tuned on the DFT data so far. False keeps the starting force field (open loop).
    relax_with_trained_model: bool = True
    seed: int = 1

    @field_validator("pretrained")
    @classmethod
    def _pretrained_exists(cls, value):
        return _existing_file(value, "training.pretrained")

    def n_train_at(self, iteration: int) -> int:
        """N_train of the Train stage of `iteration` (>= 1)."""
        if self.n_train_per_iteration is None:
            return self.n_train
        return min(self.n_train, max(1, iteration) * self.n_train_per_iteration)


DH_DN_THRESHOLDS = {"pre-screening": 1e-3, "accurate": 1e-4}


class ConvergenceSettings(_Settings):
    """When the loop stops: dH/dN saturation (Fig. 3a) or max_iterations.

    dH/dN is the increase of H of the training set per added frame along the δH ranking,
    at N = N_train, averaged over the last `dh_dn_window` frames. Paper: dH/dN < 1e-3 is
    enough for pre-screening, < 1e-4 for accurate models (`target`); `dh_dn_threshold`
    overrides the target's value when set.
    """

    max_iterations: int = Field(3, ge=1)
    target: Literal["pre-screening", "accurate"] = "accurate"
    dh_dn_threshold: float | None = Field(None, ge=0, description="None: the target's paper value")
    dh_dn_window: int = Field(10, ge=1, description="frames over which dH/dN is averaged")
    entropy_gain_epsilon: float = Field(0.0, ge=0)
    min_iterations: int = Field(1, ge=1)

    @property
    def threshold(self) -> float:
        return DH_DN_THRESHOLDS[self.target] if self.dh_dn_threshold is None else self.dh_dn_threshold


class StoreSettings(_Settings):
    """Results store: embedded MontyStore (default) or MongoDB when `uri` is set."""

    uri: str | None = None
    database: str = "cscflow"
    docs_collection: str = "outputs"
    data_collection: str = "outputs_data"
    timeout_ms: int = Field(5000, ge=100)


def _default_categories() -> dict[str, str | None]:
    gpu = ("generate", "relax", "reevaluate", "train", "finetune_generator")
    cpu = ("references", "score", "select", "label", "evaluate", "trigger")
    return {**{s: "gpu" for s in gpu}, **{s: "cpu" for s in cpu}}


class RemoteWorkerSettings(_Settings):
    """The jobflow-remote worker (and its run settings) that takes one category's jobs."""

    worker: str = Field(..., min_length=1, description="worker name in the jobflow-remote project")
    exec_config: str | None = Field(None, description="named exec_config of the project (modules, env)")
    resources: dict[str, Any] | None = Field(None, description="qtoolkit resources, e.g. {gpus_per_job: 1}")


#: stage-name suffixes of the jobs a stage fans out into (cscflow.loop, relax, label, generators)
FAN_OUT_UNITS = ("batch", "shard", "structure", "collect")


class DispatchSettings(_Settings):
    """Where each stage runs: FireWorks `_category` (GPU work to GPU workers, DFT to CPU
    workers) and, for jobflow-remote, the worker that takes each category."""

    categories: dict[str, str | None] = Field(default_factory=_default_categories)
    remote_workers: dict[str, RemoteWorkerSettings] = Field(
        default_factory=dict, description="category -> jobflow-remote worker; empty: FireWorks only"
    )

    def category(self, stage: str) -> str | None:
        """The stage's category; a fan-out unit (``relax_shard``, ``generate_batch``,
        ``label_structure``, ``*_collect``) runs where its stage runs."""
        category = self.categories.get(stage)
        if category is None and stage == "link":  # link jobs run where the trigger runs
            category = self.categories.get("trigger")
        if category is None and stage == "reevaluate":  # the relaxing model, on its workers
            category = self.categories.get("relax")
        if category is None and stage not in self.categories and "_" in stage:
            parent, _, unit = stage.rpartition("_")
            if unit in FAN_OUT_UNITS:
                category = self.categories.get(parent)
        return category

    def manager_config(self, stage: str) -> dict[str, Any]:
        """The job's manager_config: `_category` for FireWorks, worker/exec_config/resources
        for jobflow-remote (set only when `remote_workers` names the category)."""
        category = self.category(stage)
        if category is None:
            return {}
        config: dict[str, Any] = {"_category": category}
        remote = self.remote_workers.get(category)
        if remote is not None:
            config.update(remote.model_dump(exclude_none=True))
        return config


class ExplorationSpec(_Settings):
    """The whole exploration: what to explore, each stage's settings, where results go."""

    name: str = "exploration"
    chemical_system: ChemicalSystem
    seeds: list[Path] = Field(default_factory=list, description="iteration-0 structure files")
    seed_errors: Literal["skip", "raise"] = Field(
        "skip",
        description="seed structures outside the chemical system or disordered: skip them with a warning, or "
        "stop (raise); a listed seed file that cannot be read is always an error",
    )
    # Built-in iteration-0 references (no files, no network): "auto" = the shipped Materials
    # Project snapshot for the chemical system it covers exactly (Li-P-S), prototypes otherwise.
    use_prototypes: bool = True
    builtin_references: Literal["auto", "mp_snapshot", "prototypes"] = "auto"
    prototype_max_atoms: int | None = Field(
        None, ge=1, description="skip larger built-in references (e.g. the 32-atom alpha-S8 cell in cheap DFT demos)"
    )
    materials_project: bool = False
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings)
    forcefield: ForceFieldSettings = Field(default_factory=ForceFieldSettings)
    relax: RelaxSettings = Field(default_factory=RelaxSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    labeller: LabelSettings = Field(default_factory=LabelSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    convergence: ConvergenceSettings = Field(default_factory=ConvergenceSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    seed: int = 42

    @field_validator("seeds")
    @classmethod
    def _seeds_exist(cls, value: list[Path]) -> list[Path]:
        return [_existing_file(p, "seeds") for p in value]

    @property
    def max_iterations(self) -> int:
        return self.convergence.max_iterations

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExplorationSpec:
        return load_spec(path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if item["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(lines)


def read_spec_mapping(path: str | Path) -> dict:
    """The spec file's raw settings mapping; a missing file or bad YAML is a SpecError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping of settings")
    return raw


def load_spec(path: str | Path, model: type[ExplorationSpec] = ExplorationSpec) -> ExplorationSpec:
    """Read and validate a spec (an ExplorationSpec or a subclass such as the CHGGen spec);
    relative file paths are taken relative to the spec."""
    path = Path(path)
    raw = read_spec_mapping(path)
    base = path.resolve().parent
    _resolve_relative_paths(raw, base)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_validation_error(str(path), err)) from None


_PATH_KEYS = {
    ("seeds",): True,
    ("generator", "checkpoint"): False,
    ("forcefield", "model_path"): False,
    ("training", "pretrained"): False,
    ("training", "mace", "replay_file"): False,
    ("training", "mace", "foundation_model"): False,
    ("training", "mattersim", "pretrained"): False,
}


def _resolve_relative_paths(raw: dict, base: Path) -> None:
    def fix(value):
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str(base / value)
        return value

    for keys, is_list in _PATH_KEYS.items():
        node = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or keys[-1] not in node:
            continue
        value = node[keys[-1]]
        node[keys[-1]] = [fix(v) for v in value] if is_list and isinstance(value, list) else fix(value)
