"""`cscflow plan`: one paper-size iteration built and sized without running anything."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from cscflow.cli import main

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "workflows" / "lips_paper.yaml"


def test_plan_paper_spec_without_checkpoints():
    result = CliRunner().invoke(main, ["plan", str(PAPER), "--label-sample", "4"])
    assert result.exit_code == 0, result.output
    out = result.output
    checkpoints = REPO.parent / "checkpoints"
    if not checkpoints.exists():  # the cluster's model files are not on this machine
        assert "missing paths (3;" in out
        for setting in ("generator.checkpoint", "forcefield.model_path", "training.pretrained"):
            assert f"  {setting}: " in out
        assert "chemical_system_energy_above_hull" in out and "DPA-3.1-3M.pt" in out
    assert "candidates: 9984   selected for labels: 600" in out
    cats = dict(re.findall(r"^  (\w+)\s+(\d+)$", out, flags=re.M))
    # GPU: generate, relax, train, MatterGen fine-tune; CPU: everything else incl. the VASP fan-out
    assert cats["gpu"] == "4"
    line = out.split("by stage: ")[1].splitlines()[0]
    stages = {k.strip(): v for k, v in re.findall(r"([\w ()]+): (\d+)", line)}
    assert stages["label (added at run time)"] == str(600 * 4 + 1)  # 3 relaxations + statics job each, collector
    assert stages["label statics (added later)"] == str(600 * 5)
    assert int(cats["cpu"]) == sum(int(v) for k, v in stages.items()) - 4
    assert re.search(r"largest document: .+: \d+\.\d MB", out)
    assert re.search(r"GPU-hours: \d+\.\d", out) and re.search(r"CPU-hours: \d+\.\d", out)
    assert "score_cpu_s = " in out and "measured" in out


def test_plan_bad_spec_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chemical_system: {elements: [Li, Xx]}\n")
    result = CliRunner().invoke(main, ["plan", str(bad)])
    assert result.exit_code == 2
    assert "Xx" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["plan", str(PAPER), "--cost", "nonsense=1"])
    assert result.exit_code == 2 and "unknown cost" in result.output
