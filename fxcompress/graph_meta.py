"""What fxcompress knows about graph nodes beyond their op: its meta keys and the layer a node is.

Passes stamp facts on nodes that later passes, the exporter and the inspection tools read. Every key
fxcompress writes into ``node.meta`` / ``graph_module.meta`` is defined here (and nowhere else), so
any layer reads them without importing the layer that writes them, and a new key cannot collide with
an old one unnoticed. All keys start with :data:`KEY_PREFIX`, which is how "our own annotations" are
told apart from torch's (``val``, ``nn_module_stack``, ``stack_trace``).

The layer of a node (its module path, ``layer1.0.conv1``) and the choice of layers by user patterns
(``skip=("layer4.*", "fc")``) live here too: every pass and report names layers the same way.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from torch import fx

#: Every fxcompress meta key starts with this; keys with it are ours, any other key is torch's.
KEY_PREFIX = "fxcompress_"

# --- node.meta ---------------------------------------------------------------------------------

#: ``{"pass": name, "from": [names of the nodes it replaced, and what they came from]}``
PROVENANCE_KEY = KEY_PREFIX + "provenance"
#: On a conv/linear: the name of the activation node fuse-activations marked as fused into it.
FUSED_ACTIVATION = KEY_PREFIX + "fused_activation"
#: On that activation: the name of the conv/linear it is fused into (quantization places no q/dq between).
FUSED_INTO = KEY_PREFIX + "fused_into"
#: On every node a quantization pass inserted: ``{"role": ..., "layer": ...}``; how a second run knows.
QUANT_META = KEY_PREFIX + "quant"
#: On the ``aten.mul`` that applies a sparsity mask to a weight (the export bakes these).
MASK_META = KEY_PREFIX + "weight_mask"
#: Optional explicit layer name, for nodes without an ``nn_module_stack`` (read by :func:`layer_name`).
LAYER_KEY = KEY_PREFIX + "layer"
#: Optional explicit numeric-format label (``"int8"``) that reports show instead of the inferred one.
PRECISION_KEY = KEY_PREFIX + "precision"

# --- graph_module.meta -------------------------------------------------------------------------

#: ``[(shape, dtype), ...]`` of the example inputs the graph was captured with.
CAPTURE_INPUTS = KEY_PREFIX + "inputs"
#: True once prune-channels pruned this graph, so a second run (idempotence) changes nothing.
PRUNED_META = KEY_PREFIX + "pruned"
#: True on the multiply equalize-layers put after a squeeze-excitation gate (a rerun updates it)
GATE_SCALE = KEY_PREFIX + "gate_scale"
#: True on a conv/linear whose bias correct-bias has corrected (a rerun leaves it alone)
BIAS_CORRECTED = KEY_PREFIX + "bias_corrected"
#: ``(key, [[2, samples, channels] float64 per calibration batch])`` on a conv/linear quantize-int8 quantized:
#: its float output's per-sample channel means and mean squares, recorded in quantize-int8's own pass
#: over the calibration data, so correct-bias needs no float pass of its own. ``key`` says which graph
#: and weights they were measured on (``bias_correction.float_stats_key``); stale ones are not used.
FLOAT_CHANNEL_STATS = KEY_PREFIX + "float_channel_stats"

# --- ONNX metadata_props read below the api layer ------------------------------------------------

#: On an exported file: the comma-separated names of every input of the compiled graph, in order,
#: unused ones included; the runtime matches positional inputs to the file's inputs by these names.
INPUT_NAMES_PROP = KEY_PREFIX + "input_names"

#: On an exported file whose weights are stored in bfloat16 (each read through a Cast to float32):
#: ``bfloat16`` (fxcompress.export.half).
WEIGHTS_DTYPE_PROP = KEY_PREFIX + "weights_dtype"

#: torch.export's per-node record of the modules a node was traced in: ``{key: (path, type)}``, outermost first.
MODULE_STACK = "nn_module_stack"


def is_own_key(key: str) -> bool:
    """Whether ``key`` is an fxcompress annotation (rather than torch's own meta)."""
    return key.startswith(KEY_PREFIX)


def inherit_meta(node: fx.Node, like: fx.Node) -> None:
    """Give ``node``, which replaces ``like``, its torch meta (``val``, ``nn_module_stack``, trace...).

    Our own annotations are not copied: they describe ``like`` (its fusion, its provenance), not
    the node that now computes its value.
    """
    node.meta.update({k: v for k, v in like.meta.items() if not is_own_key(k)})


def stamp_provenance(node: fx.Node, pass_name: str, replaced: Iterable[fx.Node]) -> None:
    """Record in ``node.meta[PROVENANCE_KEY]`` that pass ``pass_name`` made ``node`` out of ``replaced``.

    ``from`` lists the replaced nodes' names after what they themselves came from (oldest first,
    no repeats), so a chain of rewrites still names the nodes of the captured graph.
    """
    sources: list[str] = []
    for old in replaced:
        earlier = old.meta.get(PROVENANCE_KEY, {}).get("from", [])
        for name in [*earlier, old.name]:
            if name not in sources:
                sources.append(name)
    node.meta[PROVENANCE_KEY] = {"pass": pass_name, "from": sources}


# --- layers ------------------------------------------------------------------------------------

def layer_name(node: fx.Node, fallback: str | None = None) -> str:
    """The dotted module path of the layer that produced ``node`` (``layer1.0.conv1``).

    A ``get_attr`` node belongs to the module that owns the attribute. Other nodes are named by the
    innermost entry of the ``nn_module_stack`` torch.export recorded, else by an explicit
    :data:`LAYER_KEY`. Nodes with neither (top-level code of ``forward``, nodes a pass created
    without copying meta) get ``fallback``: the node's own name by default, so a name is always
    printable; ``fallback=""`` where "no layer" must stay distinguishable (grouping by layer).
    """
    if fallback is None:
        fallback = node.name
    if node.op == "get_attr":
        target = str(node.target)
        return target.rpartition(".")[0] if "." in target else fallback
    stack = node.meta.get(MODULE_STACK)
    if stack:
        path = str(list(stack.values())[-1][0])
        if path:
            # dynamo-style paths spell the root module out; torch.export's usually do not
            return path.replace("L['self'].", "")
    return node.meta.get(LAYER_KEY) or fallback


def matches_layer(patterns: str | Iterable[str], names: str | Iterable[str], kind: str | None = None) -> bool:
    """Whether a user's layer pattern(s) select a layer known by ``names`` (and of ``kind``).

    A pattern selects the layer when it is an fnmatch pattern (case-sensitive) matching any of the
    names (module path, node name, weight name...), or when it equals ``kind`` (``"add"``).
    """
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    names = (names,) if isinstance(names, str) else tuple(names)
    return any((kind is not None and p == kind) or any(fnmatch.fnmatchcase(n, p) for n in names) for p in patterns)


def layer_override(overrides: Mapping[str, Any] | None, names: str | Iterable[str]) -> Any | None:
    """The value of the first ``{pattern: value}`` entry whose pattern matches ``names``, or None."""
    names = (names,) if isinstance(names, str) else tuple(names)
    return next((value for pattern, value in (overrides or {}).items() if matches_layer(pattern, names)), None)


def is_quantized(graph_module: "fx.GraphModule") -> bool:
    """True if a quantization pass already ran on this graph (a node carries :data:`QUANT_META`)."""
    return any(QUANT_META in n.meta for n in graph_module.graph.nodes)
