"""The command line: resolved specs, one-line user errors with exit code 2, no tracebacks."""

from pathlib import Path

from click.testing import CliRunner

from cscflow.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_validate_prints_resolved_spec():
    result = CliRunner().invoke(main, ["validate", str(REPO / "workflows" / "lips_demo.yaml")])
    assert result.exit_code == 0, result.output
    assert "name: lips_demo" in result.output
    assert "start_lr: 0.001" in result.output  # defaults are filled in


def test_validate_reports_each_bad_field(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("chemical_system: {elements: [Li, Xx]}\nrelax: {fmaxx: 1}\n")
    result = CliRunner().invoke(main, ["validate", str(spec)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].endswith("chemical_system.elements: unknown element 'Xx'")
    assert lines[1].endswith("relax.fmaxx: unknown setting")
    assert "Traceback" not in result.output


def test_status_and_resume_refuse_non_run_dirs(tmp_path):
    for command in ("status", "resume"):
        result = CliRunner().invoke(main, [command, str(tmp_path)])
        assert result.exit_code == 2
        assert "not a cscflow run directory" in result.output


def test_explore_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    result = CliRunner().invoke(
        main, ["explore", str(REPO / "workflows" / "lips_demo.yaml"), "--run-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "already holds a run" in result.output
