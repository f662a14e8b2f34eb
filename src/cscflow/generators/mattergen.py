"""MatterGen as a generator backend, and the per-iteration generator fine-tuning stage.

mattergen==1.0.3 needs numpy<2, the main environment numpy 2.x: MatterGen lives in its own
virtual environment (``scripts/bootstrap-mattergen`` -> ``.venv-mattergen``) and runs in a
long-lived worker process (``python -m cscflow.mattergen_worker``), one per stage job, with
the model kept in memory across batches. Requests are JSON lines; structures travel as
extxyz files in a scratch directory (docs/mattergen.md).

Generation (paper Methods 4.1): for each target E_hull the model is conditioned on
``chemical_system`` + ``energy_above_hull`` with classifier-free guidance. Samples outside
the chemical system (MatterGen violates the condition for ~10 % of samples) are filtered
and counted per condition; exploded lattices / crashed trajectories are rejected by the
worker and counted. Fine-tuning (paper §2.1): all labelled structures with their labeller
E_hull, both property adapters, starting from the current checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from jobflow import Maker, job
from pydantic import BaseModel
from pymatgen.core import Structure

from cscflow.checkpoint import resumable
from cscflow.config import ChemicalSystem, GeneratorSettings
from cscflow.generators import GENERATORS, Generator
from cscflow.schemas import Candidate, Frame, ReferenceEntry

__all__ = [
    "FinetuneGeneratorMaker",
    "FinetuneGeneratorOutput",
    "MatterGenGenerator",
    "MatterGenWorker",
    "MatterGenWorkerError",
    "labelled_e_hull",
    "mattergen_python",
    "relaxed_frames",
]

logger = logging.getLogger(__name__)

#: the conditions the loop asks MatterGen for (its chemical_system_energy_above_hull model)
CONDITIONS = ("chemical_system", "energy_above_hull")


class MatterGenWorkerError(RuntimeError):
    """The MatterGen worker failed; the message carries its error and log tail."""


def _src_dir() -> Path:
    import cscflow

    return Path(cscflow.__file__).resolve().parent.parent


def mattergen_python() -> Path:
    """Python of the MatterGen environment: $CSCFLOW_MATTERGEN_PYTHON or <repo>/.venv-mattergen."""
    env = os.environ.get("CSCFLOW_MATTERGEN_PYTHON")
    if env:
        path = Path(env)
        if not path.exists():
            raise FileNotFoundError(f"CSCFLOW_MATTERGEN_PYTHON={env} does not exist")
        return path
    path = _src_dir().parent / ".venv-mattergen" / "bin" / "python"
    if not path.exists():
        raise FileNotFoundError(
            f"MatterGen environment not found ({path}): run scripts/bootstrap-mattergen, "
            "or set CSCFLOW_MATTERGEN_PYTHON to the python of an environment with mattergen"
        )
    return path


class MatterGenWorker:
    """Client of one ``cscflow.mattergen_worker`` process (JSON lines over pipes).

    The worker's stdout/stderr chatter goes to ``<workdir>/worker.log``; its tail is part of
    every error. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, python: str | Path | None = None, workdir: str | Path | None = None):
        self.python = Path(python) if python else mattergen_python()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="cscflow-mattergen-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "worker.log"
        self._proc: subprocess.Popen | None = None
        self._next_id = 0
        self._finalizer = weakref.finalize(self, MatterGenWorker._shutdown, [None], None)

    @staticmethod
    def _shutdown(holder, _):
        proc = holder[0]
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"id": -1, "cmd": "quit"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                proc.kill()
                proc.wait()

    def start(self) -> "MatterGenWorker":
        if self._proc is not None and self._proc.poll() is None:
            return self
        env = dict(os.environ)
        # src/ (never src/cscflow: its select.py would shadow the standard library)
        env["PYTHONPATH"] = os.pathsep.join([str(_src_dir()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "a")
        self._proc = subprocess.Popen(
            [str(self.python), "-m", "cscflow.mattergen_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
            bufsize=1,
            cwd=str(self.workdir),
        )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, MatterGenWorker._shutdown, [self._proc], None)
        return self

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def request(self, cmd: str, **kwargs) -> dict:
        self.start()
        self._next_id += 1
        req = {"id": self._next_id, "cmd": cmd, **kwargs}
        try:
            self._proc.stdin.write(json.dumps(req, default=str) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            rc = self._proc.poll()
            raise MatterGenWorkerError(
                f"MatterGen worker exited (rc={rc}) during {cmd!r}; log {self.log_path}:\n{self.log_tail()}"
            )
        reply = json.loads(line)
        if not reply.get("ok"):
            raise MatterGenWorkerError(f"MatterGen worker {cmd!r} failed: {reply.get('error')}")
        return reply["result"]

    def close(self) -> None:
        self._finalizer()
        self._proc = None
        if getattr(self, "_log", None):
            self._log.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # convenience wrappers ------------------------------------------------------------
    def ping(self) -> dict:
        return self.request("ping")

    def load(self, checkpoint, device="auto", num_steps=None) -> dict:
        return self.request("load", checkpoint=str(checkpoint), device=device, num_steps=num_steps)

    def train(self, structures: Sequence[Structure], out_dir, spec: dict | None = None, max_steps=100,
              batch_size=16, device="auto", seed=0) -> dict:
        """Train an unconditional base model from scratch (tests, tiny models)."""
        path = self.workdir / "train.extxyz"
        _write_extxyz(path, structures)
        return self.request("train", structures_file=str(path), out_dir=str(out_dir), spec=spec or {},
                            max_steps=max_steps, batch_size=batch_size, device=device, seed=seed)

    def finetune(self, checkpoint, structures: Sequence[Structure], e_hull: Sequence[float], out_dir,
                 max_steps=100, batch_size=16, lr=None, device="auto", seed=0) -> dict:
        if len(structures) != len(e_hull):
            raise ValueError("finetune: one E_hull per structure")
        path = self.workdir / "finetune.extxyz"
        _write_extxyz(path, structures, [{"energy_above_hull": float(e)} for e in e_hull])
        return self.request("finetune", checkpoint=str(checkpoint), structures_file=str(path),
                            out_dir=str(out_dir), max_steps=max_steps, batch_size=batch_size, lr=lr,
                            device=device, seed=seed)

    def sample(self, checkpoint, n: int, conditions: dict, **kwargs) -> tuple[list[tuple[Structure, dict]], dict]:
        """[(structure, info)] of the accepted samples, and the worker's report."""
        out = self.workdir / f"samples-{self._next_id + 1}.extxyz"
        res = self.request("sample", checkpoint=str(checkpoint), n=int(n), conditions=conditions,
                           out_file=str(out), **kwargs)
        samples = _read_extxyz(out) if res["n_accepted"] else []
        out.unlink(missing_ok=True)
        return samples, res


def _write_extxyz(path: Path, structures, infos=None) -> None:
    import ase.io
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = []
    for i, s in enumerate(structures):
        a = AseAtomsAdaptor.get_atoms(s)
        a.info = dict(infos[i]) if infos else {}
        atoms.append(a)
    ase.io.write(str(path), atoms, format="extxyz")


def _read_extxyz(path: Path) -> list[tuple[Structure, dict]]:
    import ase.io
    from pymatgen.io.ase import AseAtomsAdaptor

    return [(AseAtomsAdaptor.get_structure(a), dict(a.info)) for a in ase.io.read(str(path), index=":")]


def _condition_tag(e_hull: Any) -> str:
    return f"e_hull={e_hull:g}" if isinstance(e_hull, (int, float)) else "e_hull=any"


class MatterGenGenerator(Generator):
    """Conditioned MatterGen sampling through the worker; filters and counts per condition.

    ``self.stats[condition_tag]`` holds, per target E_hull: sampled, accepted,
    outside_chemical_system, violation_rate (filtered / valid samples) and the worker's
    reject reasons; ``self.failures`` counts the same reasons over all conditions.
    """

    name = "mattergen"

    def __init__(self, settings: GeneratorSettings, worker: MatterGenWorker | None = None):
        super().__init__(settings)
        if settings.checkpoint is None:
            raise ValueError("generator backend 'mattergen' needs a model: set generator.checkpoint")
        self.checkpoint = Path(settings.checkpoint)
        if not self.checkpoint.exists():
            raise FileNotFoundError(f"generator.checkpoint not found: {self.checkpoint}")
        self._worker = worker
        self._own_worker = worker is None
        self._model: dict | None = None
        self.stats: dict[str, dict[str, Any]] = {}

    @property
    def worker(self) -> MatterGenWorker:
        if self._worker is None:
            self._worker = MatterGenWorker()
            weakref.finalize(self, self._worker.close)
        return self._worker

    def close(self) -> None:
        if self._own_worker and self._worker is not None:
            self._worker.close()
            self._worker = None

    def model_info(self) -> dict:
        if self._model is None:
            s = self.settings
            self._model = self.worker.load(self.checkpoint, device=s.device, num_steps=s.diffusion_steps)
            missing = set(CONDITIONS) - set(self._model["conditions"])
            if missing:
                raise ValueError(
                    f"MatterGen checkpoint {self.checkpoint} cannot condition on {sorted(missing)} "
                    f"(it knows {self._model['conditions'] or 'no conditions'}); use MatterGen's "
                    "chemical_system_energy_above_hull model or fine-tune with FinetuneGeneratorMaker"
                )
        return self._model

    def num_atoms_distribution(self, chemical_system: ChemicalSystem) -> dict[int, float]:
        """Atom counts of the checkpoint's training set, clipped to the chemical system's range.

        MatterGen's default is Alex-MP-20's distribution; released checkpoints carry none of
        ours, so they get a uniform distribution over [min_atoms, max_atoms].
        """
        lo, hi = chemical_system.min_atoms, chemical_system.max_atoms
        dist = {int(k): float(v) for k, v in (self.model_info()["meta"].get("num_atoms_distribution") or {}).items()}
        dist = {k: v for k, v in dist.items() if lo <= k <= hi and v > 0}
        if not dist:
            dist = {k: 1.0 for k in range(lo, hi + 1)}
        total = sum(dist.values())
        return {k: v / total for k, v in sorted(dist.items())}

    def generate(
        self,
        chemical_system: ChemicalSystem,
        n: int,
        condition: dict[str, Any],
        rng: np.random.Generator,
        iteration: int = 0,
        start_index: int = 0,
    ) -> list[Candidate]:
        s = self.settings
        info = self.model_info()
        chemsys = chemical_system.chemsys
        allowed = set(chemical_system.elements)
        e_hull = condition.get("e_hull")
        if not isinstance(e_hull, (int, float)):
            raise ValueError(f"MatterGen needs a numeric E_hull condition, got {condition!r}")
        conditions = {"chemical_system": chemsys, "energy_above_hull": float(e_hull)}
        dist = self.num_atoms_distribution(chemical_system)
        tag = _condition_tag(e_hull)
        st = self.stats.setdefault(tag, {"sampled": 0, "accepted": 0, "outside_chemical_system": 0,
                                         "rejected": {}, "seconds": 0.0})
        out: list[Candidate] = []
        budget = n * s.max_attempts_per_structure
        drawn = 0
        while len(out) < n and drawn < budget:
            want = min(budget - drawn, max(n - len(out), 1))
            # ask for a little more than missing: ~10 % of MatterGen samples leave the system
            ask = min(budget - drawn, int(np.ceil(want * 1.15)))
            seed = int(rng.integers(2**30))
            samples, res = self.worker.sample(
                self.checkpoint, ask, conditions,
                guidance_factor=s.guidance_factor, batch_size=s.batch_size,
                num_atoms_distribution={str(k): v for k, v in dist.items()},
                seed=seed, start_index=start_index + drawn,
            )
            drawn += ask
            st["sampled"] += ask
            st["seconds"] += res["seconds"]
            for reason, count in res["reasons"].items():
                self.failures[reason] += count
                st["rejected"][reason] = st["rejected"].get(reason, 0) + count
            for structure, meta in samples:
                if len(out) >= n:
                    break
                elements = {el.symbol for el in structure.composition.elements}
                if not elements <= allowed:
                    self.failures["outside_chemical_system"] += 1
                    st["outside_chemical_system"] += 1
                    continue
                cand = self._candidate(structure, {"e_hull": float(e_hull), "chemical_system": chemsys},
                                       iteration, int(meta["sample_index"]), seed)
                out.append(cand)
        st["accepted"] += len(out)
        valid = st["sampled"] - sum(st["rejected"].values())
        st["violation_rate"] = st["outside_chemical_system"] / valid if valid else None
        st["model"] = str(self.checkpoint)
        logger.info(
            "mattergen %s: %d/%d accepted from %d draws; outside %s: %d (rate %s); rejected %s",
            tag, len(out), n, drawn, chemsys, st["outside_chemical_system"], st["violation_rate"], st["rejected"],
        )
        return out


def _mattergen(settings: GeneratorSettings) -> Generator:
    return MatterGenGenerator(settings)


GENERATORS["mattergen"] = _mattergen


# ------------------------------------------------------------------------- fine-tuning




_RELAX_STEP = re.compile(r"^(?P<copy>.+-relax\d+)-s(?P<step>\d+)$")


def relaxed_frames(frames: Sequence[Frame]) -> list[Frame]:
    """One equilibrium frame per labelled candidate: its DFT-relaxed (final) structure.

    Per candidate, the last ionic step of each protocol relaxation (frame ids
    ``<candidate>-relax<j>-s<step>``; the protocol always keeps the last step) and the
    lowest energy per atom among them, as the protocol's converged structure. Frames given
    as ``unperturbed`` are taken as they are (equilibrium structures labelled without the
    protocol). Perturbed and static frames are off-equilibrium and never targets.
    """
    from cscflow.datasets import flatten_frames

    last: dict[str, Frame] = {}
    for f in flatten_frames(frames):
        if f.kind == "unperturbed":
            last.setdefault(f.frame_id, f)
            continue
        m = _RELAX_STEP.match(f.frame_id) if f.kind == "relax_step" else None
        if m is None:
            continue
        held = last.get(m["copy"])
        if held is None or int(m["step"]) > int(_RELAX_STEP.match(held.frame_id)["step"]):
            last[m["copy"]] = f
    best: dict[tuple[str, str], Frame] = {}
    for f in last.values():
        key = (f.provenance.candidate_id, f.labeller)
        if key not in best or f.energy_per_atom < best[key].energy_per_atom:
            best[key] = f
    return list(best.values())


def labelled_e_hull(
    frames: Sequence[Frame], references: Sequence[ReferenceEntry] = ()
) -> list[tuple[Frame, float]]:
    """E_hull (eV/atom) of each candidate's relaxed frame against the labeller's own hull.

    Targets are :func:`relaxed_frames` (paper: DFT E_hull of the relaxed structures). The
    hull holds every relaxed frame, among them the iteration-0 references labelled by the
    same protocol, plus the ``references`` computed with the labeller's model
    (``ReferenceEntry.model`` appearing in ``Frame.labeller``); energies of different
    models are never mixed. Raises ValueError when the hull misses an element.
    """
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

    eq = relaxed_frames(frames)
    if not eq:
        raise ValueError("no relaxed (final relaxation step) labelled frames to fine-tune the generator on")
    labellers = {f.labeller for f in eq}
    if len(labellers) > 1:
        raise ValueError(f"labelled frames come from several labellers {sorted(labellers)}: one hull needs one")
    refs = [r for r in references if any(r.model and r.model in lab for lab in labellers)]
    entries = [PDEntry(f.structure.composition, f.energy) for f in eq]
    ref_entries = [PDEntry(r.structure.composition, r.energy_per_atom * len(r.structure)) for r in refs]
    elements = sorted({el for e in entries for el in e.composition.elements})
    try:
        pd = PhaseDiagram(entries + ref_entries, elements=elements)
    except ValueError as exc:
        raise ValueError(
            f"cannot build the labeller's hull ({exc}); labellers {sorted(labellers)}, "
            f"{len(refs)} references computed with the same model: label the elemental references too"
        ) from None
    return [(f, float(pd.get_e_above_hull(e, allow_negative=True))) for f, e in zip(eq, entries)]


class FinetuneGeneratorOutput(BaseModel):
    """The fine-tuned generator checkpoint handed to the next iteration's Generate."""

    checkpoint: str
    parent: str
    iteration: int
    n_structures: int
    e_hull_mean: float | None = None
    e_hull_min: float | None = None
    steps: int = 0
    final_loss: float | None = None
    n_references_in_hull: int = 0
    seconds: float = 0.0


@dataclass
class FinetuneGeneratorMaker(Maker):
    """Fine-tune MatterGen on every labelled candidate's relaxed structure and its DFT E_hull.

    Both property adapters (chemical_system, energy_above_hull); starts from ``checkpoint``
    (the current generator model) and writes ``<output_dir>/it<iteration>`` (default: the
    job's working directory).
    """

    name: str = "finetune_generator"
    max_steps: int = 200
    batch_size: int = 16
    lr: float | None = None  # None: the checkpoint's optimiser setting
    device: str = "auto"
    output_dir: str | None = None

    @job
    @resumable
    def make(
        self,
        frames: list[Frame] | list[list[Frame]],
        checkpoint: str,
        iteration: int,
        seed: int = 0,
        references: list[ReferenceEntry] = (),
    ) -> FinetuneGeneratorOutput:
        return finetune_generator(
            frames, checkpoint, iteration, seed, references,
            max_steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, device=self.device,
            output_dir=self.output_dir,
        )


def finetune_generator(
    frames, checkpoint, iteration: int, seed: int = 0, references=(), *, max_steps=200, batch_size=16,
    lr=None, device="auto", output_dir=None, worker: MatterGenWorker | None = None,
) -> FinetuneGeneratorOutput:
    """The work of :class:`FinetuneGeneratorMaker`, without jobflow."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"generator checkpoint to fine-tune not found: {checkpoint}")
    pairs = labelled_e_hull(frames, references)
    structures = [f.structure for f, _ in pairs]
    e_hull = [e for _, e in pairs]
    out_dir = Path(output_dir or Path.cwd() / "mattergen_finetune") / f"it{iteration}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    own = worker is None
    worker = worker or MatterGenWorker()
    try:
        res = worker.finetune(checkpoint, structures, e_hull, out_dir, max_steps=max_steps,
                              batch_size=batch_size, lr=lr, device=device,
                              seed=int(np.random.default_rng([seed, iteration]).integers(2**30)))
    finally:
        if own:
            worker.close()
    labellers = {f.labeller for f, _ in pairs}
    return FinetuneGeneratorOutput(
        checkpoint=str(out_dir.resolve()),
        parent=str(checkpoint.resolve()),
        iteration=iteration,
        n_structures=len(structures),
        e_hull_mean=float(np.mean(e_hull)),
        e_hull_min=float(np.min(e_hull)),
        steps=int(res.get("steps_done", 0)),
        final_loss=res.get("final_loss_train"),
        n_references_in_hull=sum(1 for r in references if any(r.model and r.model in lab for lab in labellers)),
        seconds=time.perf_counter() - t0,
    )
