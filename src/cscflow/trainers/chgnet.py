"""CHGNet with ``chgnet.trainer.Trainer``: fine-tunes the wheel's pretrained 0.3.0 offline.

Labels go in CHGNet's units: energy eV/atom, forces eV/Å. ``StructureData`` takes stress
as VASP writes it (kBar, positive = compressive) and multiplies it by -0.1 to get the
GPa/ASE-sign stress the model predicts, so ``Frame.stress`` (GPa, ASE sign) goes in
times -10; passed as GPa it would train the model towards a tenth of the stress with
the opposite sign (tests/test_trainers_chgnet.py catches that). Before the gradient steps the per-element reference
energies (AtomRef) are shifted by a least-squares fit of the residuals on the training
frames, as deepmd-kit's bias change does: labels from another code (or another teacher)
sit at another energy zero, which a few epochs of message passing would learn badly.
The exported file is ``Trainer.save``'s dict, which ``CHGNet.from_file`` (and so
``cscflow.forcefields``) loads and which is also the checkpoint to continue from.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from cscflow.config import TrainingSettings
from cscflow.forcefields import CHGNET_VERSIONS, resolve_device
from cscflow.schemas import Frame
from cscflow.trainers.base import TrainedModel, Trainer, TrainError, start_point

__all__ = ["CHGNetTrainer", "freeze_lower_layers", "refit_atom_ref"]

logger = logging.getLogger(__name__)

MODEL_FILE = "chgnet_model.pth.tar"


def _load_start(kind: str, source: str | None, model_args: dict):
    from chgnet.model import CHGNet

    if kind == "scratch":
        return CHGNet(**model_args)
    if source in CHGNET_VERSIONS:
        return CHGNet.load(model_name=source, verbose=False)
    try:
        return CHGNet.from_file(source)
    except Exception as exc:
        raise ValueError(
            f"{source} is not a CHGNet model file ({type(exc).__name__}: {exc}); "
            "pass a TrainOutput.checkpoint_path of a CHGNet run or set training.chgnet.pretrained"
        ) from None


def refit_atom_ref(model, structures, energies_per_atom, scratch: bool) -> None:
    """Scratch: fit AtomRef to the labels. Otherwise shift it, for the elements present,
    by the least-squares per-element residual of the current model (bias change)."""
    comp = model.composition_model
    if scratch or not getattr(comp, "fitted", True):
        comp.fit(structures, energies_per_atom)
        return
    preds = model.predict_structure(structures, task="e", batch_size=16)
    preds = preds if isinstance(preds, list) else [preds]
    residual = np.asarray(energies_per_atom) - np.array([float(np.ravel(p["e"])[0]) for p in preds])
    zs = sorted({site.specie.Z for s in structures for site in s})
    fractions = np.array([[sum(site.specie.Z == z for site in s) / len(s) for z in zs] for s in structures])
    shift, *_ = np.linalg.lstsq(fractions, residual, rcond=None)
    import torch

    with torch.no_grad():
        weight = comp.fc.weight
        for z, d in zip(zs, shift, strict=True):
            weight[0, z - 1] += float(d)
    logger.info("CHGNet AtomRef shifted by %s eV/atom", dict(zip(zs, np.round(shift, 4).tolist(), strict=True)))


def freeze_lower_layers(model) -> int:
    """Freeze all but the last atom convolution and the readout (CHGNet's fine-tuning
    example); returns the number of parameters left trainable."""
    for layer in [model.atom_embedding, model.bond_embedding, model.angle_embedding,
                  model.bond_basis_expansion, model.angle_basis_expansion,
                  model.atom_conv_layers[:-1], model.bond_conv_layers, model.angle_layers]:
        for param in layer.parameters():
            param.requires_grad = False
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class CHGNetTrainer(Trainer):
    name = "chgnet"

    def _train(self, frames: list[Frame], work_dir: Path, settings: TrainingSettings, type_map, previous_model, seed):
        import torch
        from chgnet.data.dataset import StructureData, collate_graphs
        from chgnet.trainer import Trainer as ChgTrainer
        from torch.utils.data import DataLoader, Subset

        cs = settings.chgnet
        start = start_point(previous_model, cs.pretrained)
        torch.manual_seed(seed)
        model = _load_start(start.kind, start.source, cs.model_args)
        structures = [f.structure for f in frames]
        e_atom = [f.energy / len(f.structure) for f in frames]
        has_stress = all(f.stress is not None for f in frames)
        if cs.refit_atom_ref:
            refit_atom_ref(model, structures, e_atom, scratch=start.kind == "scratch")
        if cs.trainable == "last_layers":
            logger.info("CHGNet: %d parameters trainable", freeze_lower_layers(model))

        with contextlib.redirect_stdout(io.StringIO()) as log:
            data = StructureData(
                structures, e_atom, [f.forces for f in frames],
                stresses=[(-10.0 * np.asarray(f.stress)).tolist() for f in frames] if has_stress else None,
                graph_converter=model.graph_converter, shuffle=False,
            )
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(frames))
        n_val = int(round(cs.validation_fraction * len(frames))) if len(frames) > 1 else 0
        val_idx, train_idx = order[:n_val], order[n_val:]
        loader = dict(collate_fn=collate_graphs, batch_size=cs.batch_size, num_workers=0)
        train_loader = DataLoader(Subset(data, train_idx.tolist()), shuffle=True,
                                  generator=torch.Generator().manual_seed(seed), **loader)
        val_loader = DataLoader(Subset(data, (val_idx if n_val else train_idx).tolist()), **loader)

        trainer = ChgTrainer(
            model=model, targets="efs" if has_stress else "ef",
            energy_loss_ratio=cs.energy_loss_ratio, force_loss_ratio=cs.force_loss_ratio,
            stress_loss_ratio=cs.stress_loss_ratio, optimizer="Adam", scheduler=cs.scheduler,
            criterion=cs.criterion, epochs=cs.epochs, learning_rate=cs.learning_rate,
            print_freq=10**6, torch_seed=seed, data_seed=seed,
            use_device=resolve_device(settings.device),
        )
        ckpt_dir = work_dir / "checkpoints"
        try:
            with contextlib.redirect_stdout(log):
                trainer.train(train_loader, val_loader, save_dir=str(ckpt_dir))
        except Exception as exc:
            (work_dir / "chgnet.log").write_text(log.getvalue())
            raise TrainError(f"CHGNet training failed in {work_dir}: {type(exc).__name__}: {exc}") from exc
        (work_dir / "chgnet.log").write_text(log.getvalue())
        trainer.model.to("cpu")
        out = work_dir / MODEL_FILE
        trainer.save(filename=str(out))
        return TrainedModel(
            backend=self.name, model_path=str(out), checkpoint_path=str(out),
            start_from=start.label, numb_steps=cs.epochs, work_dir=str(work_dir),
        )
