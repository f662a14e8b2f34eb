"""MatterGen configuration built in Python (the wheel ships no hydra ``conf/``).

The dictionaries below are hydra-instantiable (``_target_`` keys) and have the same layout
as the ``config.yaml`` of MatterGen's released checkpoints, so one loader serves both: a
checkpoint directory is ``config.yaml`` + ``checkpoints/last.ckpt``. Defaults follow
MatterGen's published model (hidden 512, 4 GemNet blocks, cutoff 7 Å, 1000 D3PM steps);
tests use a tiny variant. The learning-rate scheduler is built without ``verbose=`` (torch
2.13 rejects it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ModelSpec", "adapter_model", "base_model", "lightning_module", "property_embedding", "ADAPTER_PROPERTIES"]

#: the two conditions the loop uses (MatterGen's chemical_system_energy_above_hull model)
ADAPTER_PROPERTIES = ("chemical_system", "energy_above_hull")

#: MatterGen's Alex-MP-20 value; replaced by the training set's density when known
DEFAULT_AVERAGE_DENSITY = 0.05771451654022283


@dataclass
class ModelSpec:
    """Size of a MatterGen denoiser trained from scratch."""

    hidden_dim: int = 512
    num_blocks: int = 4
    num_steps: int = 1000  # D3PM steps = sampler steps
    cutoff: float = 7.0
    max_neighbors: int = 50
    max_cell_images_per_dim: int = 5
    num_radial: int = 128
    num_spherical: int = 7
    emb_size_trip: int = 64
    emb_size_rbf: int = 16
    emb_size_cbf: int = 16
    emb_size_bil_trip: int = 64
    average_density: float = DEFAULT_AVERAGE_DENSITY  # atoms/Å^3, sets the lattice prior
    lr: float = 1e-4
    p_unconditional: float = 0.2
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def tiny(cls, **kw) -> "ModelSpec":
        """CPU test size: ~0.2 M parameters, 2 blocks, few diffusion steps."""
        base = dict(
            hidden_dim=32, num_blocks=2, num_steps=20, cutoff=6.0, max_neighbors=20,
            max_cell_images_per_dim=3, num_radial=16, num_spherical=4, emb_size_trip=8,
            emb_size_rbf=4, emb_size_cbf=4, emb_size_bil_trip=8, lr=1e-3,
        )
        base.update(kw)
        return cls(**base)

    def as_dict(self) -> dict:
        return asdict(self)


def property_embedding(name: str, hidden_dim: int) -> dict:
    """PropertyEmbedding config for ``chemical_system`` (multi-hot) or a scalar property."""
    if name == "chemical_system":
        conditional = {
            "_target_": "mattergen.property_embeddings.ChemicalSystemMultiHotEmbedding",
            "hidden_dim": hidden_dim,
        }
        scaler = {"_target_": "torch.nn.Identity"}
    else:
        conditional = {
            "_target_": "mattergen.diffusion.model_utils.NoiseLevelEncoding",
            "d_model": hidden_dim,
        }
        scaler = {"_target_": "mattergen.common.utils.data_utils.StandardScalerTorch"}
    return {
        "_target_": "mattergen.property_embeddings.PropertyEmbedding",
        "name": name,
        "unconditional_embedding_module": {
            "_target_": "mattergen.property_embeddings.EmbeddingVector",
            "hidden_dim": hidden_dim,
        },
        "conditional_embedding_module": conditional,
        "scaler": scaler,
    }


def _gemnet(spec: ModelSpec, target: str, latent_dim: int) -> dict:
    return {
        "_target_": target,
        "num_targets": 1,
        "latent_dim": latent_dim,
        "atom_embedding": {
            "_target_": "mattergen.common.gemnet.layers.embedding_block.AtomEmbedding",
            "emb_size": spec.hidden_dim,
            "with_mask_type": True,
        },
        "emb_size_atom": spec.hidden_dim,
        "emb_size_edge": spec.hidden_dim,
        "emb_size_trip": spec.emb_size_trip,
        "emb_size_rbf": spec.emb_size_rbf,
        "emb_size_cbf": spec.emb_size_cbf,
        "emb_size_bil_trip": spec.emb_size_bil_trip,
        "num_radial": spec.num_radial,
        "num_spherical": spec.num_spherical,
        "max_neighbors": spec.max_neighbors,
        "max_cell_images_per_dim": spec.max_cell_images_per_dim,
        "cutoff": spec.cutoff,
        "num_blocks": spec.num_blocks,
        "regress_stress": True,
        "otf_graph": True,
        # GemNetT ignores this argument and opens <mattergen>/common/gemnet/gemnet-dT.json;
        # the worker points that path at its own (neutral) scale file, see core.py.
        "scale_file": "cscflow-neutral",
        **spec.extra,
    }


def base_model(spec: ModelSpec) -> dict:
    """Unconditional GemNetT denoiser (MatterGen's base model)."""
    return {
        "_target_": "mattergen.denoiser.GemNetTDenoiser",
        "hidden_dim": spec.hidden_dim,
        "denoise_atom_types": True,
        "atom_type_diffusion": "mask",
        "property_embeddings": {},
        "property_embeddings_adapt": {},
        "gemnet": _gemnet(spec, "mattergen.common.gemnet.gemnet.GemNetT", spec.hidden_dim),
    }


def adapter_model(denoiser: dict, properties=ADAPTER_PROPERTIES) -> dict:
    """GemNetTAdapter around an existing denoiser config, adding ``properties`` adapters.

    Mirrors mattergen.scripts.finetune.init_adapter_lightningmodule_from_pretrained: the
    GemNetT becomes a GemNetTCtrl conditioned on the adapted properties. Properties the
    denoiser already has are kept, not adapted twice.
    """
    import copy

    model = copy.deepcopy(denoiser)
    hidden = int(model["hidden_dim"])
    existing = dict(model.get("property_embeddings_adapt") or {})
    base_props = set(model.get("property_embeddings") or {})
    for name in properties:
        if name not in existing and name not in base_props:
            existing[name] = property_embedding(name, hidden)
    model["_target_"] = "mattergen.adapter.GemNetTAdapter"
    model["property_embeddings_adapt"] = existing
    model["gemnet"]["_target_"] = "mattergen.common.gemnet.gemnet_ctrl.GemNetTCtrl"
    model["gemnet"]["condition_on_adapt"] = list(existing)
    return model


def corruption(num_steps: int, average_density: float) -> dict:
    return {
        "_target_": "mattergen.diffusion.corruption.multi_corruption.MultiCorruption",
        "sdes": {
            "pos": {
                "_target_": "mattergen.common.diffusion.corruption.NumAtomsVarianceAdjustedWrappedVESDE",
                "wrapping_boundary": 1.0,
                "sigma_max": 5.0,
                "limit_info_key": "num_atoms",
            },
            "cell": {
                "_target_": "mattergen.common.diffusion.corruption.LatticeVPSDE.from_vpsde_config",
                "vpsde_config": {
                    "beta_min": 0.1,
                    "beta_max": 20,
                    "limit_density": average_density,
                    "limit_var_scaling_constant": 0.25,
                },
            },
        },
        "discrete_corruptions": {
            "atomic_numbers": {
                "_target_": "mattergen.diffusion.corruption.d3pm_corruption.D3PMCorruption",
                "offset": 1,
                "d3pm": {
                    "_target_": "mattergen.diffusion.d3pm.d3pm.MaskDiffusion",
                    "dim": 101,
                    "schedule": {
                        "_target_": "mattergen.diffusion.d3pm.d3pm.create_discrete_diffusion_schedule",
                        "kind": "standard",
                        "num_steps": num_steps,
                    },
                },
            }
        },
    }


def lightning_module(model: dict, spec: ModelSpec) -> dict:
    """DiffusionLightningModule config (loss, corruption, optimiser) around ``model``."""
    return {
        "_target_": "mattergen.diffusion.lightning_module.DiffusionLightningModule",
        "diffusion_module": {
            "_target_": "mattergen.diffusion.diffusion_module.DiffusionModule",
            "model": model,
            "corruption": corruption(spec.num_steps, spec.average_density),
            "loss_fn": {
                "_target_": "mattergen.common.loss.MaterialsLoss",
                "reduce": "sum",
                "include_pos": True,
                "include_cell": True,
                "include_atomic_numbers": True,
                "d3pm_hybrid_lambda": 0.01,
                "weights": {"cell": 1.0, "pos": 0.1, "atomic_numbers": 1.0},
            },
            "pre_corruption_fn": {
                "_target_": "mattergen.property_embeddings.SetEmbeddingType",
                "p_unconditional": spec.p_unconditional,
                "dropout_fields_iid": False,
            },
        },
        "optimizer_partial": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": spec.lr},
        "scheduler_partials": [],
    }


def data_module(train_cache: str, val_cache: str | None, properties: list[str], batch_size: int) -> dict:
    """CrystDataModule over mattergen cached datasets (``CrystalDataset.from_cache_path``)."""
    transforms = [
        {"_target_": "mattergen.common.data.transform.symmetrize_lattice", "_partial_": True},
        {"_target_": "mattergen.common.data.transform.set_chemical_system_string", "_partial_": True},
    ]
    dataset_transforms = [
        {"_target_": "mattergen.common.data.dataset_transform.filter_sparse_properties", "_partial_": True}
    ]

    def ds(path):
        return {
            "_target_": "mattergen.common.data.dataset.CrystalDataset.from_cache_path",
            "cache_path": path,
            "properties": list(properties),
            "transforms": transforms,
            "dataset_transforms": dataset_transforms,
        }

    cfg = {
        "_target_": "mattergen.common.data.datamodule.CrystDataModule",
        "_recursive_": True,
        "train_dataset": ds(train_cache),
        "num_workers": {"train": 0, "val": 0, "test": 0},
        "batch_size": {"train": batch_size, "val": batch_size, "test": batch_size},
    }
    if val_cache:
        cfg["val_dataset"] = ds(val_cache)
    return cfg
