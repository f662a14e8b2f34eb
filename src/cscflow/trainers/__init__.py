"""MLFF trainers, one module per family, behind ``trainers.base.Trainer``.

``get_trainer(name)`` imports the family's module only when asked, so a missing optional
package (mace-torch, mattersim, deepmd-kit) fails only the run that needs it.
"""

from __future__ import annotations

from importlib import import_module

from cscflow.trainers.base import TrainedModel, Trainer, TrainError, count_parameters, evaluate_model, start_point

__all__ = [
    "BACKENDS", "TrainError", "TrainedModel", "Trainer", "count_parameters", "evaluate_model", "get_trainer",
    "start_point",
]

BACKENDS = {
    "deepmd": ("cscflow.trainers.deepmd", "DeepMDTrainer"),
    "mace": ("cscflow.trainers.mace", "MACETrainer"),
    "mattersim": ("cscflow.trainers.mattersim", "MatterSimTrainer"),
    "chgnet": ("cscflow.trainers.chgnet", "CHGNetTrainer"),
    "sevenn": ("cscflow.trainers.sevenn", "SevenNetTrainer"),
}


def get_trainer(name: str) -> Trainer:
    """The trainer of one family ('deepmd', 'mace', 'mattersim', 'chgnet', 'sevenn')."""
    if name not in BACKENDS:
        raise ValueError(f"unknown training backend {name!r}: use one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(import_module(module), cls)()
