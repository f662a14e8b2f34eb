"""JSON-lines request loop: ``python -m cscflow.mattergen_worker`` (in .venv-mattergen).

One request per line on stdin, one reply per line on the protocol stream (the process's
original stdout). mattergen and Lightning print to stdout, so fd 1 is redirected to stderr
before anything is imported and the reply stream is a private duplicate of the old fd 1.

Requests: ``{"id": 1, "cmd": "ping" | "load" | "sample" | "train" | "finetune" | "quit", ...}``.
Replies: ``{"id": 1, "ok": true, "result": {...}}`` or ``{"id": 1, "ok": false, "error": str,
"traceback": str}``. A loaded checkpoint stays in-process across ``sample`` calls.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _protocol_stream():
    fd = os.dup(1)
    os.dup2(2, 1)  # everything printed from now on lands on stderr (the worker log)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1)


def main() -> int:
    out = _protocol_stream()
    from . import PROTOCOL_VERSION, core

    samplers: dict[tuple, core.Sampler] = {}

    def sampler(req) -> core.Sampler:
        key = (os.path.abspath(req["checkpoint"]), req.get("device", "auto"), req.get("num_steps"))
        if key not in samplers:
            samplers.clear()  # one model at a time
            samplers[key] = core.Sampler(req["checkpoint"], req.get("device", "auto"), req.get("num_steps"))
        return samplers[key]

    def handle(req: dict):
        cmd = req.get("cmd")
        if cmd == "ping":
            import mattergen
            import numpy
            import torch

            core.setup()
            from . import compat

            return {
                "protocol": PROTOCOL_VERSION,
                "torch": torch.__version__,
                "numpy": numpy.__version__,
                "mattergen": getattr(mattergen, "__version__", "1.0.3"),
                "cuda": torch.cuda.is_available(),
                "compat_scatter": compat.INSTALLED,
                "pid": os.getpid(),
            }
        if cmd == "load":
            s = sampler(req)
            return {
                "conditions": s.conditions, "num_steps": s.num_steps, "device": s.device,
                "n_parameters": s.n_parameters, "load_seconds": s.load_seconds, "meta": s.meta,
            }
        if cmd == "sample":
            s = sampler(req)
            keys = ("n", "out_file", "conditions", "guidance_factor", "batch_size", "num_atoms_distribution",
                    "seed", "start_index", "max_volume_per_atom", "min_distance", "limit_density")
            kwargs = {k: req[k] for k in keys if k in req}
            if kwargs.get("num_atoms_distribution"):
                kwargs["num_atoms_distribution"] = {int(k): v for k, v in kwargs["num_atoms_distribution"].items()}
            return s.sample(**kwargs)
        if cmd == "train":
            keys = ("structures_file", "out_dir", "spec", "max_steps", "batch_size", "device", "seed")
            return core.train_from_scratch(**{k: req[k] for k in keys if k in req})
        if cmd == "finetune":
            keys = ("checkpoint", "structures_file", "out_dir", "max_steps", "batch_size", "lr", "device",
                    "seed", "full_finetuning")
            samplers.clear()
            return core.finetune(**{k: req[k] for k in keys if k in req})
        if cmd in ("inpaint", "sample_in_cells"):  # CHGGen RePaint (repaint.py)
            from .repaint import handle as repaint_handle
            return repaint_handle(sampler(req), req)
        raise ValueError(f"unknown command {cmd!r}")

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as exc:
            out.write(json.dumps({"id": None, "ok": False, "error": f"bad request: {exc}"}) + "\n")
            continue
        if req.get("cmd") == "quit":
            out.write(json.dumps({"id": req.get("id"), "ok": True, "result": {}}) + "\n")
            break
        try:
            result = handle(req)
            reply = {"id": req.get("id"), "ok": True, "result": result}
        except Exception as exc:  # noqa: BLE001  (reported to the client, worker stays up)
            reply = {"id": req.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()}
            traceback.print_exc()
        out.write(json.dumps(reply, default=str) + "\n")
    return 0
