"""RePaint inpainting with MatterGen's score model (CHGGen, paper 002 §2-3).

Runs inside ``.venv-mattergen`` (numpy<2), like the rest of this package. Two requests use it:

- ``inpaint``: each input structure carries a per-atom host flag (extxyz array
  ``cscflow_host``). Host atoms are a fixed framework: at every reverse step their rows are
  re-noised to the current noise level around their clean fractional coordinates,
  ``wrap(x0 + sigma(s) z)`` (exactly ``x0`` after the last step), while the guest rows keep
  the model's predictor/corrector update. Each step is resampled ``resample_steps`` times
  ("jump back": ``wrap(x_s + sqrt(sigma_t^2 - sigma_s^2) z)`` and denoise again; RePaint).
  Lattice and species are held fixed by default; ``fix_cell=False`` denoises the cell from
  the lattice prior, ``fix_species=False`` the guests' species from the D3PM prior (host
  species always clean). Jump-back re-noises positions only.
- ``sample_in_cells``: the same sampler with no host atoms: positions generated in given
  cells for given species (CHGGen's unconditional step on a random-search lattice).

Why not mattergen's own ``mask``: it pins masked values at clean x0 (no re-noising, which
is what makes the guests see a consistent noisy context), has no resampling, and its
``lerp`` fails on integer species.

The host rows written back are the input's float64 fractional coordinates and the cell is
the input cell (the model sees a float32, polar-decomposed copy), so the framework is
unchanged to machine precision. Cost per batch: N x r x (1 + corrector steps) score
evaluations (twice with classifier-free guidance); the count is returned.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Any

import numpy as np

from .core import check_sample

logger = logging.getLogger("mattergen_worker")

HOST_KEY = "cscflow_host"


def _repaint_class():
    import torch

    from mattergen.diffusion.corruption.multi_corruption import apply
    from mattergen.diffusion.sampling.classifier_free_guidance import GuidedPredictorCorrector

    class RePaintPredictorCorrector(GuidedPredictorCorrector):
        """Guided predictor-corrector whose denoising loop keeps a host fixed (RePaint)."""

        def __init__(self, *, resample_steps: int = 1, **kwargs):
            super().__init__(**kwargs)
            if resample_steps < 1:
                raise ValueError(f"resample_steps must be >= 1, got {resample_steps}")
            self.resample_steps = int(resample_steps)
            self.n_score_evaluations = 0

        def _score_fn(self, x, t):
            self.n_score_evaluations += 1
            return super()._score_fn(x, t)

        @torch.no_grad()
        def inpaint(self, batch, host: "torch.Tensor", fix_cell: bool = True, fix_species: bool = True):
            """(sample, mean) of a batch whose ``host`` rows (bool, per atom) stay on the framework."""
            if isinstance(self._diffusion_module, torch.nn.Module):
                self._diffusion_module.eval()
            mc = self._multi_corruption
            batch = batch.to(self._device)
            host = host.to(self._device).bool()
            hcol = host[:, None]
            guest = ~host
            pos_sde = mc.corruptions["pos"]
            x0 = batch.pos.clone()
            z0 = batch.atomic_numbers.clone()
            idx = mc._get_batch_indices(batch)

            def sigma(t_value: float) -> "torch.Tensor":
                t = torch.full((batch.get_batch_size(),), float(t_value), device=self._device)
                return pos_sde.marginal_prob(x0, t, batch_idx=idx["pos"], batch=batch)[1]

            def host_at(t_value: float | None) -> "torch.Tensor":
                if t_value is None:
                    return x0
                return pos_sde.wrap(x0 + sigma(t_value) * torch.randn_like(x0))

            # prior: guests from the position prior, host noised to sigma(T) around x0
            prior_pos = pos_sde.prior_sampling(shape=x0.shape, conditioning_data=batch, batch_idx=idx["pos"])
            prior_pos = prior_pos.to(self._device)
            fields: dict[str, Any] = {"pos": torch.where(hcol, host_at(self._max_t), prior_pos)}
            if not fix_cell:
                fields["cell"] = mc.corruptions["cell"].prior_sampling(
                    shape=batch.cell.shape, conditioning_data=batch, batch_idx=idx["cell"]
                ).to(self._device)
            if not fix_species:
                prior_z = mc.corruptions["atomic_numbers"].prior_sampling(
                    shape=z0.shape, conditioning_data=batch, batch_idx=idx["atomic_numbers"]
                ).to(self._device)
                fields["atomic_numbers"] = torch.where(host, z0, prior_z.long())
            batch = batch.replace(**fields)
            mean_batch = batch.clone()

            timesteps = torch.linspace(self._max_t, self._eps_t, self.N, device=self._device)
            dt = -torch.tensor((self._max_t - self._eps_t) / (self.N - 1)).to(self._device)

            def reimpose(b, pos_host):
                upd = {"pos": torch.where(hcol, pos_host, b.pos)}
                if not fix_species:
                    upd["atomic_numbers"] = torch.where(host, z0, b.atomic_numbers)
                return b.replace(**upd)

            def step(fns_owner, b, mb, t, broadcast):
                score = self._score_fn(b, t)
                samples_means = apply(
                    fns=fns_owner, broadcast=broadcast, x=b, score=score, batch_idx=mc._get_batch_indices(b)
                )
                b = b.replace(**{k: v[0] for k, v in samples_means.items()})
                mb = mb.replace(**{k: v[1] for k, v in samples_means.items()})
                return b, mb

            corr_fns = {k: c.step_given_score for k, c in self._correctors.items()}
            pred_fns = {k: p.update_given_score for k, p in self._predictors.items()}
            for i in range(self.N):
                t_now = float(timesteps[i])
                t_next = t_now + float(dt)
                last = i == self.N - 1
                t = torch.full((batch.get_batch_size(),), t_now, device=self._device)
                for u in range(self.resample_steps):
                    for _ in range(self._n_steps_corrector if corr_fns else 0):
                        batch, mean_batch = step(corr_fns, batch, mean_batch, t, {"t": t, "dt": dt})
                        batch = reimpose(batch, host_at(t_now))
                    batch, mean_batch = step(pred_fns, batch, mean_batch, t, {"t": t, "batch": batch, "dt": dt})
                    batch = reimpose(batch, host_at(None if last else t_next))
                    mean_batch = reimpose(mean_batch, x0)
                    if u < self.resample_steps - 1 and not last:
                        # jump back from sigma(t_next) to sigma(t_now) and denoise the step again
                        s_now, s_next = sigma(t_now), sigma(t_next)
                        extra = torch.sqrt(torch.clamp(s_now**2 - s_next**2, min=0.0))
                        jumped = pos_sde.wrap(batch.pos + extra * torch.randn_like(batch.pos))
                        batch = reimpose(batch.replace(pos=jumped), host_at(t_now))
            # the final positions of the host are exactly x0 in both
            return reimpose(batch, x0), reimpose(mean_batch, x0)

    return RePaintPredictorCorrector


def build_sampler(module, num_steps: int, resample_steps: int, n_steps_corrector: int, guidance: float,
                  fix_cell: bool, fix_species: bool):
    """RePaint sampler: position predictor/corrector (+ cell / species ones when they are free)."""
    from mattergen.common.diffusion.predictors_correctors import (
        LatticeAncestralSamplingPredictor,
        LatticeLangevinDiffCorrector,
    )
    from mattergen.diffusion.d3pm.d3pm_predictors_correctors import D3PMAncestralSamplingPredictor
    from mattergen.diffusion.wrapped.wrapped_predictors_correctors import (
        WrappedAncestralSamplingPredictor,
        WrappedLangevinCorrector,
    )
    from mattergen.property_embeddings import SetConditionalEmbeddingType, SetUnconditionalEmbeddingType

    predictors = {"pos": partial(WrappedAncestralSamplingPredictor)}
    correctors = {"pos": partial(WrappedLangevinCorrector, max_step_size=1e6, snr=0.4)}
    if not fix_cell:
        predictors["cell"] = partial(LatticeAncestralSamplingPredictor)
        correctors["cell"] = partial(LatticeLangevinDiffCorrector, max_step_size=1e6, snr=0.2)
    if not fix_species:
        predictors["atomic_numbers"] = partial(D3PMAncestralSamplingPredictor, predict_x0=True)
    cls = _repaint_class()
    return cls.from_pl_module(
        pl_module=module,
        N=num_steps,
        eps_t=1.0 / num_steps,
        guidance_scale=float(guidance),
        remove_conditioning_fn=SetUnconditionalEmbeddingType(),
        keep_conditioning_fn=SetConditionalEmbeddingType(),
        predictor_partials=predictors,
        corrector_partials=correctors if n_steps_corrector > 0 else None,
        n_steps_corrector=max(int(n_steps_corrector), 1),
        resample_steps=resample_steps,
    )


def _chemgraph(atoms, transforms):
    import torch

    from mattergen.common.data.chemgraph import ChemGraph
    from mattergen.common.utils.data_utils import compute_lattice_polar_decomposition

    frac = np.mod(atoms.get_scaled_positions(wrap=False), 1.0)
    cell = torch.tensor(np.asarray(atoms.cell[:]), dtype=torch.float)[None]
    n = len(atoms)
    data = ChemGraph(
        pos=torch.tensor(frac, dtype=torch.float) % 1.0,
        cell=compute_lattice_polar_decomposition(cell),
        atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.long),
        num_atoms=torch.tensor(n),
        num_nodes=torch.tensor(n),
    )
    for t in transforms:
        data = t(data)
    return data


def inpaint(
    sampler_obj,
    in_file: str,
    out_file: str,
    resample_steps: int = 1,
    n_steps_corrector: int = 1,
    guidance_factor: float = 0.0,
    conditions: dict | None = None,
    batch_size: int = 16,
    seed: int = 0,
    fix_cell: bool = True,
    fix_species: bool = True,
    max_volume_per_atom: float = 150.0,
    min_distance: float = 0.5,
) -> dict:
    """Inpaint the guests of every structure in ``in_file`` (extxyz); valid results to ``out_file``.

    ``sampler_obj`` is a loaded :class:`core.Sampler`. Atoms without the ``cscflow_host``
    array are all guests (``sample_in_cells``).
    """
    import ase.io
    import torch
    from ase import Atoms

    from mattergen.common.data.collate import collate
    from mattergen.common.data.transform import SetProperty

    conditions = dict(conditions or {})
    unknown = set(conditions) - set(sampler_obj.conditions)
    if unknown:
        raise ValueError(f"checkpoint {sampler_obj.checkpoint} cannot condition on {sorted(unknown)}")
    if not fix_cell and not fix_species:
        logger.info("inpaint: cell and guest species both free")
    structures = ase.io.read(in_file, index=":", format="extxyz")
    if not structures:
        raise ValueError(f"{in_file}: no structures to inpaint")
    transforms = [SetProperty(k, (float(v) if isinstance(v, (int, float)) else v)) for k, v in conditions.items()]
    module = sampler_obj.module
    cell_sde = module.diffusion_module.corruption.sdes["cell"]
    sampler = build_sampler(module, sampler_obj.num_steps, resample_steps, n_steps_corrector, guidance_factor,
                            fix_cell, fix_species)
    rng = np.random.default_rng(seed)
    accepted, reasons, rejected = [], {}, {}
    t0 = time.perf_counter()
    n_eval = 0
    for b0 in range(0, len(structures), batch_size):
        chunk = structures[b0:b0 + batch_size]
        hosts = [np.asarray(a.arrays.get(HOST_KEY, np.zeros(len(a))), dtype=bool) for a in chunk]
        batch = collate([_chemgraph(a, transforms) for a in chunk])
        host = torch.tensor(np.concatenate(hosts), dtype=torch.bool)
        batch_seed = int(rng.integers(2**30))
        torch.manual_seed(batch_seed)
        before = sampler.n_score_evaluations
        try:
            _, mean = sampler.inpaint(batch, host, fix_cell=fix_cell, fix_species=fix_species)
        except Exception as exc:  # noqa: BLE001  (a crashing batch is recorded, never kills the worker)
            reason = f"sampling_crashed:{type(exc).__name__}"
            logger.warning("inpainting %d structures crashed: %s", len(chunk), exc)
            for j in range(len(chunk)):
                rejected[b0 + j] = reason
            reasons[reason] = reasons.get(reason, 0) + len(chunk)
            continue
        finally:
            n_eval = sampler.n_score_evaluations
        per_batch = sampler.n_score_evaluations - before
        pos = mean.pos.detach().cpu().double().numpy()
        z = mean.atomic_numbers.detach().cpu().numpy()
        cells = mean.cell.detach().cpu().double().numpy()
        start = 0
        for j, a in enumerate(chunk):
            n = len(a)
            h = hosts[j]
            frac = pos[start:start + n].copy()
            numbers = np.asarray(a.numbers).copy()
            orig = np.asarray(a.get_scaled_positions(wrap=False), dtype=float)
            frac[h] = orig[h]  # host: the input's own float64 coordinates (held by construction)
            if not fix_species:
                numbers[~h] = z[start:start + n][~h]
            cell = np.asarray(a.cell[:]) if fix_cell else cells[j]
            start += n
            out = Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)
            out.arrays[HOST_KEY] = h.astype(int)
            out.info = {**{k: v for k, v in a.info.items() if isinstance(v, (int, float, str, np.integer, np.floating))},
                        "sample_index": b0 + j, "batch_seed": batch_seed,
                        "score_evaluations_batch": per_batch}
            reason = None
            if np.any(numbers <= 0) or np.any(numbers > 118):
                reason = "invalid_species"
            else:
                from pymatgen.io.ase import AseAtomsAdaptor

                reason = check_sample(AseAtomsAdaptor.get_structure(out), max_volume_per_atom, min_distance)
            if reason:
                rejected[b0 + j] = reason
                reasons[reason] = reasons.get(reason, 0) + 1
                continue
            accepted.append(out)
    ase.io.write(out_file, accepted, format="extxyz")
    n_corr = n_steps_corrector if n_steps_corrector > 0 else 0
    return {
        "n_requested": len(structures),
        "n_accepted": len(accepted),
        "rejected": {str(k): v for k, v in rejected.items()},
        "reasons": reasons,
        "seconds": time.perf_counter() - t0,
        "num_steps": sampler_obj.num_steps,
        "resample_steps": int(resample_steps),
        "n_steps_corrector": n_corr,
        "n_score_evaluations": int(n_eval),
        "score_evaluations_per_batch": sampler_obj.num_steps * int(resample_steps) * (1 + n_corr),
        "n_batches": math.ceil(len(structures) / batch_size),
        "device": sampler_obj.device,
        "out_file": out_file,
        "cell_sde_limit_density": float(getattr(cell_sde, "limit_density", float("nan"))),
    }


INPAINT_KEYS = ("in_file", "out_file", "resample_steps", "n_steps_corrector", "guidance_factor", "conditions",
                "batch_size", "seed", "fix_cell", "fix_species", "max_volume_per_atom", "min_distance")


def handle(sampler_obj, req: dict) -> dict:
    """Server entry for ``inpaint`` / ``sample_in_cells`` (the latter has no host atoms)."""
    kwargs = {k: req[k] for k in INPAINT_KEYS if k in req}
    return inpaint(sampler_obj, **kwargs)
