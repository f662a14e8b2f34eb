"""MatterGen inside its own environment: checkpoints, data, training, fine-tuning, sampling.

Runs only in ``.venv-mattergen`` (numpy<2). :func:`setup` must be called before anything
imports mattergen: it registers the pure-PyTorch scatter/sparse modules when the compiled
ones are absent and points GemNet's hard-coded scale-file path at a neutral file of ours
(the wheel lacks ``common/gemnet/gemnet-dT.json``; trained checkpoints carry their scale
factors in the state dict, so the file only matters for models built from scratch).

A checkpoint is a directory laid out like MatterGen's releases: ``config.yaml`` (hydra-
instantiable, ``lightning_module`` key) + ``checkpoints/last.ckpt``; ours add
``cscflow.json`` (atom-count distribution of the training set, parent checkpoint, losses).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import compat

logger = logging.getLogger("mattergen_worker")

META_FILE = "cscflow.json"
_SETUP_DONE = False


def setup() -> None:
    """Compatibility modules + GemNet scale file; idempotent, before importing mattergen."""
    global _SETUP_DONE
    if _SETUP_DONE:
        return
    compat.install()
    import mattergen.common.gemnet.gemnet as gemnet_mod

    root = Path(tempfile.mkdtemp(prefix="cscflow-gemnet-"))
    (root / "common" / "gemnet").mkdir(parents=True)
    gemnet_mod.MODELS_PROJECT_ROOT = root
    global _SCALE_FILE
    _SCALE_FILE = root / "common" / "gemnet" / "gemnet-dT.json"
    reset_scale_file()
    _SETUP_DONE = True


_SCALE_FILE: Path | None = None


def reset_scale_file() -> None:
    """Neutral scale file: no factor fitted, each ScaleFactor starts at 1.0.

    Loaded checkpoints overwrite the factors from their state dict; a model trained from
    scratch gets them fitted on its training data first (:func:`fit_scale_factors`).
    """
    _SCALE_FILE.write_text(json.dumps({"comment": "cscflow neutral GemNet scale factors"}))


def fit_scale_factors(lm_cfg: dict, dataloader, n_batches: int = 4):
    """Instantiate a from-scratch module with GemNet's scale factors fitted on data.

    GemNet's AutomaticFit (variance-preserving factors, fitted layer by layer on forward
    passes of noised training batches) replaces the fitted gemnet-dT.json the wheel lacks.
    """
    import torch

    from mattergen.common.gemnet.layers.scaling import AutomaticFit

    reset_scale_file()
    AutomaticFit.queue = None
    AutomaticFit.set2fitmode()
    try:
        module = instantiate_module(lm_cfg)
        batches = []
        for b in dataloader:
            batches.append(b)
            if len(batches) >= n_batches:
                break
        n_fitted = 0
        with torch.no_grad():
            while not AutomaticFit.fitting_completed() and AutomaticFit.activeVar is not None:
                for b in batches:
                    module.diffusion_module.calc_loss(b)
                AutomaticFit.activeVar.fit()
                n_fitted += 1
    finally:
        AutomaticFit.fitting_mode = False
        AutomaticFit.reset()
        AutomaticFit.queue = None
        reset_scale_file()
    return module, n_fitted


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available in this environment")
    return device


# --------------------------------------------------------------------------- checkpoints


def _ckpt_file(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    hits = sorted(path.rglob("last.ckpt")) or sorted(path.rglob("*.ckpt"))
    if not hits:
        raise FileNotFoundError(f"no MatterGen checkpoint (*.ckpt) under {path}")
    return hits[0]


def _config_file(path: Path) -> Path:
    path = Path(path)
    start = path.parent if path.is_file() else path
    for d in (start, start.parent, start.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    raise FileNotFoundError(f"no config.yaml for the MatterGen checkpoint {path}")


def read_meta(path: str | Path) -> dict:
    cfg_dir = _config_file(Path(path)).parent
    f = cfg_dir / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def load_config(path: str | Path) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(_config_file(Path(path))), resolve=True)
    if "lightning_module" not in cfg:
        raise ValueError(f"{path}: config.yaml has no 'lightning_module' section")
    return cfg


def set_num_steps(lm_cfg: dict, num_steps: int) -> None:
    """Set the D3PM step count (the standard absorbing schedule is step-count free)."""
    d3pm = lm_cfg["diffusion_module"]["corruption"]["discrete_corruptions"]["atomic_numbers"]["d3pm"]
    d3pm["schedule"]["num_steps"] = int(num_steps)


def get_num_steps(lm_cfg: dict) -> int:
    d3pm = lm_cfg["diffusion_module"]["corruption"]["discrete_corruptions"]["atomic_numbers"]["d3pm"]
    return int(d3pm["schedule"]["num_steps"])


def instantiate_module(lm_cfg: dict):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # scheduler options that torch 2.13 rejects (released configs carry verbose: true)
    for sched in lm_cfg.get("scheduler_partials") or []:
        sched.get("scheduler", {}).pop("verbose", None)
    return instantiate(OmegaConf.create(lm_cfg))


def _torch_load(path: Path):
    import torch

    # Lightning checkpoints hold more than tensors; they are our own or MatterGen's releases.
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(path: str | Path, device: str = "cpu", num_steps: int | None = None):
    """(DiffusionLightningModule in eval mode, its lightning_module config) from a checkpoint."""
    setup()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MatterGen checkpoint not found: {path}")
    cfg = load_config(path)
    lm_cfg = cfg["lightning_module"]
    if num_steps is not None:
        set_num_steps(lm_cfg, num_steps)
    module = instantiate_module(lm_cfg)
    state = _torch_load(_ckpt_file(path))["state_dict"]
    result = module.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; belt and braces
        raise ValueError(f"checkpoint/config mismatch: {result}")
    module = module.to(device).eval()
    return module, lm_cfg


def save_checkpoint(out_dir: str | Path, trainer, lm_cfg: dict, meta: dict) -> Path:
    from omegaconf import OmegaConf

    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(out / "checkpoints" / "last.ckpt"), weights_only=True)
    OmegaConf.save(OmegaConf.create({"lightning_module": lm_cfg}), out / "config.yaml")
    (out / META_FILE).write_text(json.dumps(meta, indent=1, default=float))
    return out


# --------------------------------------------------------------------------- data


def read_extxyz(path: str | Path):
    """pymatgen structures + the atoms.info dicts of an extxyz file."""
    import ase.io
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = ase.io.read(str(path), index=":", format="extxyz")
    return [AseAtomsAdaptor.get_structure(a) for a in atoms], [dict(a.info) for a in atoms]


def num_atoms_distribution(structures) -> dict[int, float]:
    counts: dict[int, int] = {}
    for s in structures:
        counts[len(s)] = counts.get(len(s), 0) + 1
    total = sum(counts.values())
    return {int(k): v / total for k, v in sorted(counts.items())}


def average_density(structures) -> float:
    return float(np.mean([len(s) / s.volume for s in structures]))


def build_cached_dataset(structures, properties: dict[str, list], cache_dir: str | Path):
    """Structures -> CSV -> mattergen's cached dataset (CrystalDataset.from_csv)."""
    setup()
    from mattergen.common.data.dataset import CrystalDataset
    from pymatgen.io.cif import CifWriter

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    csv_path = cache_dir.with_suffix(".csv")
    names = list(properties)
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "cif", *names])
        for i, s in enumerate(structures):
            w.writerow([f"cscflow-{i}", str(CifWriter(s)), *[properties[n][i] for n in names]])
    CrystalDataset.from_csv(csv_path=str(csv_path), cache_path=str(cache_dir))
    return cache_dir


# --------------------------------------------------------------------------- training


def _trainer(out_dir: Path, max_steps: int, device: str, seed: int):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from mattergen.common.data.callback import SetPropertyScalers

    pl.seed_everything(seed, workers=True)
    return pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        gradient_clip_val=0.5,
        gradient_clip_algorithm="value",
        logger=CSVLogger(str(out_dir), name="logs"),
        callbacks=[SetPropertyScalers()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )


def _fit(module, lm_cfg, structures, props, out_dir, max_steps, batch_size, device, seed, meta):
    """Train ``module`` (None: build it from ``lm_cfg`` with fitted scale factors)."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .modelconf import data_module

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="data-", dir=out_dir))
    cache = build_cached_dataset(structures, props, work / "train")
    dm = instantiate(OmegaConf.create(data_module(str(cache), None, list(props), batch_size)))
    pl.seed_everything(seed, workers=True)
    if module is None:
        module, meta["n_scale_factors_fitted"] = fit_scale_factors(json.loads(json.dumps(lm_cfg)), dm.train_dataloader())
    trainer = _trainer(out_dir, max_steps, device, seed)
    t0 = time.perf_counter()
    trainer.fit(model=module, datamodule=dm)
    seconds = time.perf_counter() - t0
    loss = trainer.callback_metrics.get("loss_train")
    meta = {
        **meta,
        "num_atoms_distribution": num_atoms_distribution(structures),
        "n_structures": len(structures),
        "max_steps": max_steps,
        "steps_done": int(trainer.global_step),
        "final_loss_train": float(loss) if loss is not None else None,
        "seconds": seconds,
        "seed": seed,
        "properties": list(props),
    }
    save_checkpoint(out_dir, trainer, lm_cfg, meta)
    shutil.rmtree(work, ignore_errors=True)
    return meta


def train_from_scratch(
    structures_file: str,
    out_dir: str,
    spec: dict | None = None,
    max_steps: int = 100,
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Train an unconditional MatterGen base model (tests, tiny models) on an extxyz file."""
    setup()
    from .modelconf import ModelSpec, base_model, lightning_module

    structures, _ = read_extxyz(structures_file)
    if not structures:
        raise ValueError(f"{structures_file}: no structures to train on")
    spec_obj = ModelSpec(**(spec or {}))
    spec_obj.average_density = average_density(structures)
    lm_cfg = lightning_module(base_model(spec_obj), spec_obj)
    device = resolve_device(device)
    module = None  # built in _fit, with GemNet scale factors fitted on the training data
    meta = {"kind": "base", "spec": spec_obj.as_dict(), "parent": None, "elements": _elements(structures)}
    return _fit(module, lm_cfg, structures, {}, out_dir, max_steps, batch_size, device, seed, meta)


def finetune(
    checkpoint: str,
    structures_file: str,
    out_dir: str,
    max_steps: int = 100,
    batch_size: int = 16,
    lr: float | None = None,
    device: str = "auto",
    seed: int = 0,
    full_finetuning: bool = True,
) -> dict:
    """Fine-tune with chemical_system + energy_above_hull adapters (classifier-free guidance).

    ``structures_file``: extxyz whose atoms.info carry ``energy_above_hull`` (eV/atom).
    A base model gets adapters (as mattergen's finetune script does: GemNetTCtrl + new
    property embeddings, pretrained weights copied); a model that has them continues.
    """
    setup()
    import torch

    from .modelconf import ADAPTER_PROPERTIES, adapter_model

    structures, infos = read_extxyz(structures_file)
    if not structures:
        raise ValueError(f"{structures_file}: no structures to fine-tune on")
    try:
        e_hull = [float(i["energy_above_hull"]) for i in infos]
    except KeyError:
        raise ValueError(f"{structures_file}: every structure needs info['energy_above_hull']") from None
    if not all(math.isfinite(e) for e in e_hull):
        raise ValueError(f"{structures_file}: non-finite energy_above_hull values")
    cfg = load_config(checkpoint)
    lm_cfg = cfg["lightning_module"]
    lm_cfg["diffusion_module"]["model"] = adapter_model(lm_cfg["diffusion_module"]["model"], ADAPTER_PROPERTIES)
    if lr is not None:
        lm_cfg["optimizer_partial"]["lr"] = float(lr)
    module = instantiate_module(json.loads(json.dumps(lm_cfg)))
    pretrained = _torch_load(_ckpt_file(Path(checkpoint)))["state_dict"]
    own = module.state_dict()
    shared = own.keys() & pretrained.keys()
    own.update((k, pretrained[k]) for k in shared)
    module.load_state_dict(own, strict=True)
    if not full_finetuning:
        for name, p in module.named_parameters():
            if name in pretrained:
                p.requires_grad_(False)
    device = resolve_device(device)
    parent_meta = read_meta(checkpoint)
    meta = {
        "kind": "adapter",
        "parent": str(Path(checkpoint).resolve()),
        "spec": parent_meta.get("spec"),
        "elements": _elements(structures),
        "n_new_parameters": int(sum(own[k].numel() for k in own.keys() - shared)),
        "e_hull_mean": float(np.mean(e_hull)),
    }
    props = {"energy_above_hull": e_hull}
    torch.set_float32_matmul_precision("high")
    return _fit(module, lm_cfg, structures, props, out_dir, max_steps, batch_size, device, seed, meta)


def _elements(structures) -> list[str]:
    return sorted({el.symbol for s in structures for el in s.composition.elements})


# --------------------------------------------------------------------------- sampling


def check_sample(structure, max_volume_per_atom: float = 150.0, min_distance: float = 0.5) -> str | None:
    """Why a sampled structure is unusable (exploded/collapsed lattice, NaNs), or None."""
    lat = structure.lattice.matrix
    if not np.all(np.isfinite(lat)) or not np.all(np.isfinite(structure.frac_coords)):
        return "non_finite_coordinates"
    vol = abs(float(np.linalg.det(lat)))
    if not math.isfinite(vol) or vol <= 1e-6:
        return "collapsed_lattice"
    if vol / len(structure) > max_volume_per_atom:
        return "exploded_lattice"
    if len(structure) > 1:
        d = structure.distance_matrix
        d = d[np.triu_indices(len(structure), 1)]
        if d.size and float(d.min()) < min_distance:
            return "atoms_too_close"
    return None


def reduce_sample(structure, min_angle: float = 20.0):
    """(Niggli-reduced structure, None) or (None, 'degenerate_lattice').

    The lattice diffusion can end on a needle-thin basis of an ordinary lattice (lengths of
    hundreds of Å, angles near 0°, normal volume per atom): the same crystal, but every
    neighbour list, relaxation and DPA-3 training batch on it costs orders of magnitude more.
    Reduction returns the same crystal in its shortest basis; what is still flat after it
    is rejected.
    """
    try:
        reduced = structure.get_reduced_structure(reduction_algo="niggli")
    except Exception:  # noqa: BLE001  (pymatgen gives up on numerically flat lattices)
        return None, "degenerate_lattice"
    angles = reduced.lattice.angles
    if min(angles) < min_angle or max(angles) > 180.0 - min_angle:
        return None, "degenerate_lattice"
    return reduced, None


class Sampler:
    """A loaded model kept in-process across batches (one worker process per stage job)."""

    def __init__(self, checkpoint: str, device: str = "auto", num_steps: int | None = None):
        setup()
        self.checkpoint = str(checkpoint)
        self.device = resolve_device(device)
        t0 = time.perf_counter()
        self.module, self.lm_cfg = load_model(checkpoint, self.device, num_steps)
        self.num_steps = get_num_steps(self.lm_cfg)
        self.meta = read_meta(checkpoint)
        model = self.module.diffusion_module.model
        self.conditions = sorted(getattr(model, "cond_fields_model_was_trained_on", []))
        self.n_parameters = int(sum(p.numel() for p in self.module.parameters()))
        self.load_seconds = time.perf_counter() - t0

    def _sampler(self, guidance: float):
        from functools import partial

        from mattergen.common.diffusion.predictors_correctors import (
            LatticeAncestralSamplingPredictor,
            LatticeLangevinDiffCorrector,
        )
        from mattergen.diffusion.d3pm.d3pm_predictors_correctors import D3PMAncestralSamplingPredictor
        from mattergen.diffusion.sampling.classifier_free_guidance import GuidedPredictorCorrector
        from mattergen.diffusion.wrapped.wrapped_predictors_correctors import (
            WrappedAncestralSamplingPredictor,
            WrappedLangevinCorrector,
        )
        from mattergen.property_embeddings import SetConditionalEmbeddingType, SetUnconditionalEmbeddingType

        # MatterGen's sampling_conf/default.yaml, built here (the wheel lacks it)
        return GuidedPredictorCorrector.from_pl_module(
            pl_module=self.module,
            N=self.num_steps,
            eps_t=1.0 / self.num_steps,
            guidance_scale=float(guidance),
            remove_conditioning_fn=SetUnconditionalEmbeddingType(),
            keep_conditioning_fn=SetConditionalEmbeddingType(),
            predictor_partials={
                "pos": partial(WrappedAncestralSamplingPredictor),
                "cell": partial(LatticeAncestralSamplingPredictor),
                "atomic_numbers": partial(D3PMAncestralSamplingPredictor, predict_x0=True),
            },
            corrector_partials={
                "pos": partial(WrappedLangevinCorrector, max_step_size=1e6, snr=0.4),
                "cell": partial(LatticeLangevinDiffCorrector, max_step_size=1e6, snr=0.2),
            },
            n_steps_corrector=1,
        )

    def _sample_batch(self, sampler, num_atoms, transforms, indices, seed, depth=0):
        """[(index, structure|None, reject reason|None)] for one batch.

        A crash (a blown-up lattice empties GemNet's neighbour graph) is bisected: the two
        halves are sampled again (seeds derived from ``seed``) until the crashing samples are
        isolated, so one bad trajectory costs O(log batch) re-runs, not the whole batch.
        """
        import torch

        from mattergen.common.data.collate import collate
        from mattergen.common.data.dataset import NumAtomsCrystalDataset
        from mattergen.common.utils.data_utils import lattice_matrix_to_params_torch
        from mattergen.generator import structure_from_model_output

        ds = NumAtomsCrystalDataset(num_atoms=np.asarray(num_atoms), transforms=list(transforms))
        batch = collate([ds[i] for i in range(len(indices))]).to(self.device)
        torch.manual_seed(seed)
        try:
            _, mean = sampler.sample(batch, None)
            lengths, angles = lattice_matrix_to_params_torch(mean.cell)
            structures = structure_from_model_output(
                mean.pos.reshape(-1, 3), mean.atomic_numbers.reshape(-1),
                lengths.reshape(-1, 3), angles.reshape(-1, 3), mean.num_atoms.reshape(-1),
            )
            return [(i, s, None) for i, s in zip(indices, structures)]
        except Exception as exc:  # noqa: BLE001  (guard: never crash the loop)
            reason = f"sampling_crashed:{type(exc).__name__}"
            logger.warning("sampling %d structures crashed (%s): %s", len(indices), reason, exc)
            if len(indices) == 1:
                return [(indices[0], None, reason)]
            h = len(indices) // 2
            return self._sample_batch(
                sampler, num_atoms[:h], transforms, indices[:h], seed * 2 + 1, depth + 1
            ) + self._sample_batch(sampler, num_atoms[h:], transforms, indices[h:], seed * 2 + 2, depth + 1)

    def sample(
        self,
        n: int,
        out_file: str,
        conditions: dict[str, Any] | None = None,
        guidance_factor: float = 0.0,
        batch_size: int = 16,
        num_atoms_distribution: dict | None = None,
        seed: int = 0,
        start_index: int = 0,
        max_volume_per_atom: float = 150.0,
        min_distance: float = 0.5,
        limit_density: float | None = None,
    ) -> dict:
        """``n`` samples; valid ones go to ``out_file`` (extxyz), the rest are only counted.

        A batch whose denoising crashes (a blown-up lattice empties GemNet's neighbour graph)
        is rejected as a whole and recorded; the caller decides whether to ask again.
        """
        import ase.io
        from pymatgen.io.ase import AseAtomsAdaptor

        from mattergen.common.data.transform import SetProperty

        conditions = dict(conditions or {})
        unknown = set(conditions) - set(self.conditions)
        if unknown:
            raise ValueError(
                f"checkpoint {self.checkpoint} cannot condition on {sorted(unknown)} "
                f"(trained on: {self.conditions or 'nothing'}); fine-tune it with adapters first"
            )
        dist = num_atoms_distribution or self.meta.get("num_atoms_distribution")
        if not dist:
            raise ValueError("no atom-count distribution: pass num_atoms_distribution")
        sizes = np.array([int(k) for k in dist])
        probs = np.array([float(v) for v in dist.values()], dtype=float)
        probs = probs / probs.sum()
        rng = np.random.default_rng(seed)
        transforms = [SetProperty(k, (float(v) if isinstance(v, (int, float)) else v)) for k, v in conditions.items()]
        cell_sde = self.module.diffusion_module.corruption.sdes["cell"]
        old_density = cell_sde.limit_density
        if limit_density is not None:
            cell_sde.limit_density = float(limit_density)
        sampler = self._sampler(guidance_factor)
        accepted, rejected = [], {}
        reasons: dict[str, int] = {}
        t0 = time.perf_counter()
        try:
            for b0 in range(0, n, batch_size):
                m = min(batch_size, n - b0)
                batch_seed = int(rng.integers(2**30))
                num_atoms = rng.choice(sizes, size=m, p=probs)
                indices = list(range(start_index + b0, start_index + b0 + m))
                for i, s, reason in self._sample_batch(sampler, num_atoms, transforms, indices, batch_seed):
                    reason = reason or check_sample(s, max_volume_per_atom, min_distance)
                    if not reason:
                        s, reason = reduce_sample(s)
                    if reason:
                        rejected[i] = reason
                        reasons[reason] = reasons.get(reason, 0) + 1
                        continue
                    atoms = AseAtomsAdaptor.get_atoms(s)
                    atoms.info = {"sample_index": i, "batch_seed": batch_seed}
                    accepted.append(atoms)
        finally:
            cell_sde.limit_density = old_density
        ase.io.write(out_file, accepted, format="extxyz")
        return {
            "n_requested": n,
            "n_accepted": len(accepted),
            "rejected": {str(k): v for k, v in rejected.items()},
            "reasons": reasons,
            "seconds": time.perf_counter() - t0,
            "num_steps": self.num_steps,
            "device": self.device,
            "out_file": out_file,
        }
