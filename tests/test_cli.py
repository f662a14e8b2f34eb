"""The command line: resolved specs, one-line user errors with exit code 2, no tracebacks."""

import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from cscflow.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_validate_prints_resolved_spec():
    result = CliRunner().invoke(main, ["validate", str(REPO / "workflows" / "lips_demo.yaml")])
    assert result.exit_code == 0, result.output
    assert "name: lips_demo" in result.output
    assert "start_lr: 0.001" in result.output  # defaults are filled in


def test_every_shipped_spec_validates(tmp_path):
    """workflows/*.yaml validate; specs whose checkpoint a demo script trains first get a stand-in dir.

    On a clean clone ``runs/`` does not exist, so those specs must fail with the setting to fill.
    """
    import yaml

    specs = sorted((REPO / "workflows").glob("*.yaml"))
    assert len(specs) >= 4
    for path in specs:
        raw = yaml.safe_load(path.read_text())
        # model files: trained by scripts/mattergen-demo / chggen-demo, or a cluster's checkpoints
        # (lips_paper.yaml: MatterGen + DPA-3.1-3M)
        models = [(block, key) for block, key in
                  (("generator", "checkpoint"), ("forcefield", "model_path"), ("training", "pretrained"))
                  if (raw.get(block) or {}).get(key)]
        if models:
            missing = [f"{b}.{k}" for b, k in models if not (path.parent / raw[b][k]).exists()]
            if missing:
                result = CliRunner().invoke(main, ["validate", str(path)])
                assert result.exit_code == 2 and missing[0] in result.output, result.output
            for block, key in models:
                raw[block][key] = str(tmp_path / "stand-in")
            (tmp_path / "stand-in").touch()
            path = tmp_path / path.name
            path.write_text(yaml.safe_dump(raw))
        result = CliRunner().invoke(main, ["validate", str(path)])
        if (raw.get("labeller") or {}).get("backend") == "cp2k" and shutil.which("cp2k_shell") is None:
            # validate checks the labeller's program: without CP2K this spec cannot run here
            assert result.exit_code == 2 and "CP2K binary" in result.output, result.output
            continue
        vasp_cmd = os.environ.get("VASP_CMD", "vasp_std").split()[0]
        if (raw.get("labeller") or {}).get("backend") == "vasp" and shutil.which(vasp_cmd) is None:
            # lips_paper.yaml labels with VASP: without it validate names the missing program
            assert result.exit_code == 2 and "VASP binary" in result.output, result.output
            continue
        assert result.exit_code == 0, (path.name, result.output)
        assert f"name: {raw['name']}" in result.output
        if "chggen" in raw:
            assert "resample_steps:" in result.output
            result = CliRunner().invoke(main, ["explore", str(path)])
            assert result.exit_code == 2 and "cscflow chggen" in result.output


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
