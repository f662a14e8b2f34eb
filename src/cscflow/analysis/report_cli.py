"""``cscflow report RUN_DIR``: the exploration report, or the CHGGen report of a chggen run."""

from __future__ import annotations

import os

import click

from cscflow.user_errors import user_errors

__all__ = ["report_command"]


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: RUN_DIR/report).")
@click.option("--top", default=20, show_default=True, type=click.IntRange(min=1),
              help="Rows in the top-candidates table.")
@click.option("--no-parity", is_flag=True, help="Skip evaluating models on test frames (parity plots, the fixed-test-set table).")
@click.option("--no-tsne", is_flag=True, help="Skip fingerprints and t-SNE maps (the slowest part).")
@click.option("--anion-map", is_flag=True, help="Also map the Li-removed anion frameworks.")
@click.option("--seed", default=0, show_default=True, help="t-SNE seed.")
@user_errors
def report_command(run_dir, out_dir, top, no_parity, no_tsne, anion_map, seed):
    """Write RUN_DIR/report/index.html with every figure of the run (works on a run in progress).

    A `cscflow chggen` run directory gets the CHGGen figures instead (success rates, ΔE/RMSD/E_d,
    RDFs and coordination numbers)."""
    from cscflow.analysis.report import write_report
    from cscflow.chggen.report import is_chggen_run, write_chggen_report

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if is_chggen_run(run_dir):
        result = write_chggen_report(run_dir, out_dir)
    else:
        result = write_report(run_dir, out_dir, top=top, parity=not no_parity, tsne=not no_tsne,
                              anion_map=anion_map, seed=seed)
    click.echo(f"report: {result.index_html} ({len(result.figures)} figures, {result.seconds:.1f} s)")
    for key, notes in result.missing.items():
        for note in notes:
            click.echo(f"  missing [{key}]: {note}")
