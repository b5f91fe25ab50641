"""Recipes: presets, TOML files with extends/options, and errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxcompress.errors import RecipeError
from fxcompress.infra.recipe import load_recipe_file, resolve_recipe
from fxcompress.passes.cleanup import EliminateDeadCodePass

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_preset_by_name():
    recipe = resolve_recipe("default")
    assert recipe.name == "default"
    assert {s.name for s in recipe.steps} >= {"remove-no-ops", "eliminate-dead-code"}


def test_list_of_names_and_pass_objects():
    recipe = resolve_recipe(["remove-no-ops", EliminateDeadCodePass(drop_unused_state=False)])
    built = recipe.build()
    assert [p.display_name for p in built.passes] == ["remove-no-ops", "eliminate-dead-code"]
    assert built.passes[1].options.drop_unused_state is False


def test_shipped_recipes_load():
    for path in sorted((ROOT / "passes").glob("*.toml")):
        recipe = load_recipe_file(path)
        assert recipe.steps, path


def test_toml_passes_options_and_extends(tmp_path):
    base = write(tmp_path, 'passes = ["remove-no-ops"]\ntolerance = 0.5\n', "base.toml")
    child = write(tmp_path, f'extends = "{base.name}"\npasses = ["eliminate-dead-code"]\n'
                            '[options.eliminate-dead-code]\ndrop_unused_state = false\n')
    recipe = load_recipe_file(child)
    assert [s.name for s in recipe.steps] == ["remove-no-ops", "eliminate-dead-code"]
    assert recipe.steps[1].options == {"drop_unused_state": False}
    assert recipe.tolerance == 0.5  # inherited
    manager = recipe.build()
    assert manager.passes[1].options.drop_unused_state is False


def test_extends_preset(tmp_path):
    recipe = load_recipe_file(write(tmp_path, 'extends = "default"\ntolerance = 1e-6\n'))
    assert [s.name for s in recipe.steps] == [s.name for s in resolve_recipe("default").steps]
    assert recipe.tolerance == 1e-6


def test_unknown_pass_lists_valid_ones_and_suggests(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe_file(write(tmp_path, 'passes = ["remove-no-op"]\n'))
    message = str(info.value)
    assert "Unknown pass 'remove-no-op'" in message
    assert "did you mean 'remove-no-ops'" in message
    assert "eliminate-dead-code" in message


def test_unknown_option_lists_valid_options(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe_file(write(tmp_path, 'passes = [{ name = "eliminate-dead-code", options = { drop_state = true } }]\n'))
    message = str(info.value)
    assert "has no option 'drop_state'" in message and "drop_unused_state" in message


def test_option_of_wrong_type(tmp_path):
    with pytest.raises(RecipeError, match="must be <class 'bool'>, got 'yes'"):
        load_recipe_file(write(tmp_path, 'passes = [{ name = "eliminate-dead-code", options = { drop_unused_state = "yes" } }]\n'))


def test_options_for_a_pass_the_recipe_does_not_run(tmp_path):
    with pytest.raises(RecipeError, match="does not run"):
        load_recipe_file(write(tmp_path, 'passes = ["remove-no-ops"]\n[options.eliminate-dead-code]\ndrop_unused_state = false\n'))


def test_toml_syntax_error_and_unknown_key_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe_file(write(tmp_path, "passes = [\n"))
    with pytest.raises(RecipeError, match="unknown keys \\['pases'\\]"):
        load_recipe_file(write(tmp_path, 'pases = ["remove-no-ops"]\n'))
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_recipe(str(tmp_path / "missing.toml"))


def test_extends_cycle(tmp_path):
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe_file(tmp_path / "a.toml")


def test_unknown_preset_name():
    with pytest.raises(RecipeError, match="Unknown recipe 'defualt'"):
        resolve_recipe("defualt")


def test_recipe_round_trips_through_toml(tmp_path):
    recipe = resolve_recipe(["remove-no-ops", EliminateDeadCodePass(drop_unused_state=False)])
    recipe.steps[1].options = {"drop_unused_state": False}
    again = load_recipe_file(write(tmp_path, recipe.to_toml()))
    assert [s.name for s in again.steps] == ["remove-no-ops", "eliminate-dead-code"]
    assert again.steps[1].options == {"drop_unused_state": False}
