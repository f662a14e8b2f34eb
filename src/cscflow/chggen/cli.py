"""``cscflow chggen SPEC.yaml [--run-dir]``: run CHGGen locally and print its headline numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from cscflow.user_errors import user_errors

__all__ = ["chggen_command", "format_report", "run_chggen"]


def run_chggen(spec_path: str | Path, run_dir: str | Path):
    """Run the CHGGen flow with run_locally in ``run_dir``; returns the ChgGenReport."""
    from jobflow import run_locally

    from cscflow.chggen.flow import ChgGenReport, chggen_flow
    from cscflow.chggen.settings import load_chggen_spec
    from cscflow.runner import RunError
    from cscflow.stores import build_job_store

    spec = load_chggen_spec(spec_path)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(spec.to_yaml())
    store = build_job_store(spec.store, run_dir)
    jobs_dir = run_dir / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    flow = chggen_flow(spec)
    responses = run_locally(flow, store=store, root_dir=jobs_dir, create_folders=True, log=False)
    for by_index in responses.values():
        for response in by_index.values():
            if isinstance(getattr(response, "output", None), ChgGenReport):
                report = response.output
                (run_dir / "chggen_report.json").write_text(json.dumps(report.model_dump(mode="json"), indent=1))
                return report
    raise RunError(f"the CHGGen flow stopped before its report (see the log above); run dir {run_dir}")


def _rate(d: dict) -> str:
    if not d or d.get("rate") is None:
        return "n/a (no relaxed structures)"
    by = ", ".join(f"{k} atoms: {v:.2f}" for k, v in d["by_atoms"].items())
    return f"{d['rate']:.3f} ({d['n_symmetric']}/{d['n']}; {by})"


def format_report(report) -> str:
    lines = [
        f"symmetry success rate (space group >= {report.success_unconditional.get('min_space_group', 3)}, "
        f"symprec {report.success_unconditional.get('symprec')} Å):",
        f"  unconditional: {_rate(report.success_unconditional)}",
        f"  inpainting:    {_rate(report.success_inpainting)}",
        f"frameworks symmetrized: {report.framework_success}",
    ]
    for m, f in report.funnel.items():
        lines.append(f"  {m}: requested {f['requested']}, generated {f['generated']} "
                     f"(failed: {f['generation_failures'] or 'none'}), relaxed {f['relaxed']} "
                     f"(rejected: {f['rejected'] or 'none'})")
    for m in ("unconditional", "inpainting"):
        de, rm, ed = report.delta_e.get(m, {}), report.rmsd.get(m, {}), report.e_d.get(m, {})
        lines.append(f"  {m}: median ΔE {de.get('median', float('nan')):.3f} eV/atom, median RMSD "
                     f"{rm.get('median', float('nan')):.3f} Å, median E_d {ed.get('median', float('nan')):.3f} eV/atom")
    lines.append(f"to DFT (E_d below threshold): {report.n_to_dft}")
    lines.append(f"coordination numbers from {report.coordination_method}")
    lines.append("wall time per stage (s):")
    lines += [f"  {k:20s} {v:8.1f}" for k, v in report.wall_seconds.items()]
    return "\n".join(lines)


@click.command("chggen")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<spec name>-chggen).")
@user_errors
def chggen_command(spec, run_dir):
    """CHGGen: lattice search, unconditional generation, framework symmetrization, RePaint inpainting."""
    from cscflow.chggen.settings import load_chggen_spec
    from cscflow.cli_logging import configure_logging

    configure_logging()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    resolved = load_chggen_spec(spec)
    target = run_dir or os.path.join("runs", f"{resolved.name}-chggen")
    report = run_chggen(spec, target)
    click.echo(format_report(report))
