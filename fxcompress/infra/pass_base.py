"""The pass contract: ``Pass``, ``PassResult`` and typed, described options.

A pass is a small class whose ``call(gm)`` returns a :class:`PassResult`. ``__call__`` is a fixed
template (requires -> call -> result check -> ensures) so every pass gets the same checks.
Options are a frozen dataclass whose fields carry a one-line description (``option(...)``), so
recipes validate themselves and ``fxcompress passes`` documents every pass without extra code.

Passes never measure themselves: timing, diffs, IR dumps and numerical checks are instruments
run by the PassManager around each pass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping

from torch import fx

from fxcompress.errors import RecipeError
from fxcompress.graph_meta import is_quantized

if TYPE_CHECKING:
    from fxcompress.infra.context import CompileContext


def option(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best in pass definitions
    """Declare a pass option with a default and a one-line description."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) as the default of a list-like option")
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class Rejection:
    """A near-miss: a pattern matched at ``node`` but ``rule`` declined to rewrite it, and why."""

    rule: str
    node: str
    reason: str


@dataclass
class PassResult:
    """What a pass returns.

    ``graph_module`` keeps torch's attribute name so torch's own fx PassManager accepts our passes.
    ``stats`` are the pass's own counts (``folded=20``); ``rejections`` the near-misses a user can
    ask about ("why didn't it fuse?").
    """

    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)


class PassContractError(RuntimeError):
    """A pass broke the pass contract (wrong return type, violated pre/postcondition)."""


def option_fields(options_cls: type) -> list[dataclasses.Field]:
    """The declared option fields of an options dataclass."""
    return list(dataclasses.fields(options_cls))


def option_help(options_cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) for each option: what `fxcompress passes` prints."""
    hints = typing.get_type_hints(options_cls)
    rows = []
    for f in option_fields(options_cls):
        type_name = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        rows.append((f.name, type_name, f.default, f.metadata.get("help", "")))
    return rows


def _type_ok(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(expected) if a is not Ellipsis]
        return isinstance(value, (tuple, list)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def build_options(pass_name: str, options_cls: type, values: Mapping[str, Any] | None) -> Any:
    """Validate ``values`` against ``options_cls`` and build the frozen options object.

    Raises RecipeError naming an unknown option (with the valid ones) or a value of the wrong type.
    """
    values = dict(values or {})
    known = {f.name for f in option_fields(options_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise RecipeError(
            f"Pass '{pass_name}' has no option {', '.join(repr(u) for u in unknown)}.",
            f"use one of its options: {valid} (see `fxcompress passes`).",
        )
    hints = typing.get_type_hints(options_cls)
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            raise RecipeError(
                f"Option '{key}' of pass '{pass_name}' must be {hints[key]}, got {value!r}.",
                "give the option a value of the documented type (see `fxcompress passes`).",
            )
        if isinstance(value, list):
            values[key] = tuple(value)  # options are frozen: store immutable sequences
    return options_cls(**values)


#: Why a pass with ``runs_on`` does not run on a graph (``stats["skipped_graph"]``), by what the graph is.
ALREADY_QUANTIZED = "already quantized: a quantization pass ran on this graph before (its weights carry fixed scales)"
NOT_QUANTIZED = "not quantized: the pass corrects what a quantization pass did, and none ran before it"


def graph_skip_reason(runs_on: str | None, graph_module: fx.GraphModule) -> str | None:
    """Why a pass that ``runs_on`` such graphs (see :attr:`Pass.runs_on`) skips ``graph_module``, or None."""
    if runs_on is None:
        return None
    quantized = is_quantized(graph_module)
    if runs_on == "float" and quantized:
        return ALREADY_QUANTIZED
    if runs_on == "quantized" and not quantized:
        return NOT_QUANTIZED
    return None


class Pass:
    """Base class of every pass.

    Subclasses set ``name`` (kebab-case registry name), optionally ``Options`` (a frozen dataclass
    built with :func:`option`) and ``lossless`` (False for quantization/sparsity), and implement
    :meth:`call`. Instances are cheap and reusable: a pass keeps no state between calls.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: Lossless passes must keep outputs within fp32 noise; the numerics instrument rolls back
    #: a lossless pass that drifts. Lossy passes report drift and are bounded by the recipe.
    lossless: ClassVar[bool] = True
    #: The ONNX export of what this pass writes computes the same as the graph, within fp32 noise
    #: (pruning and sparsity do; quantization and fp16 do not: ORT's kernels round differently).
    #: Export parity checks such graphs at the lossless tolerance instead of the recipe's.
    exports_exactly: ClassVar[bool] = True
    #: The graphs the pass applies to: "float" (none a quantization pass ran on: their weights
    #: carry fixed scales that quantizing or rescaling again would break), "quantized" (only
    #: those: the pass corrects what quantization did), or None (any). :meth:`__call__` honours
    #: it: on another graph the pass does not run, and says why in ``stats["skipped_graph"]``.
    runs_on: ClassVar[Literal["float", "quantized"] | None] = None

    def __init__(self, options: Mapping[str, Any] | Any | None = None, **overrides: Any) -> None:
        if options is not None and dataclasses.is_dataclass(options) and not isinstance(options, Mapping):
            self.options = dataclasses.replace(options, **overrides) if overrides else options
        else:
            merged = {**dict(options or {}), **overrides}
            self.options = build_options(self.display_name, type(self).Options, merged)

    @property
    def display_name(self) -> str:
        return self.name or type(self).__name__

    def bind(self, context: "CompileContext") -> None:
        """Receive the compile run's context (example inputs, calibration data) before running.

        Most passes need nothing beyond the graph and ignore it; data-driven passes
        (calibration, sensitivity analysis) keep a reference.
        """

    def requires(self, graph_module: fx.GraphModule) -> None:
        """Precondition hook: raise PassContractError if the pass cannot run on this graph."""

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """Postcondition hook: raise PassContractError if the result is not acceptable."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Transform ``graph_module`` (in place or into a new module) and say what changed."""
        raise NotImplementedError

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        skipped = graph_skip_reason(self.runs_on, graph_module)
        if skipped is not None:
            return PassResult(graph_module, False, {"skipped_graph": skipped})
        self.requires(graph_module)
        result = self.call(graph_module)
        if not isinstance(result, PassResult):
            raise PassContractError(
                f"pass '{self.display_name}' returned {type(result).__name__}, expected PassResult"
            )
        self.ensures(result.graph_module)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class DataDrivenPass(Pass):
    """A pass that reads the compile run's data: calibration batches, example inputs, the user's metric.

    The pass manager hands every pass the run's :class:`~fxcompress.infra.context.CompileContext`
    through :meth:`bind` before running it; data-driven passes (quantization, smoothing,
    equalization from observed ranges, bias correction) keep it here as ``self.context`` (None
    when the pass is run by hand without a context).
    """

    def __init__(self, options: Mapping[str, Any] | Any | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self.context: "CompileContext | None" = None

    def bind(self, context: "CompileContext") -> None:
        self.context = context
