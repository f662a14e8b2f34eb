"""Spec loading and validation: good specs resolve, bad ones give one clear line."""

from pathlib import Path

import pytest

from cscflow.config import ExplorationSpec, SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_demo_spec_loads():
    spec = load_spec(REPO / "workflows" / "lips_demo.yaml")
    assert spec.chemical_system.chemsys == "Li-P-S"
    assert spec.generator.conditions == [0.0, 0.03, 0.06]
    assert spec.max_iterations >= 2  # a closed loop: the fine-tuned model drives a later iteration
    # Paper defaults survive where the demo does not override them.
    assert spec.training.start_lr == 1e-3 and spec.training.stop_lr == 3e-5
    assert [b.quota for b in spec.selection.bins] == [100, 200, 300]
    # the last iteration trains on more frames than the first (the demo's RMSEs must fall)
    assert spec.training.n_train_at(spec.max_iterations) > spec.training.n_train_at(1)


def test_minimal_spec_gets_defaults(tmp_path):
    spec = load_spec(write(tmp_path, "chemical_system: {elements: [Zn, P, S]}\n"))
    assert spec.forcefield.backend == "chgnet"
    assert spec.store.uri is None
    assert spec.dispatch.category("relax") == "gpu" and spec.dispatch.category("label") == "cpu"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("chemical_system: {elements: [Li, Xx]}", "chemical_system.elements: unknown element 'Xx'"),
        ("chemical_system: {elements: []}", "chemical system is empty"),
        ("chemical_system: {elements: [Li], min_atoms: -2}", "chemical_system.min_atoms"),
        ("chemical_system: {elements: [Li], min_atoms: 9, max_atoms: 4}", "larger than max_atoms"),
        ("chemical_system: {elements: [Li]}\nforcefield: {backend: nequip}", "forcefield.backend"),
        ("chemical_system: {elements: [Li]}\nforcefield: {backend: deepmd}", "set forcefield.model_path"),
        (
            "chemical_system: {elements: [Li]}\nforcefield: {backend: deepmd, model_path: nope.pth}",
            "file not found",
        ),
        ("chemical_system: {elements: [Li]}\ngenerator: {backend: mattergen}", "set generator.checkpoint"),
        ("chemical_system: {elements: [Li]}\nrelax: {fmaxx: 0.1}", "relax.fmaxx: unknown setting"),
        ("chemical_system: {elements: [Li]}\nseeds: [missing.cif]", "seeds: file not found"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("chemical_system: {elements: [Li\n", "not valid YAML"),
    ],
)
def test_bad_specs_name_the_field(tmp_path, text, expected):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    message = str(err.value)
    assert expected in message
    assert "Traceback" not in message and "pydantic" not in message
    assert message.startswith(str(tmp_path))


def test_relative_paths_resolve_against_spec(tmp_path):
    (tmp_path / "seeds").mkdir()
    cif = tmp_path / "seeds" / "li.cif"
    cif.write_text("data_x\n")
    spec = load_spec(write(tmp_path, "chemical_system: {elements: [Li]}\nseeds: [seeds/li.cif]\n"))
    assert spec.seeds == [cif.resolve()]


def test_spec_round_trips_through_yaml(tmp_path):
    spec = load_spec(REPO / "workflows" / "lips_demo.yaml")
    again = load_spec(write(tmp_path, spec.to_yaml()))
    assert again == spec
    assert ExplorationSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_n_train_grows_per_iteration_up_to_the_cap():
    from cscflow.config import TrainingSettings

    fixed = TrainingSettings(n_train=120)
    assert [fixed.n_train_at(k) for k in (1, 2, 5)] == [120, 120, 120]
    grows = TrainingSettings(n_train=200, n_train_per_iteration=80)
    assert [grows.n_train_at(k) for k in (1, 2, 3, 4)] == [80, 160, 200, 200]


def test_protocol_relax_limits_have_neutral_names_old_ones_still_load(caplog):
    from cscflow.config import CP2KSettings, LabelSettings

    new = LabelSettings(relax_steps=3, relax_fmax=0.2)
    assert (new.relax_steps, new.relax_fmax, new.cp2k.relax_steps) == (3, 0.2, None)
    with caplog.at_level("WARNING"):
        old = LabelSettings.model_validate({"cp2k": {"relax_steps": 4, "kspacing": 0.6}})
        from_model = LabelSettings(cp2k=CP2KSettings(relax_fmax=0.1))
    assert (old.relax_steps, old.cp2k.relax_steps, old.cp2k.kspacing) == (4, None, 0.6)
    assert (from_model.relax_fmax, from_model.cp2k.relax_fmax) == (0.1, None)
    assert "labeller.cp2k.relax_steps is deprecated: set labeller.relax_steps" in caplog.text
    # an explicit labeller.relax_* wins over the old name
    assert LabelSettings.model_validate({"relax_steps": 9, "cp2k": {"relax_steps": 4}}).relax_steps == 9
    # the stored form round-trips without the old names (no repeated warning)
    caplog.clear()
    with caplog.at_level("WARNING"):
        LabelSettings.model_validate(old.model_dump(mode="json"))
    assert "deprecated" not in caplog.text
