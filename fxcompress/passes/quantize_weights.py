"""Weight-only block quantization (int4 / int8) of linear layers and embedding tables, for LLM decoding.

Each linear layer's weight ``W [N, K]`` is cut along ``K`` into blocks of ``block_size`` values
(the last block zero-padded when ``K`` is not a multiple), and every block gets its own scale and
zero point; activations stay float. ``W`` dominates the bytes a decoder reads per generated
token, so 4-bit blocks make decoding several times faster on memory-bound CPUs, and the file
about 6x smaller.

* **round-to-nearest** (``method="rtn"``): each block's grid from its own range (always
  including 0).
* **GPTQ** (``method="gptq"``, data-aware): columns are quantized one at a time and the rounding
  error of each is spread over the columns not yet quantized, weighted by the inverse Hessian
  ``H = X^T X`` of the layer's inputs on the calibration data, so the layer's *outputs* on that
  data stay close (Frantar et al., 2022). The grid of a block is chosen when its first column is
  reached, from the already-updated weights. Layers are done in graph order, each on the inputs
  the already-quantized layers before it produce (``sequential``).

In the graph every quantized layer becomes one call of :func:`nbits_linear` (an embedding lookup:
:func:`nbits_embedding`), a two-faced op as in ``quantize-int8-dynamic``:

* in PyTorch the float weight is fake-quantized block-wise with a straight-through gradient, so
  ``result.module`` runs and fine-tunes (QAT: the weight trains, the grids are fixed buffers);
* under ``torch.onnx.export`` it is one node of the ``fxcompress`` domain that
  :mod:`fxcompress.export.nbits` lowers to ONNX Runtime's ``MatMulNBits`` (weights packed
  ``bits`` per value, ``accuracy_level`` 4 lets ORT's CPU kernel run int8 dot products) and
  ``GatherBlockQuantized`` (the table gathered in its packed form, only the looked-up rows
  dequantized). A table tied to the output projection (``lm_head``) is stored once per precision
  its readers use, with one grid each.

Both faces compute codes with :func:`fxcompress.passes.block_quant.block_codes`, so the export's
weights are the module's weights.

Defaults: 4-bit blocks are asymmetric (a zero point per block costs 3% more bytes and, with only
16 levels, not wasting levels on the empty side of a skewed block matters; measured: RTN int4 on
a trained byte-level Llama rises perplexity 0.18% asymmetric); 8-bit blocks are symmetric (256
levels leave little to gain, and ORT then needs no zero points). Blocks of 32: ORT's quantizer
defaults to 128, which costs accuracy for the same kernel speed. Embedding tables at 8 bits also
under int4 layers: a lookup reads only its rows, so the table's bytes cost file size but no
decoding time, while its rounding error enters every layer. Measured on the trained byte-level
Llama (3 x 192, tied table, every held-out window, in PyTorch): round-to-nearest int4 +0.40%
perplexity with 4-bit lookups, +0.23% with 8-bit ones; with the 8-bit copy, lm_head's own 4-bit
copy also gets GPTQ, which went from +0.35% / +0.31% to +0.06% / +0.09% (16 / 64 calibration
windows; ``python benchmarks/decoder_ablations.py``).
A tied table over a third of all weights keeps one 4-bit copy (see ``_split_tied_tables``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from fxcompress.analysis.attributes import replace_attribute
from fxcompress.analysis.macs import register_linear_like
from fxcompress.analysis.sensitivity import (
    layer_sensitivities, report_trial, select_float_layers, select_float_layers_by_metric,
)
from fxcompress.capture import register_leaf_function
from fxcompress.errors import RecipeError
from fxcompress.graph_meta import PRECISION_KEY, QUANT_META, layer_name, matches_layer
from fxcompress.infra.context import CompileContext
from fxcompress.infra.pass_base import DataDrivenPass, PassResult, option
from fxcompress.infra.registry import register
from fxcompress.infra.weights import sharing_copy, unguarded
from fxcompress.passes.block_quant import block_grid, fake_quantize_blocks, gptq, packed_bytes
from fxcompress.passes.calibrators import FLOAT_WEIGHTS, watch_values
from fxcompress.rewrite.context import RewriteContext
from fxcompress.rewrite.matchers import argument, attribute, other_readers, tensor_val

aten = torch.ops.aten

#: The ONNX domain of the marker nodes the export faces write (lowered by fxcompress.export.nbits).
ONNX_DOMAIN = "fxcompress"
LINEAR_OP = "BlockQuantizedMatMul"
GATHER_OP = "BlockQuantizedGather"


# --- the two-faced ops --------------------------------------------------------------------------

@register_leaf_function
def nbits_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    """``x @ weight.T + bias`` with ``weight`` block-quantized to ``bits`` (MatMulNBits in ONNX)."""
    if torch.onnx.is_in_onnx_export():
        # MatMulNBits' CPU kernel computes in float32 (its scales are float32): a bf16 / fp16 model's
        # activations cast in and out; the weight is packed from its stored dtype (export.nbits)
        y = torch.onnx.ops.symbolic(
            f"{ONNX_DOMAIN}::{LINEAR_OP}", (x.float(), weight, scale, zero_point, None if bias is None else bias.float()),
            {"bits": bits, "block_size": block_size, "accuracy_level": accuracy_level},
            dtype=torch.float32, shape=(*x.shape[:-1], weight.shape[0]), version=1)
        return y.to(x.dtype)
    return torch.nn.functional.linear(x, fake_quantize_blocks(weight, scale, zero_point, bits, block_size), bias)


register_linear_like(nbits_linear)


@register_leaf_function
def nbits_embedding(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    bits: int, block_size: int, padding_idx: int = -1) -> torch.Tensor:
    """``embedding(ids, weight)`` with the table's rows block-quantized (GatherBlockQuantized in ONNX).

    ``padding_idx`` keeps that row's gradient at zero, as ``nn.Embedding`` does.
    """
    if torch.onnx.is_in_onnx_export():
        rows = torch.onnx.ops.symbolic(  # float32 rows (the scales' dtype), in the table's dtype after
            f"{ONNX_DOMAIN}::{GATHER_OP}", (weight, ids, scale, zero_point), {"bits": bits, "block_size": block_size},
            dtype=torch.float32, shape=(*ids.shape, weight.shape[1]), version=1)
        return rows.to(weight.dtype)
    table = fake_quantize_blocks(weight, scale, zero_point, bits, block_size)
    return torch.nn.functional.embedding(ids, table, padding_idx=None if padding_idx < 0 else padding_idx)


# --- the pass -----------------------------------------------------------------------------------

@dataclass
class _Site:
    """One quantizable layer: a linear or embedding node reading a constant 2-D float weight."""

    node: str            # node name (stable across deep copies, which the sensitivity search makes)
    kind: Literal["linear", "embedding"]
    name: str            # layer (module path)
    weight: str          # weight node name
    group: int = -1      # sites sharing one weight tensor (tied embedding / lm_head) share a group
    bits: int = 4
    reason: str | None = None   # why it stays float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Grid:
    """The quantized form of one weight tensor (one per group)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    weight: torch.Tensor | None  # replacement weight (GPTQ's), or None to keep the original tensor
    method: str


@dataclass(frozen=True)
class QuantizeWeightsOptions:
    bits: int = option(4, "bits per weight: 4 or 8")
    block_size: int = option(32, "weights per block along the input dimension, one scale (and zero point) each: a power of 2, >= 16")
    symmetric: bool | None = option(None, "symmetric blocks (no zero points); None: asymmetric for 4 bits, symmetric for 8")
    method: Literal["rtn", "gptq"] = option("rtn", "rtn: round each block to nearest; gptq: data-aware error compensation (needs calibration data)")
    without_calibration: Literal["error", "rtn"] = option(
        "error", "gptq with no calibration data: raise (error) or fall back to round-to-nearest and say so (rtn)")
    accuracy_level: int = option(4, "MatMulNBits accuracy_level: 0 float compute, 4 int8 activations (ORT's fast CPU kernels)")
    keep_float: tuple[str, ...] = option((), "layers kept in float: module paths or fnmatch patterns ('lm_head', 'model.layers.0.*')")
    lm_head: Literal["quantize", "int8", "float"] = option(
        "quantize", "the output projection (tied to the embedding, named lm_head, or else the last linear): like the rest, 8 bits, or float")
    embeddings: Literal["auto", "float"] = option("auto", "embedding tables: GatherBlockQuantized where that is smaller (auto) or float")
    embedding_bits: int | None = option(
        None, "bits of embedding tables, 4 or 8; None: 8 (a lookup reads only its rows, so 8 bits cost file bytes, not "
              "decoding time, and the table's error reaches every layer)")
    min_features: int = option(16, "leave linear layers with fewer input features than this in float")
    max_drift: float | None = option(None, "keep the most sensitive layers in float until drift on calibration data is under this")
    calibration_batches: int = option(32, "use at most this many calibration batches (gptq, max_drift)")
    damp: float = option(0.01, "GPTQ dampening: fraction of the mean Hessian diagonal added to it")
    sequential: bool = option(True, "GPTQ layer after layer, each seeing the inputs the already quantized layers "
                                    "before it produce (one pass over the calibration data per input tensor); "
                                    "False: all from the float model in one pass")

    def __post_init__(self) -> None:
        fail = lambda what, fix: RecipeError(f"quantize-weights: {what}", fix)  # noqa: E731
        if self.bits not in (4, 8):
            raise fail(f"bits must be 4 or 8, got {self.bits}.", "use bits=4 (int4-weights) or bits=8 (int8-weights).")
        if self.embedding_bits not in (None, 4, 8):
            raise fail(f"embedding_bits must be 4, 8 or None, got {self.embedding_bits}.",
                       "use 8 (default), or 4 for the smallest file.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise fail(f"block_size must be a power of 2 and at least 16 (what MatMulNBits accepts), got {self.block_size}.",
                       "use 32 (default), 64 or 128.")
        if not 0 <= self.accuracy_level <= 4:
            raise fail(f"accuracy_level must be 0..4, got {self.accuracy_level}.", "use 4 (int8 compute, fastest on CPU) or 0 (float).")
        if self.max_drift is not None and not self.max_drift > 0:
            raise fail(f"max_drift must be positive, got {self.max_drift}.", "use e.g. 0.05, or leave it unset.")
        if self.calibration_batches < 1 or self.min_features < 1:
            raise fail("calibration_batches and min_features must be >= 1.", "use e.g. 32 and 16.")
        if not 0 <= self.damp < 1:
            raise fail(f"damp must be in [0, 1), got {self.damp}.", "use e.g. 0.01.")

    def table_bits(self) -> int:
        """Bits of an embedding table's blocks."""
        return 8 if self.embedding_bits is None else self.embedding_bits

    def is_symmetric(self, bits: int) -> bool:
        return (bits == 8) if self.symmetric is None else self.symmetric


@register
class QuantizeWeightsPass(DataDrivenPass):
    """Weight-only block quantization (int4/int8) of linear layers and embedding tables.

    Round-to-nearest or GPTQ (calibrated); exports as ONNX Runtime's MatMulNBits and
    GatherBlockQuantized; a tied embedding / lm_head table is stored once. ``stats["layers"]``
    lists every layer with its precision or why it stayed float.
    """

    name = "quantize-weights"
    runs_on = "float"
    Options = QuantizeWeightsOptions
    lossless = False
    exports_exactly = False

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        opts = self.options
        sites = self._sites(graph_module)
        enabled = [i for i, s in enumerate(sites) if s.reason is None]
        if not enabled:
            return PassResult(graph_module, False, {"layers": self._report(sites)})
        context = self.context if self.context is not None else CompileContext(example_inputs=())
        method = opts.method
        batches: list[tuple[torch.Tensor, ...]] = []
        notes: dict[str, Any] = {}
        wants_data = method == "gptq" or opts.max_drift is not None
        if wants_data:
            if not context.calibration and opts.without_calibration == "rtn":
                method = "rtn"
                notes["fallback"] = "no calibration data: round-to-nearest instead of GPTQ (pass calibration= for GPTQ)"
                if opts.max_drift is not None and context.example_inputs:
                    batches = [tuple(context.example_inputs)]
            else:
                batches = context.calibration.take(graph_module, self.name, opts.calibration_batches)
        grids = self._grids(graph_module, sites, enabled, method, batches)
        build = lambda on: self._apply(sharing_copy(graph_module), sites, grids, set(on))  # noqa: E731
        sensitivity: dict[int, float] = {}
        if opts.max_drift is not None and batches:
            sensitivity = layer_sensitivities(graph_module, build, enabled, batches)
            kept, drift = select_float_layers(graph_module, build, sensitivity, enabled, batches, opts.max_drift)
            enabled = _keep_float(sites, enabled, kept, "max_drift")
            notes["calibration_drift"] = drift
        metric = context.metric
        if metric is not None and metric.max_drop is not None and enabled:
            # Accuracy-aware: drift ranks the layers (cheap), the user's metric picks how many stay in float.
            sample = batches or [tuple(context.example_inputs)]
            if not sensitivity:
                sensitivity = layer_sensitivities(graph_module, build, enabled, sample)
            ranked = sorted(enabled, key=lambda i: sensitivity.get(i, 0.0), reverse=True)
            kept, trials = select_float_layers_by_metric(build, ranked, metric.drop_of, metric.max_drop,
                                                         on_trial=report_trial if context.progress else lambda t: None)
            enabled = _keep_float(sites, enabled, kept, "max_metric_drop")
            notes["metric_trials"] = [vars(t) for t in trials]
        for i, value in sensitivity.items():
            sites[i].extra["sensitivity"] = value
        graph_module = self._apply(graph_module, sites, grids, set(enabled))
        stats: dict[str, Any] = {"quantized_layers": len(enabled), "method": method, "bits": opts.bits,
                                 "block_size": opts.block_size, "layers": self._report(sites), **notes}
        if method == "gptq":
            stats["calibration_batches"] = len(batches)
        return PassResult(graph_module, bool(enabled), stats)

    # -- which layers, and why not --

    def _sites(self, graph_module: fx.GraphModule) -> list[_Site]:
        opts = self.options
        sites: list[_Site] = []
        for node in graph_module.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is aten.linear.default:
                weight, x = argument(node, "weight"), node.args[0]
                kind = "linear"
            elif node.target is aten.embedding.default:
                weight, x = node.args[0], node.args[1]
                kind = "embedding"
            else:
                continue
            w_val, x_val = tensor_val(weight), tensor_val(x)
            bias = argument(node, "bias") if kind == "linear" else None
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and w_val is not None and w_val.dim() == 2
                    and w_val.dtype in FLOAT_WEIGHTS and x_val is not None and (bias is None or isinstance(bias, fx.Node))):
                continue
            if kind == "linear" and x_val.dtype != w_val.dtype:  # a bf16 / fp16 model quantizes from its own dtype
                continue
            site = _Site(node.name, kind, layer_name(node), weight.name,
                         bits=opts.bits if kind == "linear" else opts.table_bits())
            if matches_layer(opts.keep_float, (site.name, node.name)):
                site.reason = "keep_float"
            elif kind == "linear" and w_val.shape[1] < opts.min_features:
                site.reason = "min_features"
            elif kind == "embedding" and opts.embeddings == "float":
                site.reason = "embeddings=float"
            sites.append(site)
        self._group(graph_module, sites)
        self._apply_lm_head(sites)
        for group in {s.group for s in sites}:
            members = [s for s in sites if s.group == group]
            floats = [s for s in members if s.reason is not None and s.kind == "linear"]
            if len(members) > 1 and floats:
                # The float table stays in the file for the float reader: a quantized copy would only add bytes.
                for s in members:
                    s.reason = s.reason or f"tied to '{floats[0].name}', which stays float"
        self._split_tied_tables(graph_module, sites)
        for s in sites:
            if s.kind == "embedding" and s.reason is None:
                node = _node(graph_module, s.node)
                rows, cols = tensor_val(node.args[0]).shape
                if packed_bytes(rows, cols, s.bits, opts.block_size, self.options.is_symmetric(s.bits)) >= 4 * rows * cols:
                    s.reason = "GatherBlockQuantized would not be smaller than the float table"
        return sites

    def _split_tied_tables(self, graph_module: fx.GraphModule, sites: list[_Site]) -> None:
        """A tied table read at two precisions (8-bit lookups, a 4-bit lm_head) is stored once per
        precision, each copy with its own grid, so lm_head can get GPTQ and the lookups keep 8 bits.

        With ``embedding_bits`` unset, a table over a third of all quantized weights stays one copy
        at lm_head's bits instead: a second copy of it would grow the file more than 8-bit lookups
        are worth (at a third, the 4-bit file is still about 0.26x of fp32).
        """
        enabled = [s for s in sites if s.reason is None]
        sizes = {s.group: tensor_val(_node(graph_module, s.weight)).numel() for s in enabled}
        total = sum(sizes.values())
        next_group = max((s.group for s in sites), default=-1) + 1
        for group, size in sizes.items():
            members = [s for s in enabled if s.group == group]
            bits = sorted({s.bits for s in members})
            if len(bits) < 2:
                continue
            if self.options.embedding_bits is None and 3 * size > total:
                lowest = min(s.bits for s in members if s.kind == "linear")
                for s in members:
                    if s.kind == "embedding":
                        s.bits = lowest
                        s.extra["note"] = (f"tied table, {100 * size / total:.0f}% of the quantized weights: one "
                                           f"{lowest}-bit copy shared with lm_head (embedding_bits=8 stores an 8-bit one too)")
                continue
            for extra_bits in bits[1:]:
                for s in members:
                    if s.bits == extra_bits:
                        s.group = next_group
                next_group += 1

    @staticmethod
    def _group(graph_module: fx.GraphModule, sites: list[_Site]) -> None:
        """Sites whose weights are one tensor (tied, possibly under two names) get the same group."""
        by_node = {s.node: s for s in sites}
        cache: dict[str, int | None] = {}
        next_group = 0
        for s in sites:
            if s.group >= 0:
                continue
            s.group = next_group
            node = _node(graph_module, s.node)
            weight = _node(graph_module, s.weight)
            for reader in other_readers(graph_module, weight, node, cache):
                tied = by_node.get(reader.name)
                if tied is not None:
                    tied.group = next_group
                else:
                    s.extra["shared_with"] = reader.name  # read elsewhere too: GPTQ must not rewrite it
            next_group += 1

    def _apply_lm_head(self, sites: list[_Site]) -> None:
        linears = [s for s in sites if s.kind == "linear"]
        if not linears:
            return
        tied = {s.group for s in sites if s.kind == "embedding"}
        heads = [s for s in linears if s.group in tied or s.name.rpartition(".")[2] == "lm_head"] or [linears[-1]]
        for head in heads:
            head.extra["lm_head"] = True
            if self.options.lm_head == "float":
                head.reason = head.reason or "lm_head=float"
            elif self.options.lm_head == "int8":
                head.bits = 8

    # -- grids --

    def _grids(self, graph_module: fx.GraphModule, sites: list[_Site], enabled: list[int], method: str,
               batches: list[tuple[torch.Tensor, ...]]) -> dict[int, _Grid]:
        opts = self.options
        gptq_sites: dict[str, list[_Site]] = {}  # by input node, in graph order
        if method == "gptq":
            for i in enabled:
                s = sites[i]
                members = [t for t in sites if t.group == s.group and t.reason is None]
                if s.kind == "linear" and len(members) == 1 and "shared_with" not in s.extra:
                    gptq_sites.setdefault(_node(graph_module, s.node).args[0].name, []).append(s)
                elif s.kind == "linear":
                    s.extra["method"] = "rtn (weight shared: GPTQ would change what the other readers see)"
        by_gptq = {s.node for group in gptq_sites.values() for s in group}
        grids: dict[int, _Grid] = {}
        for i in enabled:
            s = sites[i]
            if s.group not in grids and s.node not in by_gptq:
                weight = attribute(graph_module, str(_node(graph_module, s.weight).target)).detach()
                grids[s.group] = _Grid(*block_grid(weight, s.bits, opts.block_size, opts.is_symmetric(s.bits)), None, "rtn")
        if not gptq_sites:
            return grids
        # Sequential GPTQ: a working copy whose weights are replaced by their quantized values as
        # the layers are done, so each layer's Hessian sees the errors of the layers before it.
        # It shares the float weights and gets new tensors as layers are quantized (never a write
        # into a shared one), so it costs the quantized layers, not a copy of the model.
        work = sharing_copy(graph_module) if opts.sequential else graph_module
        if opts.sequential:
            for i in enabled:
                s = sites[i]
                if s.node not in by_gptq:
                    grid = grids[s.group]
                    tensor = attribute(work, str(_node(work, s.weight).target))
                    _replace_everywhere(work, tensor, fake_quantize_blocks(tensor.detach(), grid.scale, grid.zero_point,
                                                                           s.bits, opts.block_size))
        everything = None if opts.sequential else _input_hessians(
            work, [_node(work, s.node) for group in gptq_sites.values() for s in group], batches)
        for input_name, group in gptq_sites.items():
            hessian = (everything or _input_hessians(work, [_node(work, group[0].node)], batches))[input_name]
            for s in group:
                target = str(_node(work, s.weight).target)
                tensor = attribute(work, target)
                # GPTQ starts from the float weight: a table tied to another group's reader (quantized
                # before in ``work``) holds that reader's rounded values there.
                original = attribute(graph_module, target).detach()
                with unguarded():  # GPTQ's column loop works on its own copies only
                    new, scale, zero = gptq(original, hessian, s.bits, opts.block_size, opts.is_symmetric(s.bits), opts.damp)
                grids[s.group] = _Grid(scale, zero, new, "gptq")
                if opts.sequential:
                    _replace_everywhere(work, tensor, new)
        return grids

    # -- the rewrite --

    def _apply(self, graph_module: fx.GraphModule, sites: list[_Site], grids: dict[int, _Grid], enabled: set[int]) -> fx.GraphModule:
        """Rewrite the ``enabled`` sites of ``graph_module`` (nodes found by name) with their grids."""
        if not enabled:
            return graph_module
        ctx = RewriteContext(graph_module, self.name)
        opts = self.options
        made: dict[int, tuple[fx.Node, fx.Node, fx.Node]] = {}  # group -> (weight, scale, zero point) nodes
        by_name = {n.name: n for n in graph_module.graph.nodes}  # sites' nodes are only erased after their own rewrite
        for i in sorted(enabled):
            s = sites[i]
            node = by_name[s.node]
            grid = grids[s.group]
            if s.group not in made:
                weight = by_name[s.weight]
                anchor = node
                tag = s.name.replace(".", "_") or "weight"
                if grid.weight is not None:
                    weight = ctx.new_state(weight, f"{str(weight.target).rpartition('.')[2]}_gptq", grid.weight,
                                           before=anchor, replaces=weight)
                scale = ctx.new_constant(grid.scale, f"_fxqw_{tag}_scale", before=anchor, replaced=[])
                zero = ctx.new_constant(grid.zero_point, f"_fxqw_{tag}_zero_point", before=anchor, replaced=[])
                for n in (scale, zero):
                    n.meta[QUANT_META] = {"role": "weight-param", "layer": s.name}
                made[s.group] = (weight, scale, zero)
            weight, scale, zero = made[s.group]
            if s.kind == "linear":
                args = (node.args[0], weight, scale, zero, argument(node, "bias"), s.bits, opts.block_size, opts.accuracy_level)
                new = ctx.call(nbits_linear, args, like=node, before=node)
            else:
                padding = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
                new = ctx.call(nbits_embedding, (node.args[1], weight, scale, zero, s.bits, opts.block_size, int(padding)),
                               like=node, before=node)
            ctx.stamp(new, [node])
            new.meta[QUANT_META] = {"role": f"nbits-{s.kind}", "layer": s.name, "bits": s.bits}
            new.meta[PRECISION_KEY] = f"int{s.bits} weights"  # what reports show for the layer
            node.replace_all_uses_with(new)
            ctx.erase(node)  # and the float weight's get_attr, when GPTQ replaced it
        graph_module.graph.lint()
        graph_module.recompile()
        return graph_module

    def _report(self, sites: list[_Site]) -> list[dict[str, Any]]:
        rows = []
        for s in sites:
            row: dict[str, Any] = {"name": s.name, "node": s.node, "kind": s.kind,
                                   "precision": "float" if s.reason else f"int{s.bits}"}
            if s.reason:
                row["reason"] = s.reason
            for key in ("lm_head", "method", "note", "sensitivity"):
                if key in s.extra:
                    row[key] = s.extra[key]
            rows.append(row)
        return rows


def _keep_float(sites: list[_Site], enabled: list[int], kept: list[int], reason: str) -> list[int]:
    """Mark ``kept`` (and the tables tied to them: their float copy is in the file anyway) float;
    the sites still enabled."""
    for i in kept:
        sites[i].reason = reason
        for j in enabled:
            if sites[j].group == sites[i].group and sites[j].reason is None:
                sites[j].reason = f"tied to '{sites[i].name}', kept float by {reason}"
    return [i for i in enabled if sites[i].reason is None]


def _replace_everywhere(graph_module: fx.GraphModule, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put ``new`` at every attribute that holds ``old`` (a tied table is read under several names)."""
    targets = [name for name, _ in graph_module.named_parameters(remove_duplicate=False)]
    targets += [name for name, _ in graph_module.named_buffers(remove_duplicate=False)]
    targets += [str(n.target) for n in graph_module.graph.nodes if n.op == "get_attr"]
    for target in dict.fromkeys(targets):
        if attribute(graph_module, target) is old:
            replace_attribute(graph_module, target, new.to(old.dtype))


def _node(graph_module: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in graph_module.graph.nodes if n.name == name)


def _input_hessians(graph_module: fx.GraphModule, linears: list[fx.Node],
                    batches: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """``X^T X / rows`` of each linear layer's input over ``batches`` (float64), keyed by input node name.

    Layers reading one tensor (q, k, v projections) share it. One pass over ``batches``.
    """
    inputs = {node.args[0].name: node.args[0] for node in linears}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, value: torch.Tensor) -> None:
        x = value.detach().reshape(-1, value.shape[-1]).double()
        sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    watch_values(graph_module, {node: (lambda v, n=name: record(n, v)) for name, node in inputs.items()}, batches)
    return {name: sums[name] / max(counts[name], 1) for name in sums}


__all__ = ["GATHER_OP", "LINEAR_OP", "ONNX_DOMAIN", "QuantizeWeightsPass", "nbits_embedding", "nbits_linear"]
