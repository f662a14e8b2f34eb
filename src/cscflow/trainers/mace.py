"""MACE with ``mace_run_train`` (mace-torch), run as a subprocess.

Paper schedule (Methods 4.3) as defaults: ``epochs`` (400) in EMA mode at lr 0.01,
ReduceLROnPlateau × 0.8 after 20 epochs of validation plateau, then ``swa_epochs`` (100)
of SWA ("stage two") at lr 1e-3; 5 % validation; r_max 5 Å. A fine-tune passes the
start model as ``--foundation_model FILE`` (training.mace.foundation_model, e.g. MACE-MPA-0-medium,
or the previous run's exported model); MACE-MPA-0's multihead fine-tuning keeps the
foundation head on local replay data (``training.mace.replay_file``), nothing is
downloaded. mace reads the replay head with the fine-tune data's label keys, so the
replay file is rewritten with cscflow's ``REF_`` keys (:func:`replay_extxyz`), and
``--force_mh_ft_lr=True`` keeps ``training.mace.lr``/``ema_decay`` (mace's multihead mode
would otherwise replace them by 1e-4 and 0.99999). The exported model then has two heads,
``Default`` (the fine-tuned one, which ``MACECalculator`` picks) and ``pt_head``. The exported ``.model`` (the stage-two model when SWA ran) is what
``MACECalculator`` (and so ``cscflow.forcefields``) loads and what a later run
fine-tunes from.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cscflow.config import TrainingSettings
from cscflow.datasets import frames_to_extxyz
from cscflow.forcefields import resolve_device
from cscflow.schemas import Frame
from cscflow.trainers.base import TrainedModel, Trainer, TrainError, start_point

__all__ = ["MACETrainer", "make_args", "replay_extxyz"]

logger = logging.getLogger(__name__)

NAME = "cscflow_mace"
MODEL_FILE = "mace_model.model"
KEY = "REF_"  # label keys of the extxyz, so ASE's calculator fields never shadow them


def replay_extxyz(source: str | Path, out: str | Path) -> Path:
    """The replay configurations of ``training.mace.replay_file`` with their labels under the
    ``REF_`` keys of the fine-tune data: mace reads the pretraining head with the same keys.
    Labels are taken from ``REF_*`` keys as they are, else from ASE's calculator results
    (an extxyz with ``energy``/``forces``/``stress``, as mace's replay selections write)."""
    from ase.io import read, write

    images = read(Path(source), index=":")
    out_images = []
    for i, atoms in enumerate(images):
        if f"{KEY}energy" in atoms.info:
            out_images.append(atoms)
            continue
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        results.update({k: atoms.info[k] for k in ("energy", "stress") if k in atoms.info})
        if "forces" in atoms.arrays:
            results["forces"] = atoms.arrays["forces"]
        if "energy" not in results or "forces" not in results:
            raise TrainError(f"{source}: configuration {i} has no energy and forces labels "
                             "(training.mace.replay_file needs both)")
        clean = atoms.copy()
        clean.calc = None
        clean.info = {k: v for k, v in atoms.info.items() if k not in ("energy", "stress")}
        clean.info[f"{KEY}energy"] = float(results["energy"])
        clean.arrays[f"{KEY}forces"] = results["forces"]
        if "stress" in results:
            clean.info[f"{KEY}stress"] = results["stress"]
        out_images.append(clean)
    out = Path(out)
    write(out, out_images, format="extxyz")
    return out.resolve()


def make_args(settings: TrainingSettings, train_file: Path, foundation: str | None, seed: int, device: str,
              replay_file: Path | None = None) -> list[str]:
    """Command-line arguments of ``mace_run_train`` for this run (`replay_file`: the rewritten
    replay data, default ``training.mace.replay_file``)."""
    m = settings.mace
    total = m.epochs + m.swa_epochs
    args = [
        f"--name={NAME}", f"--train_file={train_file}", f"--valid_fraction={m.validation_fraction}",
        f"--energy_key={KEY}energy", f"--forces_key={KEY}forces", f"--stress_key={KEY}stress",
        f"--r_max={m.r_max}", f"--batch_size={m.batch_size}", f"--max_num_epochs={total}",
        "--ema", f"--ema_decay={m.ema_decay}", f"--lr={m.lr}",
        "--scheduler=ReduceLROnPlateau", f"--lr_factor={m.lr_factor}", f"--scheduler_patience={m.scheduler_patience}",
        f"--patience={10 * total}", "--loss=weighted", "--compute_stress=True",
        f"--energy_weight={m.energy_weight}", f"--forces_weight={m.forces_weight}", f"--stress_weight={m.stress_weight}",
        f"--device={device}", f"--seed={seed}", f"--default_dtype={m.default_dtype}",
        "--save_cpu", "--eval_interval=1", "--work_dir=.",
    ]
    if m.swa_epochs > 0:
        args += ["--swa", f"--start_swa={m.epochs}", f"--swa_lr={m.swa_lr}"]
    if foundation is None:
        args += [f"--model={m.model}", f"--num_channels={m.num_channels}", f"--max_L={m.max_L}",
                 f"--num_interactions={m.num_interactions}", f"--correlation={m.correlation}", "--E0s=average"]
    elif m.multiheads_finetuning:
        args += [f"--foundation_model={foundation}", "--multiheads_finetuning=True", "--E0s=foundation",
                 f"--pt_train_file={replay_file or m.replay_file}", f"--num_samples_pt={m.num_replay_samples}",
                 "--force_mh_ft_lr=True"]
    else:
        args += [f"--foundation_model={foundation}", "--multiheads_finetuning=False", "--E0s=average"]
    return args


class MACETrainer(Trainer):
    name = "mace"

    def _train(self, frames: list[Frame], work_dir: Path, settings: TrainingSettings, type_map, previous_model, seed):
        start = start_point(previous_model, settings.mace.foundation_model)
        exe = shutil.which("mace_run_train", path=str(Path(sys.executable).parent)) or shutil.which("mace_run_train")
        if exe is None:
            raise TrainError("mace_run_train is not installed: scripts/bootstrap --with mace")
        train_file = frames_to_extxyz(frames, work_dir / "train.extxyz", key_prefix=KEY)
        replay = None
        if start.source is not None and settings.mace.multiheads_finetuning:
            replay = replay_extxyz(settings.mace.replay_file, work_dir / "replay.extxyz")
        args = make_args(settings, train_file, start.source, seed, resolve_device(settings.device), replay)
        (work_dir / "mace_args.txt").write_text("\n".join(args) + "\n")
        for stale in [*work_dir.glob(f"{NAME}*.model"), *work_dir.glob("checkpoints/*")]:  # an interrupted attempt
            stale.unlink()
        log = work_dir / "mace.out"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        logger.info("training MACE (%s) in %s", start.label, work_dir)
        with open(log, "w") as fh:
            proc = subprocess.run([exe, *args], cwd=work_dir, stdout=fh, stderr=subprocess.STDOUT, env=env)
        model = next((p for p in (work_dir / f"{NAME}_stagetwo.model", work_dir / f"{NAME}.model") if p.is_file()), None)
        if proc.returncode != 0 or model is None:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise TrainError(f"mace_run_train failed (exit {proc.returncode}) in {work_dir} (log: {log}). Last lines:\n{tail}")
        out = work_dir / MODEL_FILE
        shutil.copyfile(model, out)
        epochs = settings.mace.epochs + settings.mace.swa_epochs
        return TrainedModel(
            backend=self.name, model_path=str(out), checkpoint_path=str(out),
            start_from=start.label, numb_steps=epochs, work_dir=str(work_dir),
        )
