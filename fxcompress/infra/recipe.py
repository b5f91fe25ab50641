"""Recipes: named, ordered pass pipelines with options, from code presets or TOML files.

A TOML recipe (see the top-level ``passes/`` folder for examples)::

    description = "default, then int8"
    extends = "default"            # a preset name or a path relative to this file (optional)
    tolerance = 0.02               # largest whole-model drift accepted (optional)
    max_iterations = 2             # repeat the pass list until nothing changes (optional)
    passes = ["remove-no-ops", { name = "eliminate-dead-code" }]   # appended after the base's

    [options.remove-no-ops]        # overrides for every occurrence of that pass
    keep_dropout = true

Every name and option is validated before anything runs; errors list the valid choices.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fxcompress.errors import RecipeError
from fxcompress.infra.manager import PassManager
from fxcompress.infra.pass_base import Pass
from fxcompress.infra.registry import create_pass, pass_class
from fxcompress.numerics import LOSSLESS_TOLERANCE

_TOP_LEVEL_KEYS = {"description", "extends", "tolerance", "max_iterations", "passes", "options", "name"}


@dataclass
class PassStep:
    """One pass of a recipe: a registered name with options, or a ready Pass object."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    instance: Pass | None = None

    def build(self) -> Pass:
        return self.instance if self.instance is not None else create_pass(self.name, self.options)


@dataclass
class Recipe:
    """A named pipeline: ordered steps, an overall drift tolerance, and iteration count."""

    name: str
    steps: list[PassStep]
    description: str = ""
    tolerance: float = LOSSLESS_TOLERANCE
    max_iterations: int = 1

    def set_options(self, pass_name: str, options: dict[str, Any], where: str = "") -> "Recipe":
        """Merge ``options`` into every step running ``pass_name`` (a recipe file's ``[options]``).

        RecipeError names the passes the recipe does run when none is ``pass_name``. Returns self.
        """
        matching = [s for s in self.steps if s.name == pass_name]
        if not matching:
            raise RecipeError(f"Recipe {where or self.name} sets options for '{pass_name}', which the recipe does not run.",
                              f"its passes are: {', '.join(s.name for s in self.steps)}.")
        for s in matching:
            s.options = {**s.options, **options}
        return self

    def validate(self) -> None:
        """Build every pass once so unknown names/options fail before any work is done."""
        for step in self.steps:
            step.build()

    def build(self, instruments: Sequence[Any] = ()) -> PassManager:
        """A PassManager that runs this recipe."""
        return PassManager(
            [s.build() for s in self.steps],
            name=self.name,
            max_iterations=self.max_iterations,
            instruments=instruments,
        )

    def to_toml(self) -> str:
        """The recipe as TOML text (what `--recipe` accepts back)."""
        lines = [f'description = "{self.description}"', f"tolerance = {self.tolerance!r}",
                 f"max_iterations = {self.max_iterations}"]
        names = ", ".join(f'"{s.name}"' for s in self.steps)
        lines.append(f"passes = [{names}]")
        for s in self.steps:
            if s.options:
                lines.append(f"\n[options.{s.name}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in s.options.items()]
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _step_from_entry(entry: Any, where: str) -> PassStep:
    if isinstance(entry, str):
        pass_class(entry)
        return PassStep(entry)
    if isinstance(entry, Mapping) and "name" in entry:
        extra = set(entry) - {"name", "options"}
        if extra:
            raise RecipeError(f"{where}: pass entry has unknown keys {sorted(extra)}.",
                              "a pass entry is a name or { name = \"...\", options = { ... } }.")
        pass_class(entry["name"])
        return PassStep(entry["name"], dict(entry.get("options", {})))
    raise RecipeError(f"{where}: pass entry {entry!r} is neither a name nor a table with a name.",
                      'write passes = ["fold-batchnorm", { name = "remove-no-ops", options = { ... } }].')


def load_recipe_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> Recipe:
    """Parse and validate a TOML recipe file (following ``extends``)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe file {path} does not exist.", "give a preset name (see `fxcompress passes`) or an existing .toml path.")
    if path.resolve() in _seen:
        raise RecipeError(f"Recipe {path} extends itself (cycle {[str(p) for p in _seen]}).", "remove the cycle in `extends`.")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Recipe {path} is not valid TOML: {exc}.", "fix the syntax at the position named.") from None
    unknown = set(data) - _TOP_LEVEL_KEYS
    if unknown:
        raise RecipeError(f"Recipe {path} has unknown keys {sorted(unknown)}.",
                          f"valid keys: {', '.join(sorted(_TOP_LEVEL_KEYS))}.")
    steps: list[PassStep] = []
    base: Recipe | None = None
    if "extends" in data:
        target = data["extends"]
        candidate = (path.parent / target)
        if target.endswith(".toml"):
            base = load_recipe_file(candidate, (*_seen, path.resolve()))
        else:
            base = resolve_recipe(target)
        steps = [PassStep(s.name, dict(s.options), s.instance) for s in base.steps]
    for i, entry in enumerate(data.get("passes", [])):
        steps.append(_step_from_entry(entry, f"{path}: passes[{i}]"))
    recipe = Recipe(
        name=data.get("name", path.stem),
        steps=steps,
        description=data.get("description", base.description if base else ""),
        tolerance=float(data.get("tolerance", base.tolerance if base else LOSSLESS_TOLERANCE)),
        max_iterations=int(data.get("max_iterations", base.max_iterations if base else 1)),
    )
    for pass_name, opts in data.get("options", {}).items():
        recipe.set_options(pass_name, opts, where=str(path))
    recipe.validate()
    return recipe


def resolve_recipe(recipe: "str | Path | Recipe | Sequence[str | Pass]") -> Recipe:
    """Turn what users pass as ``recipe=`` into a validated Recipe.

    Accepts a preset name (``"default"``), a path to a ``.toml`` file, a Recipe, or a list of
    pass names and/or Pass objects.
    """
    from fxcompress.passes.presets import PRESETS

    if isinstance(recipe, Recipe):
        recipe.validate()
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and (recipe.endswith(".toml") or "/" in recipe)):
        return load_recipe_file(recipe)
    if isinstance(recipe, str):
        if recipe in PRESETS:
            return PRESETS[recipe]()
        raise RecipeError(f"Unknown recipe '{recipe}'.",
                          f"use a preset ({', '.join(PRESETS)}), a path to a .toml recipe, or a list of pass names.")
    if isinstance(recipe, Sequence):
        steps = []
        for item in recipe:
            if isinstance(item, Pass):
                steps.append(PassStep(item.display_name, instance=item))
            elif isinstance(item, str):
                pass_class(item)
                steps.append(PassStep(item))
            else:
                raise RecipeError(f"Recipe list item {item!r} is neither a pass name nor a Pass.",
                                  "give names from `fxcompress passes` or Pass instances.")
        lossy = any(not s.build().lossless for s in steps)
        return Recipe("custom", steps, tolerance=0.05 if lossy else LOSSLESS_TOLERANCE)
    raise RecipeError(f"recipe must be a name, a path or a list, got {type(recipe).__name__}.",
                      'use recipe="default".')
