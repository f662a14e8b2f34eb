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
    """Validate SPEC.yaml (exploration or CHGGen) and print the resolved spec, defaults filled in.

    Also checks what the run needs from this machine: the store, the labeller's program
    (VASP, CP2K) and the seed files."""
    from cscflow.prerequisites import check_prerequisites

    if is_chggen_spec(spec):
        from cscflow.chggen.settings import load_chggen_spec

        resolved = load_chggen_spec(spec)
    else:
        resolved = load_spec(spec)
    for warning in check_prerequisites(resolved):
        click.echo(f"warning: {warning}", err=True)
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
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@user_errors
def find(run_dir, files):
    """Did the run find these structures? The closest candidate (StructureMatcher) of each,
    with its iteration, generator condition and E_hull."""
    from cscflow.find import find_in_run, format_find

    click.echo(format_find(find_in_run(run_dir, list(files))))


@main.command(name="model-errors")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@user_errors
def model_errors(run_dir):
    """Every model of a run on ONE fixed test set (the last Train's test frames): the untuned
    force field, then each iteration's trained model; energy and force RMSE."""
    from cscflow.model_errors import fixed_test_errors, format_errors

    click.echo(format_errors(fixed_test_errors(run_dir)))


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


@main.command(name="compare-mlff")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--backends", default="deepmd,mace,mattersim", show_default=True,
              help="Comma-separated families: deepmd, mace, mattersim, chgnet, sevenn.")
@click.option("--n-train", "n_train", default="50,100,200", show_default=True,
              help="Comma-separated training-set sizes (top-N frames by entropy gain).")
@click.option("--train-iterations-max", type=int, default=None,
              help="Iterations 0..K form the training pool (default: the spec's training.train_iterations_max).")
@click.option("--epochs", type=int, default=None, help="Override every family's training length (quick looks).")
@click.option("--training", "training_file", type=click.Path(dir_okay=False), default=None,
              help="YAML of training settings laid over the run's (e.g. per-family sizes: mace: {num_channels: 8}).")
@click.option("--submit", "submit_jobs", is_flag=True,
              help="Add the trainings to a FireWorks LaunchPad (GPU category) instead of running them here.")
@click.option("--launchpad", "-l", type=click.Path(dir_okay=False), default=None,
              help="With --submit: LaunchPad YAML (default: FireWorks' lookup).")
@click.option("--local", is_flag=True, help="With --submit: the LaunchPad on the run's local server (laptop mode).")
@user_errors
def compare_mlff(run_dir, backends, n_train, train_iterations_max, epochs, training_file, submit_jobs, launchpad,
                 local):
    """Train MLFF families on the same entropy-ranked frames of a run; Fig. 3a + parity plots."""
    from cscflow.analysis.mlff_compare import format_table, load_training_overrides, run_compare, submit_compare
    from cscflow.dispatch import local_worker_commands
    from cscflow.runner import RunError

    configure_logging()
    try:
        sizes = [int(x) for x in n_train.split(",") if x.strip()]
    except ValueError:
        raise RunError(f"--n-train must be comma-separated integers, got {n_train!r}") from None
    if (launchpad or local) and not submit_jobs:
        raise RunError("--launchpad and --local go with --submit")
    names = [b.strip() for b in backends.split(",") if b.strip()]
    training = load_training_overrides(training_file) if training_file else None
    request = dict(backends=names, n_train=sizes, train_iterations_max=train_iterations_max, epochs=epochs,
                   training=training)
    if not submit_jobs:
        click.echo(format_table(run_compare(run_dir, **request)))
        return
    sub, plan = submit_compare(run_dir, launchpad=launchpad, local=local, **request)
    cats = ", ".join(f"{k}: {v}" for k, v in sorted(sub.categories.items()))
    click.echo(f"submitted {sub.workflow_name}: {len(sub.fw_ids)} Fireworks ({cats}) to {sub.launchpad}")
    click.echo(f"{len(plan.backends)} families x N_train {plan.sizes} on {len(plan.ranked)} ranked frames; "
               f"test set {len(plan.test)} frames")
    if sub.local:
        embedded = not plan.data.spec.store.uri
        click.echo("start the workers (Ctrl-C them when the report job is COMPLETED)"
                   + (", one at a time (the run's embedded store takes one worker):" if embedded else ":"))
        for line in local_worker_commands(sub.run_dir):
            click.echo(f"  {line}")
    elif sub.worker_env:
        click.echo(f"workers need: source {sub.run_dir / 'worker_env.sh'}   (embedded store: one worker at a time)")
    click.echo(f"then the table: cscflow compare-mlff {run_dir} with the same options, without --submit "
               "(reuses the stored trainings)")


def _register_optional_commands():
    """Commands that live next to their analysis code."""
    from cscflow.analysis.motifs import motifs_command

    main.add_command(motifs_command, name="motifs")
    from cscflow.chggen.cli import chggen_command

    main.add_command(chggen_command, name="chggen")
    from cscflow.analysis.report_cli import report_command

    main.add_command(report_command, name="report")


_register_optional_commands()

@main.command("submit")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--launchpad", "-l", type=click.Path(dir_okay=False), default=None,
              help="LaunchPad YAML (default: FireWorks' lookup: FW_config.yaml, ~/.fireworks/my_launchpad.yaml).")
@click.option("--local", is_flag=True,
              help="Laptop mode: a local MongoDB-wire server in the run dir holds the LaunchPad and the results; "
                   "one worker per category, several at once.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<spec name>); holds run.json and the embedded store.")
@click.option("--jobflow-remote", "remote_project", default=None, metavar="PROJECT",
              help="Submit to this jobflow-remote project instead of FireWorks (workers from dispatch.remote_workers).")
@user_errors
def submit(spec, launchpad, local, run_dir, remote_project):
    """Submit SPEC.yaml as a FireWorks workflow; run it with rlaunch/qlaunch workers."""
    from cscflow.dispatch import DispatchError, local_worker_commands, submit as submit_fireworks

    if remote_project is not None:
        if local or launchpad:
            raise DispatchError("--jobflow-remote excludes --local and --launchpad")
        from cscflow.remote import submit_remote

        rsub = submit_remote(spec, remote_project, run_dir=run_dir)
        workers = ", ".join(f"{k}: {v}" for k, v in sorted(rsub.workers.items()))
        click.echo(f"submitted run {rsub.run_id}: {len(rsub.job_ids)} jobs ({workers}) to jobflow-remote project "
                   f"{remote_project}")
        click.echo(f"run directory: {rsub.run_dir}")
        click.echo(f"run it:  jf -p {remote_project} runner start ; watch: jf -p {remote_project} job list")
        return
    sub = submit_fireworks(spec, run_dir=run_dir, launchpad=launchpad, local=local)
    cats = ", ".join(f"{k}: {v}" for k, v in sorted(sub.categories.items()))
    click.echo(f"submitted run {sub.run_id}: {len(sub.fw_ids)} Fireworks ({cats}) to {sub.launchpad}")
    click.echo(f"run directory: {sub.run_dir}")
    env_file = sub.run_dir / "worker_env.sh"
    if sub.local:
        click.echo("start the workers, each in its own terminal (they may run at once; Ctrl-C them when "
                   f"`cscflow status {sub.run_dir}` says finished):")
        for line in local_worker_commands(sub.run_dir):
            click.echo(f"  {line}")
        click.echo(f"stop the local server when done: cscflow server stop {sub.run_dir}")
    else:
        if sub.worker_env:
            click.echo(f"workers need: source {env_file}   (embedded store: one worker at a time)")
        click.echo("run it:  qlaunch -c fworker_configs/gpu rapidfire ; qlaunch -c fworker_configs/cpu rapidfire")


@main.group()
def server():
    """The local MongoDB-wire server of a `cscflow submit --local` run (secantusd-py, its own process)."""


def _run_server(run_dir):
    from cscflow.dispatch import SERVER_DIR
    from cscflow.localserver import LocalServer
    from cscflow.runner import RunError

    path = os.path.join(run_dir, SERVER_DIR)
    if not os.path.isfile(os.path.join(path, "server.json")):
        raise RunError(f"{run_dir}: no local server (only `cscflow submit --local` runs have one)")
    return LocalServer(path)


@server.command("start")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@user_errors
def server_start(run_dir):
    """Start RUN_DIR's server again on its data and port (reuses a running one)."""
    from cscflow.localserver import LocalServerError
    from cscflow.runner import RunError

    srv = _run_server(run_dir)
    try:
        srv.start()
    except LocalServerError as exc:
        raise RunError(str(exc)) from None
    click.echo(f"server {srv.uri} (pid {srv.pid}) on {srv.storage}")


@server.command("stop")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@user_errors
def server_stop(run_dir):
    """Stop RUN_DIR's server (SIGTERM, then kill); its data stay for `cscflow server start`."""
    srv = _run_server(run_dir)
    click.echo(f"stopped {srv.uri}" if srv.stop() else f"{srv.uri} was not running")


@server.command("status")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@user_errors
def server_status(run_dir):
    """Whether RUN_DIR's server is running, and its URI."""
    srv = _run_server(run_dir)
    click.echo(f"{srv.uri} {'running (pid %s)' % srv.pid if srv.running() else 'stopped'} on {srv.storage}")

from cscflow.plan import plan_command  # noqa: E402  (builds, never runs, a workflow)

main.add_command(plan_command(), name="plan")


if __name__ == "__main__":  # pragma: no cover
    main()
