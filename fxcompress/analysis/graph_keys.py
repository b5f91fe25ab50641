"""Naming graph nodes so that the name survives pickling (trials shipped to other processes).

A GraphModule pickles as its generated code and weights and is traced again on arrival: its nodes
get new names and its weight reads (``get_attr``) move, while every other node keeps its place.
A per-layer search that an executor ships to another process or machine (Ray) therefore names
nodes by key: a weight read by its target, any other node by its position among the others.
"""

from __future__ import annotations

from typing import Any

from torch import fx

#: the op and target of every node that is not a weight read, in order: what must line up on arrival
Ops = list[tuple[str, str]]


def node_keys(graph_module: fx.GraphModule) -> tuple[dict[fx.Node, Any], Ops]:
    """Each node's key, and the ops that :func:`nodes_by_key` checks on the other side."""
    keys: dict[fx.Node, Any] = {}
    ops: Ops = []
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            keys[node] = ("attr", node.target)
        else:
            keys[node] = ("node", len(ops))
            ops.append((node.op, str(node.target)))
    return keys, ops


def nodes_by_key(graph_module: fx.GraphModule, ops: Ops) -> dict[Any, fx.Node]:
    """Key -> node of ``graph_module`` (the unpickled copy); RuntimeError if its ops differ from ``ops``."""
    keys, arrived = node_keys(graph_module)
    if arrived != ops:
        raise RuntimeError("a per-layer search's graph changed in transit (its nodes do not line up after unpickling).")
    return {key: node for node, key in keys.items()}
