"""MLFF calculators behind one small interface: CHGNet, DeePMD, MACE, MatterSim, SevenNet.

``get_calculator(settings, model_path=None)`` returns an ASE calculator. A ``model_path``
argument is a model the loop trained (``cscflow.trainers``), whatever ``settings.backend``
says: its family is read from the file itself (:func:`model_backend`), and a file of no
known family is taken as a frozen DeePMD model. Nothing is ever downloaded: CHGNet and
SevenNet use the weights shipped in their wheels, every other backend needs a local file.

Loading a model costs seconds (TorchScript warm-up for DeePMD), so calculators are cached
per process, keyed on backend + model file + its mtime + branch + device: a retrained
model written to the same path is picked up, an unchanged one is loaded once.

Not atomate2's ``forcefields.utils.ase_calculator`` (0.1.5): it builds a new calculator on
every call (no cache), its CHGNet route loads only the wheel's default model (no fine-tuned
file by path) and its named MACE/matgl models download weights;
``cscflow.downstream.atomate2_force_field`` maps these settings onto its names for atomate2's makers.

Units (docs/design.md): energy eV (total), forces eV/Å, stress GPa with ASE's sign
(``atoms.get_stress(voigt=False) / ase.units.GPa``, positive = tensile). CHGNet predicts
stress in GPa with that same sign (its ASE calculator only multiplies by ``units.GPa``);
tests/test_forcefields.py checks it against a finite-difference stress.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase.calculators.calculator import Calculator
from pymatgen.core import Structure

from cscflow.config import ForceFieldSettings

__all__ = [
    "MissingBackendError",
    "clear_cache",
    "get_calculator",
    "model_backend",
    "model_tag",
    "resolve_device",
    "single_points",
]

logger = logging.getLogger(__name__)

CHGNET_VERSIONS = ("0.3.0", "0.2.0", "r2scan")
SEVENN_MODELS = ("7net-0", "7net-l3i5")  # shipped in the sevenn wheel (7net-mf-0 needs a modal)

_EXTRAS = {
    "mace": ("mace-torch", "mace"),
    "mattersim": ("mattersim", "mattersim"),
    "deepmd": ("deepmd-kit", "deepmd"),
}

_CACHE: dict[tuple, Calculator] = {}
_SHA_CACHE: dict[tuple, str] = {}
_LOCK = threading.Lock()


class MissingBackendError(ImportError):
    """An optional force-field package is not installed."""


def _missing(backend: str, exc: ImportError) -> MissingBackendError:
    package, extra = _EXTRAS[backend]
    return MissingBackendError(
        f"force field backend {backend!r} needs the optional package {package}, which is not "
        f"importable ({exc}): install it with `scripts/bootstrap --with {extra}`"
    )


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; anything else unchanged."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _model_file(path: str | Path | None, backend: str) -> Path:
    if path is None:
        raise ValueError(f"backend {backend!r} needs a model file: set forcefield.model_path")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"{backend} model file not found: {p} (set forcefield.model_path to an existing file)"
        )
    return p.resolve()


def _shipped_or_file(name: str, shipped: tuple[str, ...], what: str, setting: str) -> Path | None:
    """None for a model shipped in the wheel (``shipped``), else the existing file ``name`` names."""
    if name in shipped:
        return None
    p = Path(name).expanduser()
    if p.is_file():
        return p.resolve()
    raise ValueError(
        f"unknown {what} {name!r}: use one shipped in the wheel ({', '.join(shipped)}) or an existing file ({setting})"
    )


def _pickle_names(data: bytes) -> set[str]:
    """Strings and global names in a pickle stream, read without unpickling anything."""
    import pickletools

    names: set[str] = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and len(arg) < 200:
                names.update(arg.split(" ") if op.name == "GLOBAL" else (arg,))
    except Exception:  # truncated or not a pickle: what was read so far still counts
        pass
    return names


def model_backend(path: str | Path) -> str | None:
    """Family of a model file ('deepmd', 'mace', 'mattersim', 'chgnet', 'sevenn') or None.

    Reads the file's structure only (torch zip archive: TorchScript code, or the pickled
    keys and class names of ``torch.save``); nothing is loaded or executed. These are the
    files cscflow.trainers export: a frozen DPA-3 is TorchScript, a MACE ``.model`` pickles
    ``mace.modules`` classes, CHGNet/SevenNet/MatterSim checkpoints are dicts with their
    own keys.
    """
    p = Path(path)
    stat = p.stat()
    return _sniff_backend(str(p.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _sniff_backend(path: str, mtime_ns: int, size: int) -> str | None:
    """model_backend, once per file version (the key carries mtime and size)."""
    import zipfile

    p = Path(path)
    if not zipfile.is_zipfile(p):
        return None
    with zipfile.ZipFile(p) as zf:
        entries = zf.namelist()
        if any(e.endswith("/constants.pkl") or "/code/" in e for e in entries):
            return "deepmd"
        pkl = next((e for e in entries if e.endswith("/data.pkl")), None)
        if pkl is None:
            return None
        names = _pickle_names(zf.read(pkl))
    if any(n.startswith("mace.") for n in names):
        return "mace"
    if {"model_state_dict", "config"} <= names:
        return "sevenn"
    if {"model_args", "state_dict"} <= names and "atom_fea_dim" in names:
        return "chgnet"
    if "model_args" in names and ("mattersim" in " ".join(names).lower() or "ema" in names):
        return "mattersim"
    return None


def _resolve(settings: ForceFieldSettings, model_path: str | Path | None) -> tuple[str, Path | None]:
    """(backend, model file) actually used; a model_path argument names its own family."""
    if model_path is not None:
        path = _model_file(model_path, "deepmd")
        return model_backend(path) or "deepmd", path
    if settings.backend == "chgnet":
        if settings.model_path is not None:  # a fine-tuned CHGNet file
            return "chgnet", _model_file(settings.model_path, "chgnet")
        return "chgnet", _shipped_or_file(settings.chgnet_version, CHGNET_VERSIONS, "CHGNet version",
                                          "forcefield.chgnet_version")
    if settings.backend == "sevenn":
        if settings.model_path is not None:
            return "sevenn", _model_file(settings.model_path, "sevenn")
        return "sevenn", _shipped_or_file(settings.sevenn_model, SEVENN_MODELS, "SevenNet model",
                                          "forcefield.sevenn_model")
    return settings.backend, _model_file(settings.model_path, settings.backend)


def _sha8(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()[:8]
    return _SHA_CACHE[key]


def model_tag(settings: ForceFieldSettings, model_path: str | Path | None = None) -> str:
    """Short name of the force field written on documents: 'chgnet-0.3.0', 'deepmd:f.pth#1a2b3c4d'."""
    backend, path = _resolve(settings, model_path)
    if path is None:
        return f"sevenn-{settings.sevenn_model}" if backend == "sevenn" else f"chgnet-{settings.chgnet_version}"
    tag = f"{backend}:{path.name}#{_sha8(path)}"
    if backend == "deepmd" and settings.model_branch:
        tag += f"@{settings.model_branch}"
    return tag


def _load(backend: str, path: Path | None, settings: ForceFieldSettings, device: str) -> Calculator:
    if backend == "chgnet":
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        model = (
            CHGNet.from_file(str(path))
            if path is not None
            else CHGNet.load(model_name=settings.chgnet_version, verbose=False)
        )
        return CHGNetCalculator(model=model, use_device=device, on_isolated_atoms="ignore")
    if backend == "deepmd":
        try:
            from deepmd.calculator import DP
        except ImportError as exc:
            raise _missing("deepmd", exc) from exc
        # DeePMD picks its device from the environment (CUDA_VISIBLE_DEVICES), not per call.
        return DP(model=str(path), head=settings.model_branch)
    if backend == "mace":
        try:
            from mace.calculators import MACECalculator
        except ImportError as exc:
            raise _missing("mace", exc) from exc
        return MACECalculator(model_paths=str(path), device=device, default_dtype="float64")
    if backend == "sevenn":
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator(model=str(path) if path is not None else settings.sevenn_model, device=device)
    if backend == "mattersim":
        try:
            from mattersim.forcefield import MatterSimCalculator
        except ImportError as exc:
            raise _missing("mattersim", exc) from exc
        return MatterSimCalculator(load_path=str(path), device=device)
    raise ValueError(f"unknown force field backend {backend!r}")


def get_calculator(settings: ForceFieldSettings, model_path: str | Path | None = None) -> Calculator:
    """The ASE calculator of the configured force field, loaded once per process.

    ``model_path`` (a frozen DeePMD model) overrides the settings' backend. The returned
    calculator is shared: its results are reset on every call, use it sequentially.
    """
    if not isinstance(settings, ForceFieldSettings):
        raise TypeError(f"settings must be ForceFieldSettings, got {type(settings).__name__}")
    backend, path = _resolve(settings, model_path)
    device = resolve_device(settings.device)
    mtime = path.stat().st_mtime_ns if path is not None else None
    version = None
    if path is None:
        version = settings.chgnet_version if backend == "chgnet" else settings.sevenn_model
    branch = settings.model_branch if backend == "deepmd" else None
    key = (backend, str(path), mtime, version, branch, device)
    with _LOCK:
        calc = _CACHE.get(key)
        if calc is None:
            logger.info("loading %s force field %s on %s", backend, path or version, device)
            calc = _load(backend, path, settings, device)
            _CACHE[key] = calc
    calc.reset()
    return calc


def clear_cache() -> None:
    """Forget every loaded calculator (frees their memory)."""
    with _LOCK:
        _CACHE.clear()


def _nan_result(n: int, error: str) -> dict[str, Any]:
    return {
        "energy": float("nan"),
        "forces": np.full((n, 3), np.nan),
        "stress": np.full((3, 3), np.nan),
        "error": error,
    }


def _chgnet_batch(structures: list[Structure], calculator, batch_size: int) -> list[dict]:
    """CHGNet's batched predictor: same numbers as the ASE path, several times faster."""
    preds = calculator.model.predict_structure(structures, task="efs", batch_size=batch_size)
    preds = preds if isinstance(preds, list) else [preds]
    out = []
    for s, p in zip(structures, preds, strict=True):
        n = len(s)
        factor = n if calculator.model.is_intensive else 1
        out.append(
            {
                "energy": float(np.asarray(p["e"]).reshape(-1)[0]) * factor,
                "forces": np.asarray(p["f"], dtype=float).reshape(n, 3),
                # CHGNet "s" is GPa with ASE's sign (CHGNetCalculator multiplies by units.GPa)
                "stress": np.asarray(p["s"], dtype=float).reshape(3, 3),
            }
        )
    return out


def _ase_single_point(structure: Structure, calculator: Calculator) -> dict:
    from ase.units import GPa
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = calculator
    energy = float(atoms.get_potential_energy())
    forces = np.asarray(atoms.get_forces(), dtype=float).reshape(len(atoms), 3)
    stress = np.asarray(atoms.get_stress(voigt=False), dtype=float) / GPa
    return {"energy": energy, "forces": forces, "stress": stress}


def single_points(
    structures: list[Structure],
    calculator: Calculator,
    on_error: Literal["raise", "record"] = "raise",
    batch_size: int = 16,
) -> list[dict]:
    """energy (eV, total), forces (N×3 eV/Å), stress (3×3 GPa, ASE sign) per structure.

    CHGNet calculators are evaluated in batches. With ``on_error="record"`` a failing
    structure gives NaN arrays of the right shape and an ``error`` string instead of raising.
    """
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    structures = list(structures)
    for i, s in enumerate(structures):
        if not isinstance(s, Structure):
            raise TypeError(f"structures[{i}] is a {type(s).__name__}, expected a pymatgen Structure")
        if len(s) == 0:
            raise ValueError(f"structures[{i}] has no atoms")
    calculator.reset()

    from chgnet.model.dynamics import CHGNetCalculator

    if isinstance(calculator, CHGNetCalculator) and structures:
        try:
            return _chgnet_batch(structures, calculator, batch_size)
        except Exception as exc:  # one bad structure: fall back to one at a time
            if on_error == "raise" and len(structures) == 1:
                raise
            logger.warning("batched CHGNet failed (%s): one structure at a time", exc)

    results = []
    for s in structures:
        try:
            results.append(_ase_single_point(s, calculator))
        except Exception as exc:
            if on_error == "raise":
                raise
            results.append(_nan_result(len(s), f"{type(exc).__name__}: {exc}"))
    return results
