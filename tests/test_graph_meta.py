"""graph_meta is the one owner of fxcompress's meta keys, of layer names and of layer patterns."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import torch
from torch import fx, nn

import fxcompress
from fxcompress import graph_meta
from fxcompress.capture import capture
from fxcompress.graph_meta import (FUSED_ACTIVATION, LAYER_KEY, MODULE_STACK, PROVENANCE_KEY, inherit_meta, is_own_key,
                                  layer_name, layer_override, matches_layer)

PACKAGE = Path(fxcompress.__file__).parent
#: Modules allowed to spell an ``fxcompress_*`` string: the owner, and api.py and capture_decoder.py
#: whose keys are ONNX ``metadata_props`` of the exported file (not graph meta).
_ALLOWED = {"graph_meta.py", "api.py", "capture_decoder.py"}


def test_every_meta_key_is_defined_in_graph_meta_only():
    """A key literal anywhere else is a second owner (and a typo there would silently read nothing)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in _ALLOWED:
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.STRING and re.match(r"""^[rbuRBU]?['"]fxcompress_""", tok.string):
                offenders.append(f"{path.relative_to(PACKAGE)}:{tok.start[0]} {tok.string}")
    assert offenders == []


def test_keys_are_distinct_and_prefixed():
    keys = {name: value for name, value in vars(graph_meta).items()
            if name.isupper() and isinstance(value, str) and name not in ("KEY_PREFIX", "MODULE_STACK")}
    assert len(keys) >= 9
    assert all(is_own_key(v) for v in keys.values())
    assert len(set(keys.values())) == len(keys)
    assert not is_own_key(MODULE_STACK) and not is_own_key("val")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    def forward(self, x):
        return self.block(x) + 1


def test_layer_name_reads_the_module_stack_and_the_parameter_owner():
    gm = capture(_Net(), (torch.randn(1, 3, 6, 6),))
    conv = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert layer_name(conv) == "block.0"
    weight = conv.args[1]
    assert weight.op == "get_attr" and layer_name(weight) == "block.0"
    add = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    assert layer_name(add, fallback="") == "" and layer_name(add) == add.name  # top-level code: no layer path


def test_layer_name_fallbacks():
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.relu, (x,))
    assert layer_name(node) == node.name  # default: always printable
    assert layer_name(node, fallback="") == ""  # "no layer" stays distinguishable
    node.meta[MODULE_STACK] = {"a": ("L['self'].encoder.layer.0", nn.Module)}
    assert layer_name(node) == "encoder.layer.0"
    node.meta[MODULE_STACK] = {"a": ("", nn.Module)}
    node.meta[LAYER_KEY] = "explicit"
    assert layer_name(node) == "explicit"
    top = graph.get_attr("scale")
    assert layer_name(top, fallback="") == "" and layer_name(top) == top.name


def test_matches_layer():
    assert matches_layer(("layer4.*",), ("layer4.1.conv2", "conv2d_7"))
    assert matches_layer("conv2d_*", ("layer1.conv", "conv2d_7"))  # any name, one pattern as a string
    assert not matches_layer(("Layer4.*",), "layer4.1.conv2")  # case-sensitive
    assert matches_layer(("add",), ("stem", "add_1"), kind="add")
    assert not matches_layer(("add",), ("stem", "add_1"))  # kind only when given
    assert not matches_layer((), "anything")


def test_layer_override_first_matching_pattern_wins():
    overrides = {"layer4.*": 0.3, "layer*": 0.1}
    assert layer_override(overrides, ("layer4.0.conv1",)) == 0.3
    assert layer_override(overrides, ["layer1.0.conv1", "x"]) == 0.1
    assert layer_override(overrides, "fc") is None
    assert layer_override(None, "fc") is None


def test_inherit_meta_copies_torch_meta_but_not_our_annotations():
    graph = fx.Graph()
    x = graph.placeholder("x")
    old, new = graph.call_function(torch.relu, (x,)), graph.call_function(torch.relu, (x,))
    old.meta.update({"val": 1, MODULE_STACK: {"a": ("fc", nn.Linear)}, FUSED_ACTIVATION: "relu",
                     PROVENANCE_KEY: {"pass": "p", "from": []}})
    inherit_meta(new, old)
    assert new.meta == {"val": 1, MODULE_STACK: {"a": ("fc", nn.Linear)}}
    assert layer_name(new) == "fc"
