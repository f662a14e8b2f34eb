"""The `cscflow` command line. User errors print one line per problem, no traceback."""

from __future__ import annotations

import os

import click

from cscflow.chggen.settings import is_chggen_spec
from cscflow.cli_logging import configure_logging
from cscflow.config import load_spec
from cscflow.user_errors import user_errors


@click.group()
@click.version_option(package_name="cscflow")
def main():
    """Chemical-space completeness flows: explore a chemical system with generative models, MLFFs and DFT."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@user_errors
def validate(spec):
    """Validate SPEC.yaml (exploration or CHGGen) and print the resolved spec, defaults filled in."""
    if is_chggen_spec(spec):
        from cscflow.chggen.settings import load_chggen_spec

        resolved = load_chggen_spec(spec)
    else:
        resolved = load_spec(spec)
    click.echo(resolved.to_yaml(), nl=False)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<spec name>).")
@user_errors
def explore(spec, run_dir):
    """Run an exploration locally (jobflow run_locally, embedded store by default)."""
    from cscflow.runner import explore as run_explore, format_status

    if is_chggen_spec(spec):
        raise click.UsageError(f"{spec} is a CHGGen spec (it has a chggen: block): run `cscflow chggen {spec}`")
    configure_logging()
    resolved = load_spec(spec)
    run_dir = run_dir or os.path.join("runs", resolved.name)
    run_explore(spec, run_dir)
    click.echo(format_status(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@user_errors
def resume(run_dir):
    """Finish an interrupted run without recomputing finished stages."""
    from cscflow.runner import format_status, resume as run_resume

    configure_logging()
    run_resume(run_dir)
    click.echo(format_status(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@user_errors
def status(run_dir):
    """One row per finished iteration of a run."""
    from cscflow.runner import format_status

    click.echo(format_status(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--only", type=click.Choice(["qha", "conductivity"]), default=None, help="Run one screen only.")
@click.option("--quick", is_flag=True, help="Laptop sizes (volumes 0.95-1.05, 8 Å phonon cells, 0.5 ps MD in 6 Å cells): every table and figure in minutes, not production numbers.")
@click.option("--model", type=click.Choice(["forcefield", "trained"]), default="forcefield", show_default=True,
              help="The spec's force field, or the run's last trained DPA-3 model.")
@click.option("--max-structures", type=int, default=None, help="Screen only the N lowest-E_hull candidates.")
@user_errors
def downstream(run_dir, only, quick, model, max_structures):
    """QHA P-T phase diagrams and Li-conductivity MD screening of a finished run (then: cscflow report)."""
    from cscflow.downstream.on_run import run_downstream

    configure_logging()
    outputs = run_downstream(run_dir, only=only, quick=quick, model=model, max_structures=max_structures)
    qha, md = outputs.get("qha"), outputs.get("conductivity")
    if qha is not None:
        done = sum(r.status == "done" for r in qha.results)
        click.echo(f"qha: {done}/{len(qha.results)} structures with G(T, p); {len(qha.hulls)} Gibbs hulls; {qha.seconds:.0f} s")
        soft = [r.id for r in qha.results if any(f < -0.1 for f in r.min_frequencies)]
        if soft and qha.settings.get("ignore_imaginary"):
            click.echo(f"qha: imaginary modes kept (--quick) in {len(soft)} structures: {', '.join(soft[:5])}"
                       + (f" and {len(soft) - 5} more" if len(soft) > 5 else ""))
    if md is not None:
        click.echo(f"conductivity: {md.n_passed_filters}/{md.n_input} passed the filters, {md.n_simulated} simulated, "
                   f"{md.n_kinetically_stable} kinetically stable, {md.n_conductors} conductors; {md.seconds:.0f} s")
    click.echo(f"tables and figures: cscflow report {run_dir}")


def _register_optional_commands():
    """Commands that live next to their analysis code."""
    try:
        from cscflow.analysis.motifs import motifs_command
    except ImportError:  # pragma: no cover - the analysis package is part of cscflow
        return
    main.add_command(motifs_command, name="motifs")
    from cscflow.chggen.cli import chggen_command

    main.add_command(chggen_command, name="chggen")
    from cscflow.analysis.report_cli import report_command

    main.add_command(report_command, name="report")


_register_optional_commands()

from cscflow.dispatch import submit_command  # noqa: E402  (FireWorks is imported lazily)

main.add_command(submit_command, name="submit")


if __name__ == "__main__":  # pragma: no cover
    main()
