"""The fidelity figures users measure: which output positions count, and per-output figures.

**Output masks.** A padded batch of token sequences carries positions every user of the model
masks out (their hidden states are garbage by construction, and a lossy pass perturbs garbage
freely). Drift and parity therefore ignore them: the mask comes from an input named
``attention_mask`` (as Hugging Face encoders take it) unless the caller says otherwise with
``output_mask``, which :func:`fxcompress.compile`, :meth:`CompileResult.export_onnx
<fxcompress.api.CompileResult.export_onnx>`, :func:`fxcompress.runtime.validate` and
:func:`fxcompress.compare` accept in one of these forms:

* ``None`` (default) or ``True``: automatic, the nonzero positions of the input named
  ``attention_mask`` when there is one, else no mask;
* ``False``: no mask, every position counts;
* a string: the name of the input whose nonzero positions count (e.g. ``"padding_mask"``);
* a callable ``output_mask(inputs, outputs)`` given the inputs (a dict of tensors by input name)
  and the reference model's outputs (a dict of tensors by output name), returning either one
  boolean tensor (applied like an attention mask), a list with one boolean tensor or None per
  output, a dict ``{output name: boolean tensor or None}`` (outputs left out are compared
  whole), or None (no mask). It is called once per input set: the example inputs at compile,
  each parity input set at export and compare. Outputs are named by the model's fields for keyword-called models
  (``last_hidden_state``, the ONNX output names too), by ONNX output name in parity of a plain
  model, ``output``/``output_i`` otherwise; integer indices work as dict keys everywhere.

A mask of shape ``[batch, sequence]`` applies to every output whose leading dimensions are that
shape (``last_hidden_state [B, S, H]``); other outputs (``pooler_output [B, H]``, logits
``[B, C]``) are compared whole. Where a mask applies, the masked figures gate the tolerance and
the whole-output drift is reported beside them. The masking itself is computed in one place,
:func:`fxcompress.numerics.compare_output`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch

from fxcompress.errors import InputError
from fxcompress.numerics import OutputComparison

#: The input whose nonzero positions count, when the caller gives no ``output_mask``.
AUTO_MASK_INPUT = "attention_mask"

OutputMask = Union[None, bool, str, Callable[[dict, dict], Any]]

_FORMS = ("None (automatic: the input named 'attention_mask'), False (no mask), an input's name, or a callable "
          "output_mask(inputs, outputs) returning boolean tensors")


def check_output_mask(output_mask: Any, what: str = "output_mask") -> None:
    """InputError unless ``output_mask`` has one of the accepted forms (checked before any work)."""
    if output_mask is None or isinstance(output_mask, (bool, str)) or callable(output_mask):
        return
    raise InputError(f"{what} must be {_FORMS}; got a {type(output_mask).__name__}.",
                     "pass e.g. output_mask=False, output_mask='attention_mask' or "
                     "output_mask=lambda inputs, outputs: inputs['attention_mask'].bool().")


def output_names(names: Sequence[str] | None, count: int) -> list[str]:
    """``names`` when there is one per output, else ``output`` / ``output_0, output_1, ...``."""
    if names is not None and len(names) == count:
        return list(names)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def output_tensors(outputs: Any) -> list[Any]:
    """The tensors of a model's output in the order :func:`fxcompress.numerics.flatten_outputs` takes them."""
    from torch.utils import _pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, (torch.Tensor, np.ndarray))]


def _as_bool_array(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.bool:
            raise InputError(f"output_mask returned a {str(value.dtype).replace('torch.', '')} "
                             f"tensor for {where}, not a boolean one.",
                             "return a boolean mask (True = the position counts), e.g. inputs['attention_mask'].bool().")
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype != np.bool_:
            raise InputError(f"output_mask returned a {value.dtype} array for {where}, not a boolean one.",
                             "return a boolean mask (True = the position counts), e.g. mask != 0.")
        return value
    raise InputError(f"output_mask returned a {type(value).__name__} for {where}, not a boolean tensor or None.",
                     "return a boolean tensor (True = the position counts) or None to compare that output whole.")


def _fits(mask: np.ndarray, output: Any) -> bool:
    shape = tuple(output.shape)
    return mask.ndim >= 1 and len(shape) >= mask.ndim and shape[:mask.ndim] == tuple(mask.shape)


def _broadcast(mask: np.ndarray, outputs: Sequence[Any]) -> list[np.ndarray | None]:
    """One mask for every output whose leading dims are its shape; others compared whole."""
    return [mask if _fits(mask, out) else None for out in outputs]


def _from_input(name: str, input_names: Sequence[str], inputs: Sequence[torch.Tensor],
                outputs: Sequence[Any], required: bool) -> list[np.ndarray | None]:
    if name not in input_names:
        if not required:
            return [None] * len(outputs)
        raise InputError(f"output_mask names the input '{name}', which the model is not given; its inputs are "
                         f"{list(input_names)}.",
                         "name one of those inputs, pass a callable output_mask(inputs, outputs), or output_mask=False.")
    value = inputs[list(input_names).index(name)]
    mask = (value.detach().cpu() != 0).numpy() if isinstance(value, torch.Tensor) else np.asarray(value) != 0
    return _broadcast(mask, outputs)


def _call(output_mask: Callable, input_names: Sequence[str], inputs: Sequence[torch.Tensor],
          names: Sequence[str], outputs: Sequence[Any]) -> Any:
    # Clones: the user's function must not be able to change the inputs later runs see.
    given_inputs = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in zip(input_names, inputs)}
    given_outputs = {n: o.detach().clone() if isinstance(o, torch.Tensor) else o for n, o in zip(names, outputs)}
    try:
        return output_mask(given_inputs, given_outputs)
    except Exception as exc:  # noqa: BLE001 - any failure is the user's function's
        text = str(exc).strip().splitlines()
        raise InputError(
            f"output_mask raised {type(exc).__name__}: {text[0] if text else ''} (it was given inputs "
            f"{list(given_inputs)} and outputs {list(given_outputs)}).",
            "make output_mask(inputs, outputs) work on those dicts of tensors and return boolean masks; nothing was "
            "written and the model is unchanged.",
        ) from None


def output_masks(output_mask: OutputMask, input_names: Sequence[str], inputs: Sequence[torch.Tensor],
                 outputs: Sequence[Any], names: Sequence[str] | None = None) -> list[np.ndarray | None]:
    """One boolean array or None per output: the positions of each output that count.

    Args:
        output_mask: the caller's setting (see the module docstring for its forms).
        input_names: the names of the flat inputs (keyword names, or forward()'s parameters).
        inputs: the flat input tensors of this run.
        outputs: the reference model's output tensors of this run (what the masks must fit).
        names: the outputs' names (field or ONNX names); ``output_i`` when absent.

    Raises:
        InputError: the callable raised, returned something that is not boolean, or a mask that
            does not fit the output's leading dimensions; a named input that does not exist.
    """
    check_output_mask(output_mask)
    names = output_names(names, len(outputs))
    if output_mask is False:
        return [None] * len(outputs)
    if output_mask is None or output_mask is True:
        return _from_input(AUTO_MASK_INPUT, input_names, inputs, outputs, required=False)
    if isinstance(output_mask, str):
        return _from_input(output_mask, input_names, inputs, outputs, required=True)
    returned = _call(output_mask, input_names, inputs, names, outputs)
    if returned is None:
        return [None] * len(outputs)
    if isinstance(returned, (torch.Tensor, np.ndarray)):
        mask = _as_bool_array(returned, "all outputs")
        masks = _broadcast(mask, outputs)
        if all(m is None for m in masks):
            raise InputError(
                f"output_mask returned one mask of shape {list(mask.shape)}, which matches the leading dimensions of "
                f"no output (shapes {[list(o.shape) for o in outputs]}).",
                "return a mask shaped like the leading dims of the outputs it applies to (e.g. [batch, sequence]), "
                "or a dict {output name: mask}.",
            )
        return masks
    if isinstance(returned, Mapping):
        unknown = [k for k in returned if k not in names and not (isinstance(k, int) and 0 <= k < len(outputs))]
        if unknown:
            raise InputError(f"output_mask returned masks for {unknown}, which are not outputs of the model; its "
                             f"outputs are {names}.",
                             "key the dict by those output names (or indices); leave out outputs to compare whole.")
        by_index = {names.index(k) if k in names else k: v for k, v in returned.items()}
        chosen = [by_index.get(i) for i in range(len(outputs))]
    elif isinstance(returned, (list, tuple)):
        if len(returned) != len(outputs):
            raise InputError(f"output_mask returned {len(returned)} masks for the model's {len(outputs)} outputs "
                             f"{names}.",
                             "return one boolean mask or None per output, or a dict {output name: mask}.")
        chosen = list(returned)
    else:
        raise InputError(f"output_mask returned a {type(returned).__name__}.",
                         "return a boolean tensor, a list with one boolean tensor or None per output, a dict "
                         "{output name: mask}, or None.")
    masks: list[np.ndarray | None] = []
    for name, output, value in zip(names, outputs, chosen):
        if value is None:
            masks.append(None)
            continue
        mask = _as_bool_array(value, f"output '{name}'")
        if not _fits(mask, output):
            raise InputError(
                f"output_mask returned a mask of shape {list(mask.shape)} for output '{name}' of shape "
                f"{list(output.shape)}; a mask must have the output's leading dimensions.",
                f"return a mask of shape {list(output.shape[:max(1, mask.ndim)])} (e.g. [batch, sequence]) or None to "
                "compare that output whole.",
            )
        masks.append(mask)
    return masks


class MaskedFigures:
    """Mixin of the reports that carry per-output figures (compile report, parity report): their
    headline drift figures are read off ``outputs``, never stored beside them."""

    outputs: list[OutputComparison]

    @property
    def masked(self) -> bool:
        """Whether an output mask applied to some output (then the headline figures are masked ones)."""
        return any(o.masked is not None for o in self.outputs)

    @property
    def drift(self) -> float:
        """Worst drift over the outputs, masked where a mask applies: the figure the tolerance bounds."""
        return max((o.judged_drift for o in self.outputs), default=0.0)

    @property
    def unmasked_drift(self) -> float:
        """Worst drift over the outputs and every position, masked ones included (``drift`` without a mask)."""
        return max((o.drift for o in self.outputs), default=0.0)


def output_fidelity(runs: Sequence[Sequence[OutputComparison]]) -> list[OutputComparison]:
    """Per-output figures, worst over ``runs`` (one list of comparisons per input set): one
    :class:`~fxcompress.numerics.OutputComparison` per output, named, its masked figures worst
    over the runs as well."""
    return [_worst(per_output) for per_output in zip(*runs)]


def _worst(comparisons: Sequence[OutputComparison]) -> OutputComparison:
    """The worst of each figure over comparisons of one output (largest error, smallest cosine)."""
    first = comparisons[0]
    cosines = [c.cosine for c in comparisons]
    top1 = [c.top1_agreement for c in comparisons if c.top1_agreement is not None]
    masked = [c.masked for c in comparisons if c.masked is not None]
    return OutputComparison(
        index=first.index, shape=first.shape, name=first.name or f"output_{first.index}",
        max_abs=max(c.max_abs for c in comparisons), max_rel=max(c.max_rel for c in comparisons),
        drift=max(c.drift for c in comparisons), rel_rms=max(c.rel_rms for c in comparisons),
        cosine=math.nan if any(math.isnan(c) for c in cosines) else min(cosines),
        top1_agreement=min(top1) if top1 else None, nonfinite=max(c.nonfinite for c in comparisons),
        masked=_worst(masked) if masked else None,
    )


def fidelity_table(rows: Sequence[OutputComparison], indent: str = "  ") -> str:
    """Per-output figures as aligned text: drift over all positions, masked drift, then the rel.
    RMS error and cosine that are judged (masked where a mask applies)."""
    width = max([len("output")] + [len(r.name) for r in rows])
    lines = [f"{indent}{'output':<{width}}  {'shape':<16} {'drift':>9} {'masked drift':>13} {'rel RMS':>9} {'cosine':>10}"]
    for r in rows:
        masked = f"{r.masked_drift:.2e}" if r.masked_drift is not None else "-"
        lines.append(f"{indent}{r.name:<{width}}  {str(list(r.shape)):<16} {r.drift:>9.2e} {masked:>13} "
                     f"{r.judged.rel_rms:>9.2e} {r.judged.cosine:>10.6f}")
    if any(r.masked_drift is not None for r in rows):
        lines.append(f"{indent}(masked: positions the output mask excludes, e.g. padding, are ignored; rel RMS and "
                     "cosine are masked too, and the masked drift is the one checked against the tolerance)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Acceptance gates
# ------------------------------------------------------------------------------------------------

#: The measures a gate bounds, in the order a failure names them.
GATE_MEASURES = ("rel_rms", "cosine", "drift")


@dataclass(frozen=True)
class Gate:
    """When a result is accepted: bounds on each output's figures (masked where a mask applies).

    * ``rel_rms``: largest ``||error|| / ||reference||`` of an output (``1/sqrt(SQNR)``): the share of
      the output's energy the error is. What a quantized network's users see in their task metric.
    * ``cosine``: smallest cosine similarity of an output with the reference (its direction).
    * ``drift``: largest ``max|error| / max|reference|`` (the worst single element). Lossless
      recipes are judged by it alone (1e-4: fp32 rounding); lossy presets keep it reported but
      loose, because int8 on a trained network with activation outliers moves a few elements
      by several percent of the output's maximum while the task metric does not move.

    Why, and the figures each preset's bounds were calibrated on: docs/fidelity.md.
    """

    drift: float = 1e-4
    rel_rms: float = math.inf
    cosine: float = -1.0

    def failures(self, rows: Sequence[OutputComparison]) -> list[str]:
        """One phrase per bound an output breaks (masked figures where a mask applies), e.g.
        ``"rel. RMS error 0.31 of 'logits' > 0.25"``."""
        found = []
        for r in rows:
            judged = r.judged
            if not judged.rel_rms <= self.rel_rms:
                found.append(f"relative RMS error {judged.rel_rms:.3g} of output '{r.name}' is above the bound {self.rel_rms:g}")
            if not judged.cosine >= self.cosine:  # NaN (non-finite outputs) fails too
                found.append(f"cosine {judged.cosine:.4f} of output '{r.name}' is below the bound {self.cosine:g}")
            if not r.judged_drift <= self.drift:
                found.append(f"drift (max error / max output) {r.judged_drift:.3g} of output '{r.name}' is above the "
                             f"bound {self.drift:g}")
        return found

    def passes(self, rows: Sequence[OutputComparison]) -> bool:
        return not self.failures(rows)

    def merged(self, override: "float | Mapping[str, float] | Gate | None") -> "Gate":
        """This gate with ``override`` applied: a number is a drift bound *alone* (the criterion
        ``tolerance`` always was: relative RMS error and cosine are then not bounded; ``inf`` accepts
        anything); a mapping or Gate replaces the bounds it names and keeps the others."""
        if override is None:
            return self
        if isinstance(override, Gate):
            return override
        if isinstance(override, Mapping):
            return Gate(**{**self.to_dict(), **{k: float(v) for k, v in override.items()}})
        return Gate(float(override), math.inf, -1.0)

    def with_drift_floor(self, floor: float) -> "Gate":
        """This gate with a drift bound of at least ``floor`` (e.g. the lossless bound, for export parity)."""
        return Gate(max(self.drift, floor), self.rel_rms, self.cosine)

    def to_dict(self) -> dict[str, float]:
        """The three bounds by measure name (the form ``tolerance`` takes as a dict)."""
        return {"drift": self.drift, "rel_rms": self.rel_rms, "cosine": self.cosine}

    def describe(self) -> str:
        """The bounds in words: ``rel. RMS <= 0.2, cosine >= 0.98, drift <= 0.5``; unbounded measures left out."""
        parts = []
        if self.rel_rms != math.inf:
            parts.append(f"rel. RMS <= {self.rel_rms:g}")
        if self.cosine > -1.0:
            parts.append(f"cosine >= {self.cosine:g}")
        if self.drift != math.inf:
            parts.append(f"drift <= {self.drift:g}")
        return ", ".join(parts) or "no bound"


def check_gate(tolerance: Any, what: str = "tolerance") -> None:
    """InputError unless ``tolerance`` is None, a number >= 0, a Gate, or a mapping of gate measures."""
    if tolerance is None or isinstance(tolerance, Gate):
        return
    values = dict(tolerance) if isinstance(tolerance, Mapping) else {"drift": tolerance}
    unknown = [k for k in values if k not in GATE_MEASURES]
    bad = [k for k, v in values.items() if k in GATE_MEASURES and (
        isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or (k != "cosine" and v < 0)
        or (k == "cosine" and not -1 <= v <= 1))]
    if unknown or bad:
        raise InputError(
            f"{what} must be a number >= 0 (the drift bound) or a dict of bounds with keys {list(GATE_MEASURES)}; got "
            f"{tolerance!r}.",
            "use e.g. tolerance=0.05, or tolerance={'rel_rms': 0.3, 'cosine': 0.95} (relative RMS error at most 0.3, "
            "cosine at least 0.95 per output), or leave it out for the recipe's bounds.")
