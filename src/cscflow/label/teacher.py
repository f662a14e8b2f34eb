"""Teacher labeller: a pretrained CHGNet stands in for DFT.

For each selected candidate: its (relaxed) structure as is (``include_unperturbed``) and
``copies_per_structure`` perturbed copies (``cscflow.perturb``, paper Methods 4.2) are
labelled with energy (eV), forces (eV/Å) and stress (GPa, ASE sign) in batches through
``CHGNet.predict_structure``. The labeller name always says "stand-in for DFT": these
labels are what a DFT run would provide, from a model that is itself only an
approximation of PBE.

Each perturbed copy gets its own integer seed (``Frame.label_seed``): default_rng(label_seed)
given to ``perturb_structure`` rebuilds that copy exactly. Seeds are derived from
(seed, iteration, crc32(candidate id)), so they do not depend on the order of the list.
"""

from __future__ import annotations

import logging
import time
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from cscflow.config import LabelSettings
from cscflow.label import LabelOutput
from cscflow.perturb import perturb_structure
from cscflow.schemas import Candidate, Frame

__all__ = ["teacher_label", "teacher_name", "load_teacher", "predict"]

logger = logging.getLogger(__name__)

BATCH_SIZE = 16


def teacher_name(version: str) -> str:
    """Labeller tag written on every frame."""
    tag = Path(version).name if Path(version).suffix else version
    return f"teacher:chgnet-{tag} (stand-in for DFT)"


@lru_cache(maxsize=4)
def load_teacher(version: str):
    """A pretrained CHGNet shipped in the wheel ("0.3.0", "0.2.0", "r2scan") or a model file."""
    from chgnet.model import CHGNet

    if Path(version).suffix and Path(version).is_file():
        return CHGNet.from_file(version)
    try:
        return CHGNet.load(model_name=version, verbose=False)
    except ValueError:
        raise ValueError(
            f"unknown teacher CHGNet {version!r}: use 0.3.0, 0.2.0, r2scan or a model file"
        ) from None


def predict(model, structures: list[Structure], batch_size: int = BATCH_SIZE) -> list[dict | Exception]:
    """energy (eV), forces (eV/Å), stress (GPa, ASE sign) per structure, or the exception.

    Batched; a failing batch is retried one structure at a time so one bad structure
    cannot take its batch down with it.
    """
    out: list[dict | Exception] = []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        try:
            preds = model.predict_structure(chunk, task="efs", batch_size=batch_size)
            preds = preds if isinstance(preds, list) else [preds]
        except Exception:
            preds = []
            for s in chunk:
                try:
                    preds.append(model.predict_structure(s, task="efs"))
                except Exception as exc:  # recorded, never raised
                    preds.append(exc)
        for s, p in zip(chunk, preds):
            if isinstance(p, Exception):
                out.append(p)
                continue
            n = len(s)
            # CHGNet's "s" is GPa with ASE's sign: CHGNetCalculator multiplies it by units.GPa
            out.append(
                {
                    "energy": float(np.asarray(p["e"]).reshape(-1)[0]) * n,
                    "forces": np.asarray(p["f"], dtype=float).reshape(n, 3),
                    "stress": np.asarray(p["s"], dtype=float).reshape(3, 3),
                }
            )
    return out


def teacher_label(
    selected: list[Candidate], iteration: int, seed: int, settings: LabelSettings
) -> LabelOutput:
    """Frames for every selected candidate; failures are recorded, never raised."""
    t0 = time.perf_counter()
    labeller = teacher_name(settings.teacher_chgnet_version)
    jobs: list[tuple[Candidate, str, str, Structure, int | None]] = []
    failures: list[dict] = []
    for cand in selected:
        cid = cand.id
        if settings.include_unperturbed:
            jobs.append((cand, f"{cid}-u", "unperturbed", cand.structure, None))
        rng = np.random.default_rng([seed, iteration, zlib.crc32(cid.encode())])
        for j in range(settings.copies_per_structure):
            frame_id = f"{cid}-p{j:02d}"
            label_seed = int(rng.integers(2**31 - 1))
            try:
                structure, _record = perturb_structure(
                    cand.structure,
                    np.random.default_rng(label_seed),
                    position_sigma=settings.position_sigma,
                    lattice_strain=settings.lattice_strain,
                )
            except Exception as exc:
                failures.append({"candidate_id": cid, "frame_id": frame_id,
                                 "error": f"perturbation: {type(exc).__name__}: {exc}"})
                continue
            jobs.append((cand, frame_id, "perturbed", structure, label_seed))

    if not jobs:
        return LabelOutput(frames=[], failures=failures, labeller=labeller,
                           seconds=time.perf_counter() - t0)

    model = load_teacher(settings.teacher_chgnet_version)
    results = predict(model, [j[3] for j in jobs])
    frames: list[Frame] = []
    for (cand, frame_id, kind, structure, label_seed), res in zip(jobs, results):
        if isinstance(res, Exception):
            failures.append({"candidate_id": cand.id, "frame_id": frame_id,
                             "error": f"{type(res).__name__}: {res}"})
            continue
        if not (np.isfinite(res["energy"]) and np.isfinite(res["forces"]).all()
                and np.isfinite(res["stress"]).all()):
            failures.append({"candidate_id": cand.id, "frame_id": frame_id,
                             "error": "non-finite energy, forces or stress"})
            continue
        frames.append(
            Frame(
                frame_id=frame_id,
                structure=structure,
                energy=res["energy"],
                forces=res["forces"].tolist(),
                stress=res["stress"].tolist(),
                kind=kind,
                labeller=labeller,
                provenance=cand.provenance.model_copy(deep=True),
                label_seed=label_seed,
            )
        )
    for f in failures:
        logger.warning("label %s failed: %s", f["frame_id"], f["error"])
    return LabelOutput(frames=frames, failures=failures, labeller=labeller,
                       seconds=time.perf_counter() - t0)
