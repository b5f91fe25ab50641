"""Recipes: named, ordered pass pipelines with options, from code presets or TOML files.

A step is a pass or a nested pipeline (a Recipe with its own ``max_iterations``): presets nest
``default`` that way, and ``to_toml()`` writes any recipe so that it loads back the same.
A TOML recipe (see the top-level ``passes/`` folder for examples)::

    description = "default, then int8"
    extends = "default"            # a preset name or a path relative to this file (optional)
    imports = ["my_package.passes"]  # modules that register your own passes (optional)
    tolerance = 0.02               # largest whole-model drift (max error / max output) accepted (optional)
    rel_rms = 0.2                  # largest relative RMS error per output (optional; lossy presets set it)
    min_cosine = 0.98              # smallest cosine per output (optional; lossy presets set it)
    max_iterations = 2             # repeat the pass list until nothing changes (optional)
    passes = [                     # appended after the base's steps
        { pipeline = "default" },                         # a preset, nested (to its own fixed point)
        { pipeline = "tidy", max_iterations = 2, passes = ["remove-no-ops", "eliminate-dead-code"] },
        { name = "quantize-int8", options = { calibrator = "percentile" } },
        "remove-no-ops",
    ]

    [options.fold-constants]       # overrides for every occurrence of that pass, nested ones too
    max_growth = 2.0

Every name and option is validated before anything runs; errors list the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

from fxcompress.errors import RecipeError
from fxcompress.fidelity import Gate
from fxcompress.infra.manager import PassManager
from fxcompress.infra.pass_base import Pass
from fxcompress.infra.registry import PRESETS, create_pass, pass_class
from fxcompress.numerics import LOSSLESS_TOLERANCE

_TOP_LEVEL_KEYS = {"description", "extends", "imports", "tolerance", "rel_rms", "min_cosine", "max_iterations", "passes",
                   "options", "name"}
_PASS_KEYS = {"name", "options"}
_PIPELINE_KEYS = {"pipeline", "passes", "max_iterations"}


@dataclass
class PassStep:
    """One pass of a recipe: a registered name with options, or a ready Pass object."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    instance: Pass | None = None

    def build(self) -> Pass:
        return self.instance if self.instance is not None else create_pass(self.name, self.options)

    def toml_entry(self) -> str:
        """This step as a TOML array item (a name, or a table with its options)."""
        options = self.options
        if self.instance is not None:
            registered = pass_class(self.name) if self.name in _registered_names() else None
            if registered is None or type(self.instance) is not registered:
                raise RecipeError(f"Pass step '{self.name}' is a {type(self.instance).__name__} object that is not "
                                  "registered under that name, so a TOML recipe could not create it again.",
                                  "register the pass class (fxcompress.infra.registry.register) and name it in the "
                                  "recipe instead of passing an instance.")
            options = _changed_options(self.instance)
        if not options:
            return _toml_value(self.name)
        return f"{{ name = {_toml_value(self.name)}, options = {_toml_value(options)} }}"


#: A recipe step: one pass, or a nested pipeline run to its own fixed point.
Step = Union[PassStep, "Recipe"]


@dataclass
class Recipe:
    """A named pipeline: ordered steps (passes or nested recipes), acceptance bounds, an iteration count.

    The bounds (``tolerance`` on the drift, ``rel_rms`` and ``min_cosine`` per output) form the
    recipe's :class:`~fxcompress.fidelity.Gate` (:attr:`gate`); see docs/fidelity.md.
    """

    name: str
    steps: list[Step]
    description: str = ""
    tolerance: float = LOSSLESS_TOLERANCE
    max_iterations: int = 1
    #: modules imported before the recipe's pass names are resolved (a user's own passes)
    imports: list[str] = field(default_factory=list)
    #: largest relative RMS error per output (inf: unbounded)
    rel_rms: float = math.inf
    #: smallest cosine per output (-1: unbounded)
    min_cosine: float = -1.0

    @property
    def gate(self) -> Gate:
        """The acceptance bounds a result of this recipe is checked against (compile and export)."""
        return Gate(self.tolerance, self.rel_rms, self.min_cosine)

    def pass_steps(self) -> Iterator[PassStep]:
        """Every pass step, nested pipelines' included, in order."""
        for step in self.steps:
            if isinstance(step, Recipe):
                yield from step.pass_steps()
            else:
                yield step

    def set_options(self, pass_name: str, options: dict[str, Any], where: str = "") -> "Recipe":
        """Merge ``options`` into every step running ``pass_name``, nested pipelines included
        (a recipe file's ``[options]``).

        RecipeError names the passes the recipe does run when none is ``pass_name``. Returns self.
        """
        matching = [s for s in self.pass_steps() if s.name == pass_name]
        if not matching:
            names = list(dict.fromkeys(s.name for s in self.pass_steps()))
            raise RecipeError(f"Recipe {where or self.name} sets options for '{pass_name}', which the recipe does not run.",
                              f"its passes are: {', '.join(names)}.")
        for s in matching:
            if s.instance is not None:  # a ready object: rebuild it with the merged options
                s.options = {**_changed_options(s.instance), **s.options}
                s.instance = None
            s.options = {**s.options, **options}
        return self

    def validate(self) -> None:
        """Build every pass once so unknown names/options fail before any work is done."""
        if self.max_iterations < 1:
            raise RecipeError(f"Recipe {self.name}: max_iterations must be >= 1, got {self.max_iterations}.",
                              "use 1 to run the steps once, more to repeat them until nothing changes.")
        for step in self.steps:
            if isinstance(step, Recipe):
                step.validate()
            else:
                step.build()

    def build(self, instruments: Sequence[Any] = ()) -> PassManager:
        """A PassManager that runs this recipe (nested pipelines become nested managers)."""
        return PassManager(
            [s.build() for s in self.steps],
            name=self.name,
            max_iterations=self.max_iterations,
            instruments=instruments,
        )

    def to_toml(self) -> str:
        """The recipe as TOML text that :func:`load_recipe_file` reads back to the same recipe."""
        lines = [f"name = {_toml_value(self.name)}", f"description = {_toml_value(self.description)}",
                 f"tolerance = {_toml_value(self.tolerance)}", f"max_iterations = {self.max_iterations}"]
        if self.rel_rms != math.inf:
            lines.append(f"rel_rms = {_toml_value(self.rel_rms)}")
        if self.min_cosine != -1.0:
            lines.append(f"min_cosine = {_toml_value(self.min_cosine)}")
        if self.imports:
            lines.append(f"imports = {_toml_value(self.imports)}")
        lines.append("passes = [")
        lines += [f"    {_step_entry(step)}," for step in self.steps]
        lines.append("]")
        return "\n".join(lines) + "\n"


def _step_entry(step: Step) -> str:
    if isinstance(step, Recipe):
        inner = ", ".join(_step_entry(s) for s in step.steps)
        return f"{{ pipeline = {_toml_value(step.name)}, max_iterations = {step.max_iterations}, passes = [{inner}] }}"
    return step.toml_entry()


def _registered_names() -> set[str]:
    from fxcompress.infra.registry import available_passes

    return set(available_passes())


def _changed_options(instance: Pass) -> dict[str, Any]:
    """The options of a ready Pass object that differ from its class's defaults."""
    opts = instance.options
    if not dataclasses.is_dataclass(opts):
        return {}
    defaults = type(opts)()
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
            if getattr(opts, f.name) != getattr(defaults, f.name)}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = [f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    return repr(v)


def _step_from_entry(entry: Any, where: str) -> Step:
    if isinstance(entry, str):
        pass_class(entry)
        return PassStep(entry)
    if isinstance(entry, Mapping) and "pipeline" in entry:
        return _pipeline_from_entry(entry, where)
    if isinstance(entry, Mapping) and "name" in entry:
        extra = set(entry) - _PASS_KEYS
        if extra:
            raise RecipeError(f"{where}: pass entry has unknown keys {sorted(extra)}.",
                              "a pass entry is a name or { name = \"...\", options = { ... } }.")
        pass_class(entry["name"])
        return PassStep(entry["name"], dict(entry.get("options", {})))
    raise RecipeError(f"{where}: pass entry {entry!r} is neither a name nor a table with a name or a pipeline.",
                      'write passes = ["fold-batchnorm", { name = "remove-no-ops", options = { ... } }, '
                      '{ pipeline = "default" }].')


def _pipeline_from_entry(entry: Mapping[str, Any], where: str) -> "Recipe":
    """A nested pipeline: ``{ pipeline = "<preset>" }`` or ``{ pipeline = "<name>", passes = [...] }``."""
    extra = set(entry) - _PIPELINE_KEYS
    if extra:
        raise RecipeError(f"{where}: pipeline entry has unknown keys {sorted(extra)}.",
                          'a pipeline entry is { pipeline = "default" } (a preset) or '
                          '{ pipeline = "name", max_iterations = 2, passes = [...] }.')
    name = entry["pipeline"]
    if "passes" in entry:
        steps = [_step_from_entry(item, f"{where}.passes[{i}]") for i, item in enumerate(entry["passes"])]
        nested = Recipe(name, steps, max_iterations=1)
    elif name in PRESETS:
        nested = PRESETS[name]()
    else:
        raise RecipeError(f"{where}: pipeline '{name}' is not a preset and lists no passes.",
                          f"name a preset ({', '.join(PRESETS)}) or give the pipeline's passes = [...].")
    if "max_iterations" in entry:
        nested.max_iterations = int(entry["max_iterations"])
    return nested


def import_modules(modules: Any, where: str) -> list[str]:
    """Import the modules a recipe names in ``imports`` (they register a user's passes)."""
    if not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise RecipeError(f"{where}: imports must be a list of module names, got {modules!r}.",
                          'write imports = ["my_package.passes"].')
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # the user's module: name it and its own error
            raise RecipeError(f"{where}: cannot import {module!r} named in imports ({type(exc).__name__}: {exc}).",
                              "make the package importable (installed, or on PYTHONPATH) and free of errors.") from None
    return list(modules)


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
    imports = import_modules(data["imports"], str(path)) if "imports" in data else []
    steps: list[Step] = []
    base: Recipe | None = None
    if "extends" in data:
        target = data["extends"]
        candidate = (path.parent / target)
        if target.endswith(".toml"):
            base = load_recipe_file(candidate, (*_seen, path.resolve()))
        else:
            base = resolve_recipe(target)
        steps = copy.deepcopy(base.steps)
        imports = [*base.imports, *(m for m in imports if m not in base.imports)]
    for i, entry in enumerate(data.get("passes", [])):
        steps.append(_step_from_entry(entry, f"{path}: passes[{i}]"))
    recipe = Recipe(
        name=data.get("name", path.stem),
        steps=steps,
        description=data.get("description", base.description if base else ""),
        tolerance=float(data.get("tolerance", base.tolerance if base else LOSSLESS_TOLERANCE)),
        max_iterations=int(data.get("max_iterations", base.max_iterations if base else 1)),
        imports=imports,
        rel_rms=float(data.get("rel_rms", base.rel_rms if base else math.inf)),
        min_cosine=float(data.get("min_cosine", base.min_cosine if base else -1.0)),
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
    if isinstance(recipe, Recipe):
        recipe.validate()
        return recipe
    if isinstance(recipe, Path) or (isinstance(recipe, str) and (recipe.endswith(".toml") or "/" in recipe)):
        return load_recipe_file(recipe)
    if isinstance(recipe, str):
        if recipe in PRESETS:
            preset = PRESETS[recipe]()
            preset.validate()
            return preset
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
