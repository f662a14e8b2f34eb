"""`cscflow plan`: one paper-size iteration built and sized without running anything."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from cscflow.cli import main

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "workflows" / "lips_paper.yaml"


def test_plan_paper_spec_without_checkpoints():
    result = CliRunner().invoke(main, ["plan", str(PAPER)])
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
    line = out.split("by stage: ")[1].splitlines()[0]
    stages = {k.strip(): v for k, v in re.findall(r"([\w ()]+): (\d+)", line)}
    # GPU: generate (3 conditions x 3328 per job + collect), relax (39 shards of 256 + collect),
    # train, MatterGen fine-tune; CPU: everything else incl. the VASP fan-out
    assert stages["generate batches (added at run time)"] == str(3 + 1)
    assert stages["relax shards (added at run time)"] == str(39 + 1)  # ceil(9984 / 256)
    assert cats["gpu"] == str(4 + 4 + 40)
    assert stages["label structures (added at run time)"] == str(600 + 1)  # one job per structure, collector
    assert stages["label calculations (added per structure)"] == str(600 * 5)  # 3 relaxations, statics job, collect
    assert stages["label statics (added later)"] == str(600 * 5)
    assert int(cats["cpu"]) == sum(int(v) for k, v in stages.items()) - int(cats["gpu"])
    # one document per structure: nothing near MongoDB's 16 MB limit at paper scale
    largest = float(re.search(r"largest document: .+: (\d+\.\d) MB", out).group(1))
    assert largest < 4 and "OVER" not in out, out
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
