"""Nested pipelines are first-class recipe steps: they round-trip through TOML, take options,
and a pipeline converges only when every pipeline nested in it does."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import fx

from fxcompress.errors import RecipeError
from fxcompress.infra.manager import PassManager
from fxcompress.infra.pass_base import Pass, PassResult
from fxcompress.infra.recipe import PassStep, Recipe, load_recipe_file, resolve_recipe
from fxcompress.infra.registry import PRESETS
from fxcompress.passes.cleanup import EliminateDeadCodePass


def _tree(manager: Pass) -> object:
    """The built pipeline as nested (name, max_iterations, [children]) / (pass name, options)."""
    if isinstance(manager, PassManager):
        return (manager.pipeline_name, manager.max_iterations, [_tree(p) for p in manager.passes])
    return (manager.name, repr(manager.options))


def _round_trip(recipe: Recipe, tmp_path) -> Recipe:
    path = tmp_path / f"{recipe.name.replace(':', '_')}.toml"
    path.write_text(recipe.to_toml())
    return load_recipe_file(path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_toml(name, tmp_path):
    recipe = PRESETS[name]()
    loaded = _round_trip(recipe, tmp_path)
    assert loaded.to_toml() == recipe.to_toml()
    assert _tree(loaded.build()) == _tree(recipe.build())
    assert (loaded.name, loaded.tolerance, loaded.max_iterations) == (recipe.name, recipe.tolerance, recipe.max_iterations)


def test_a_hand_built_nested_recipe_round_trips(tmp_path):
    inner = Recipe("tidy", [PassStep("fold-constants", {"max_growth": 2.0}),
                            PassStep("eliminate-dead-code", instance=EliminateDeadCodePass(drop_unused_state=False))],
                   max_iterations=2)
    recipe = Recipe("mine", [PRESETS["default"](), inner, PassStep("fold-batchnorm")],
                    description='quotes " and \\ survive', tolerance=float("inf"))
    loaded = _round_trip(recipe, tmp_path)
    assert loaded.to_toml() == recipe.to_toml()
    assert _tree(loaded.build()) == _tree(recipe.build())
    tidy = loaded.build().passes[1]
    assert tidy.max_iterations == 2 and tidy.passes[1].options.drop_unused_state is False
    assert loaded.description == 'quotes " and \\ survive'


def test_options_reach_passes_inside_nested_pipelines(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('extends = "int8"\n[options.fold-batchnorm]\nfold_affine = false\n')
    recipe = load_recipe_file(path)
    folds = [p for p in recipe.pass_steps() if p.name == "fold-batchnorm"]
    assert folds and all(p.build().options.fold_affine is False for p in folds)


def test_options_for_a_pass_the_recipe_does_not_run_list_the_nested_passes(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('extends = "int8"\n[options.prune-channels]\nratio = 0.3\n')
    with pytest.raises(RecipeError, match="does not run.*fold-batchnorm.*quantize-int8"):
        load_recipe_file(path)


def test_toml_pipeline_entries(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(textwrap.dedent('''
        passes = [
            { pipeline = "default", max_iterations = 1 },
            { pipeline = "tidy", max_iterations = 2, passes = ["remove-no-ops", "eliminate-dead-code"] },
        ]
    '''))
    built = load_recipe_file(path).build()
    default, tidy = built.passes
    assert (default.pipeline_name, default.max_iterations) == ("default", 1)
    assert [p.name for p in default.passes] == [s.name for s in PRESETS["default"]().steps]
    assert (tidy.pipeline_name, tidy.max_iterations, [p.name for p in tidy.passes]) == \
        ("tidy", 2, ["remove-no-ops", "eliminate-dead-code"])


@pytest.mark.parametrize("entry, match", [
    ('{ pipeline = "nope" }', "not a preset and lists no passes"),
    ('{ pipeline = "x", passes = ["no-such-pass"] }', "Unknown pass 'no-such-pass'"),
    ('{ pipeline = "default", colour = 1 }', "unknown keys"),
])
def test_bad_pipeline_entries_are_named(entry, match, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(f"passes = [{entry}]\n")
    with pytest.raises(RecipeError, match=match):
        load_recipe_file(path)


def test_imports_register_a_users_passes_before_names_are_resolved(tmp_path, monkeypatch):
    package = tmp_path / "my_passes_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        from fxcompress.infra.pass_base import Pass, PassResult
        from fxcompress.infra.registry import register

        @register
        class DoNothingPass(Pass):
            name = "test-do-nothing"
            def call(self, graph_module):
                return PassResult(graph_module, False)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "r.toml"
    path.write_text('imports = ["my_passes_pkg"]\npasses = ["test-do-nothing"]\n')
    recipe = load_recipe_file(path)
    assert [s.name for s in recipe.steps] == ["test-do-nothing"]
    assert recipe.imports == ["my_passes_pkg"] and "imports = " in recipe.to_toml()


def test_an_import_that_fails_is_a_recipe_error(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('imports = ["surely_not_a_module_here"]\npasses = ["remove-no-ops"]\n')
    with pytest.raises(RecipeError, match="cannot import 'surely_not_a_module_here'"):
        load_recipe_file(path)


class _AlwaysChanges(Pass):
    """Reports a change every time (recompiles a no-op edit): a pipeline of it never converges."""

    name = "test-always-changes"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module, True)


class _NeverChanges(Pass):
    name = "test-never-changes"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module, False)


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(torch.nn.ReLU())


def test_converged_is_the_conjunction_of_every_level():
    inner = PassManager([_AlwaysChanges()], name="inner", max_iterations=2)
    outer = PassManager([inner, _NeverChanges()], name="outer", max_iterations=1)
    outer(_graph())
    assert inner.converged is False
    assert outer.converged is False
    settled = PassManager([PassManager([_NeverChanges()], name="inner", max_iterations=3)], max_iterations=1)
    settled(_graph())
    assert settled.converged is True


def test_resolve_a_list_still_works_and_presets_nest_recipes():
    assert isinstance(PRESETS["int8"]().steps[0], Recipe)
    assert [s.name for s in resolve_recipe(["remove-no-ops"]).steps] == ["remove-no-ops"]
