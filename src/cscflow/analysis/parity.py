"""Predictions of a run's last trained model on its held-out frames, for the parity plots.

Cached in ``parity.json`` next to the report by model tag + frame ids, so a second report
only evaluates a new model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cscflow.analysis.run_data import RunData

__all__ = ["parity_predictions"]


def parity_predictions(data: RunData, out: Path, train: dict) -> dict:
    """Predictions of the frozen model on its test frames, cached by model tag + frame ids."""
    from cscflow.forcefields import get_calculator, model_tag, single_points

    model_path = train["model_path"]
    ids = list(train["test_frame_ids"] or [])
    tag = model_tag(data.spec.forcefield, model_path)
    cache_file = out / "parity.json"
    if cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("model") == tag and cached.get("frame_ids") == ids:
                return cached
        except (json.JSONDecodeError, OSError):
            pass
    by_id = {f.frame_id: f for f in data.all_frames()}
    frames = [by_id[i] for i in ids if i in by_id]
    if not frames:
        raise ValueError(f"none of the {len(ids)} test frames of iteration {train['iteration']} is in the store")
    calc = get_calculator(data.spec.forcefield, model_path)
    preds = single_points([f.structure for f in frames], calc, on_error="record")
    result = {
        "model": tag,
        "frame_ids": ids,
        "energy_ref": [f.energy / len(f.structure) for f in frames],
        "energy_pred": [float(p["energy"]) / len(f.structure) for p, f in zip(preds, frames)],
        "forces_ref": np.concatenate([np.asarray(f.forces, float).ravel() for f in frames]).tolist(),
        "forces_pred": np.concatenate([np.asarray(p["forces"], float).ravel() for p in preds]).tolist(),
        "n_missing": len(ids) - len(frames),
    }
    cache_file.write_text(json.dumps(result))
    return result
