"""Attention projections rescaled so that one int8 weight scale fits the query and value layers (exact in float).

``int8-dynamic`` quantizes every linear weight per output row (trained weights spread by 2-300x
between rows) and exports it to ONNX Runtime's fused ``DynamicQuantizeMatMul`` with one scale and a
``Mul`` by the rows' ratios after it (the fused kernel is slower with per-column scales;
docs/fidelity.md). Those ``Mul``\\ s read and write every activation once more. Two of an attention
block's four projections can shed them, because what follows them is linear per channel:

* **query / key**: the scores are ``sum_j q_j k_j`` per head. Row ``j`` of the query weight and
  bias multiplied by ``a_j`` and the key's divided by it leave every score unchanged. With
  ``a_j = max_i m_i / m_j`` (``m_j`` the largest ``|W_q[j, :]|``) every query row has the same
  largest value, so one scale quantizes it to exactly the integers per-row scales gave, and the
  key's rows are only rescaled, which per-row scales absorb: the same integers, one ``Mul`` fewer.
* **value / output projection**: attention mixes positions, never channels, so channel ``j`` of
  the value reaches column ``j`` of the output projection's input (after the heads are merged).
  The value's row ``j`` (and bias) multiplied by ``b_j = max_i m_i / m_j`` and the output
  projection's input column divided by it: the same function, a value layer with one scale. The
  output projection's own quantization changes (its columns and its input are rescaled), so this
  half is judged by measurement (docs/fidelity.md), not exact in int8.

Which channel meets which is not assumed from layer names: the head split and merge (views,
reshapes, transposes, permutes) are replayed on a tensor of channel indices, and a pair is rewritten
only when the contraction provably pairs channel ``j`` with channel ``j`` (and the merge maps each
value channel to one input column). Eager attention (``matmul``) and
``scaled_dot_product_attention`` are both read. Every tensor on the path must have one reader.
Running the pass again finds every factor 1 and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxcompress.infra.pass_base import Pass, PassResult, Rejection, option
from fxcompress.infra.registry import register
from fxcompress.graph_meta import layer_name
from fxcompress.rewrite.context import RewriteContext
from fxcompress.rewrite.matchers import argument, attribute, permutation, static_shape, weighted_layer

aten = torch.ops.aten

_VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
_SAME = frozenset({aten.contiguous.default, aten.clone.default, aten.alias.default})
_SCALAR = frozenset({aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar})
_SDPA = aten.scaled_dot_product_attention.default
#: Factors this close to 1 everywhere mean the rows are already balanced (idempotence).
_BALANCED = 1e-5


def _channel_step(node: fx.Node) -> bool:
    """Whether ``node`` moves channels around without mixing them (a view, a permutation, a scalar factor)."""
    if node.op != "call_function":
        return False
    if node.target in _VIEWS or node.target in _SAME or permutation(node) is not None:
        return True
    return node.target in _SCALAR and len(node.args) == 2 and isinstance(node.args[1], (int, float))


def _follow(node: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """The single-reader chain of channel steps after ``node`` and the node that reads its end, or None."""
    chain: list[fx.Node] = []
    current = node
    while True:
        if len(current.users) != 1:
            return None
        user = next(iter(current.users))
        if not _channel_step(user) or user.args[0] is not current:
            return (chain, user) if user.op == "call_function" else None
        chain.append(user)
        current = user


def _replay(chain: list[fx.Node], index: torch.Tensor) -> torch.Tensor | None:
    """``index`` (channel numbers) put through the views and permutations of ``chain``, or None."""
    for step in chain:
        if step.target in _VIEWS:
            shape = static_shape(step)
            if shape is None:
                return None
            index = index.reshape(shape)
        elif permutation(step) is not None:
            index = index.permute(permutation(step))
        if static_shape(step) is not None and tuple(index.shape) != static_shape(step):
            return None
    return index


def _channels(linear: fx.Node) -> tuple[list[fx.Node], fx.Node, torch.Tensor] | None:
    """(chain, reader, channel index of every element at the chain's end) of a linear layer's output."""
    shape = static_shape(linear)
    followed = _follow(linear)
    if shape is None or followed is None:
        return None
    chain, reader = followed
    index = _replay(chain, torch.arange(shape[-1]).expand(shape))
    return None if index is None else (chain, reader, index)


def _along(index: torch.Tensor, dim: int) -> torch.Tensor | None:
    """``index`` with ``dim`` dropped when it is constant along ``dim`` (the channel does not vary there), else None."""
    first = index.narrow(dim, 0, 1)
    return first.squeeze(dim) if bool((index == first).all()) else None


@dataclass
class _Pair:
    scaled: fx.Node     # the linear whose rows become balanced (query or value)
    partner: fx.Node    # key (rows divided) or output projection (input columns divided)
    kind: str           # "query-key" or "value-output"
    columns: torch.Tensor | None = None  # value-output: value channel feeding each input column of the partner


def _attention_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(query side, key side, value side) of an attention node: ``q @ k`` (no value), ``p @ v``, or sdpa."""
    if node.target is _SDPA:
        return node.args[0], node.args[1], node.args[2]
    if node.target is aten.matmul.default:
        return node.args[0], node.args[1], None
    return None


def _query_key(ctx: RewriteContext, query: fx.Node) -> _Pair | str | None:
    """The query-key pair whose scores ``query`` (a linear) feeds, or a reason, or None (not attention)."""
    found = _channels(query)
    if found is None:
        return None
    _, reader, q_index = found
    operands = _attention_operands(reader)
    if operands is None or operands[0] is not (found[0][-1] if found[0] else query):
        return None
    key_end = operands[1]
    key = key_end
    while isinstance(key, fx.Node) and _channel_step(key):
        key = key.args[0]
    if weighted_layer(key) is None or weighted_layer(key).kind != "linear" or key is query:
        return "the key side of the scores is not a linear layer of its own"
    k_found = _channels(key)
    if k_found is None or k_found[1] is not reader:
        return "the key's output is read by something else than the scores"
    k_index = k_found[2]
    # matmul contracts q's last dim with k's second to last; sdpa both last dims
    k_dim = -1 if reader.target is _SDPA else -2
    q_ch, k_ch = _along(q_index, -2), _along(k_index, -1 if k_dim == -2 else -2)
    if q_ch is None or k_ch is None or q_ch.shape != k_ch.shape or not bool((q_ch == k_ch).all()):
        return "the head split does not pair query channel j with key channel j"
    return _Pair(query, key, "query-key")


def _value_output(ctx: RewriteContext, value: fx.Node) -> _Pair | str | None:
    """The value-output pair ``value`` (a linear) starts, or a reason, or None (not attention)."""
    found = _channels(value)
    if found is None:
        return None
    chain, reader, v_index = found
    end = chain[-1] if chain else value
    if reader.target is _SDPA:
        if reader.args[2] is not end or any(a is end for a in reader.args[:2]):
            return None
    elif reader.target is not aten.matmul.default or reader.args[1] is not end or reader.args[0] is end:
        return None
    v_ch = _along(v_index, -2)  # positions are mixed, channels kept: constant along the position dim
    out_shape = static_shape(reader)
    if v_ch is None or out_shape is None:
        return None  # the right operand of q @ k (channels along the contracted dim), not a value
    out_index = v_ch.unsqueeze(-2).expand(out_shape)
    followed = _follow(reader)
    if followed is None:
        return "the attention output is read by more than one node"
    merge, output = followed
    layer = weighted_layer(output)
    if layer is None or layer.kind != "linear" or argument(output, "input") is not (merge[-1] if merge else reader):
        return "the merged heads do not go straight into a linear layer"
    columns = _replay(merge, out_index)
    if columns is None:
        return "the head merge could not be replayed (symbolic shapes)"
    flat = columns.reshape(-1, columns.shape[-1])
    if not bool((flat == flat[:1]).all()):
        return "the head merge does not map each value channel to one input column"
    return _Pair(value, output, "value-output", flat[0].clone())


def _row_factors(weight: torch.Tensor) -> torch.Tensor:
    """``max_i m_i / m_j`` per row (``m`` the rows' largest magnitudes), 1 for all-zero rows; float64."""
    m = weight.detach().abs().amax(dim=1).double()
    factors = m.max() / m
    return torch.where(m > 0, factors, torch.ones_like(factors))


@dataclass(frozen=True)
class EqualizeAttentionOptions:
    query_key: bool = option(True, "balance the query rows, key rows compensate (the same int8 integers, one Mul fewer)")
    value_output: bool = option(True, "balance the value rows, the output projection's input columns compensate "
                                      "(changes that projection's int8 rounding; measured in docs/fidelity.md)")


@register
class EqualizeAttentionPass(Pass):
    """Query and value projections rescaled to equal row ranges, compensated in key / output projection.

    Exact in float (to fp32 rounding); lets ``quantize-int8-dynamic`` give those layers one weight
    scale, so their export needs no per-column ``Mul``. Needs no data.
    """

    name = "equalize-attention"
    runs_on = "float"
    Options = EqualizeAttentionOptions

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        ctx = RewriteContext(graph_module, self.name)
        pairs: list[_Pair] = []
        rejections: list[Rejection] = []
        used: set[fx.Node] = set()
        for node in list(graph_module.graph.nodes):
            layer = weighted_layer(node)
            if layer is None or layer.kind != "linear":
                continue
            for found in (_query_key(ctx, node) if self.options.query_key else None,
                          _value_output(ctx, node) if self.options.value_output else None):
                if isinstance(found, str):
                    rejections.append(Rejection("equalize-attention", node.name, found))
                elif found is not None and ({found.scaled, found.partner} & used):
                    rejections.append(Rejection("equalize-attention", node.name, "a layer of this pair is in another pair"))
                elif found is not None:
                    used |= {found.scaled, found.partner}
                    problem = (ctx.weights_problem(weighted_layer(found.scaled))
                               or ctx.weights_problem(weighted_layer(found.partner)))
                    if problem:
                        rejections.append(Rejection("equalize-attention", node.name, problem))
                    else:
                        pairs.append(found)
        done = []
        for pair in pairs:
            weight = attribute(graph_module, str(argument(pair.scaled, "weight").target)).detach()
            factors = _row_factors(weight)
            if float((factors - 1).abs().max()) <= _BALANCED:
                continue
            self._rewrite(ctx, pair, factors)
            done.append({"kind": pair.kind, "scaled": layer_name(pair.scaled), "partner": layer_name(pair.partner),
                         "row_range_spread": float(factors.max())})
        if done:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, bool(done), {"equalized": done}, rejections)

    @staticmethod
    def _rewrite(ctx: RewriteContext, pair: _Pair, factors: torch.Tensor) -> None:
        """Rows (and bias) of ``pair.scaled`` times the factors; the partner's rows or columns divided."""
        gm = ctx.graph_module
        old = []

        def replace(node: fx.Node, role: str, change) -> None:
            const = argument(node, role)
            if const is None:
                return
            value = attribute(gm, str(const.target)).detach()
            new = ctx.new_state(const, f"{str(const.target).rpartition('.')[2]}_equalized",
                                change(value.double()).to(value.dtype), before=node, replaces=const)
            node.replace_input_with(const, new)
            old.append(const)

        rows = lambda f: (lambda v: v * f.reshape(-1, *([1] * (v.dim() - 1))))  # noqa: E731
        replace(pair.scaled, "weight", rows(factors))
        replace(pair.scaled, "bias", rows(factors))
        if pair.kind == "query-key":
            replace(pair.partner, "weight", rows(1 / factors))
            replace(pair.partner, "bias", rows(1 / factors))
        else:
            per_column = (1 / factors)[pair.columns]
            replace(pair.partner, "weight", lambda v: v * per_column)
        ctx.erase(*old)


__all__ = ["EqualizeAttentionPass"]
