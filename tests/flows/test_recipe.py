"""Recipes are validated before anything runs: one line naming which and where."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.recipe import load_recipe
from stages.contract import ConfigError

TOY = Path(__file__).parent / "toy" / "toy.yaml"


def test_toy_recipe_order_and_graph():
    r = load_recipe(TOY)
    assert list(r.stages) == ["source", "square", "total"]
    assert r.downstream("square") == ["square", "total"]
    assert r.ancestors("square") == ["source", "square"]
    assert r.stages["square"].config.power == 2


def test_override_is_typed_and_applied():
    r = load_recipe(TOY, ["square.power=3", "total.scale=2"])
    assert r.stages["square"].config.power == 3 and r.stages["total"].config.scale == 2.0
    # YAML 1.1 reads 3e-5 (no dot) as a string; a float field takes it as the number it is
    assert load_recipe(TOY, ["total.scale=3e-5"]).stages["total"].config.scale == 3e-5
    with pytest.raises(ConfigError, match="--set total.scale: expected a number, got 'e-5'"):
        load_recipe(TOY, ["total.scale=e-5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("squar.power=3", "has no stage 'squar'; did you mean 'square'?"),
        ("square.pow=3", "--set square.pow: unknown field 'pow' (did you mean 'power'?)"),
        ("square.power=abc", "--set square.power: expected an integer, got 'abc'"),
        ("square.power", "expected STAGE.FIELD=VALUE"),
    ],
)
def test_bad_overrides_name_what_and_where(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(TOY, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOY.read_text().replace("  total: {scale: 1.0}\n", "  total: {scale: 1.0}\n  typo: {}\n"))
    with pytest.raises(ConfigError, match="stages.typo: stage 'typo' has no module 'stages.typo'"):
        load_recipe(bad)
    missing_input = tmp_path / "missing.yaml"
    missing_input.write_text(TOY.read_text().replace("  source: {n: 10}\n", ""))
    with pytest.raises(ConfigError, match="stage square needs input 'numbers', which no stage of recipe missing produces"):
        load_recipe(missing_input)
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_recipe(broken)
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text(TOY.read_text().replace("square: {power: 2}", "square: {power: two}"))
    with pytest.raises(ConfigError, match=r"wrong.yaml: stages.square.power: expected an integer, got 'two'"):
        load_recipe(wrong_type)


def test_unknown_recipe_name():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_extends_keeps_the_base_and_overrides_field_by_field(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {TOY}\nstages:\n  square: {{steps: 7}}\nregister: {{numbers: nums}}\n")
    r = load_recipe(child)
    assert r.name == "child" and list(r.stages) == ["source", "square", "total"]
    assert r.stages["square"].config.steps == 7 and r.stages["square"].config.power == 2  # kept from the base
    assert r.register == {**load_recipe(TOY).register, "numbers": "nums"}
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\nstages: {}\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_recipe(loop)
    missing = tmp_path / "missing.yaml"
    missing.write_text("extends: nope\nstages: {}\n")
    with pytest.raises(ConfigError, match="missing.yaml: extends: unknown recipe 'nope'"):
        load_recipe(missing)


@pytest.mark.parametrize("name", ["micro", "tiny", "small", "base"])
def test_built_in_recipes_are_valid(name):
    r = load_recipe(name)
    assert r.stages["pretrain"].config.d_model > 0 and "grpo" in r.stages


def test_inputs_a_config_does_not_use_are_not_edges():
    # GRPO reads the reward model only when its score is part of the reward
    plain = load_recipe("tiny")
    assert "reward_model" not in plain.stages["grpo"].inputs and "grpo" not in plain.downstream("reward")
    with_rm = load_recipe("tiny", ["grpo.rm_weight=0.5"])
    assert "reward_model" in with_rm.stages["grpo"].inputs and "grpo" in with_rm.downstream("reward")
