"""Aligning the nodes of two versions of a graph: which node in ``after`` is which in ``before``.

Shared by the GraphModule diff and the ONNX diff. Items come in topological order, each with a
name, a key (what must agree for two nodes to be the same: operation, attribute target...) and
the names of its inputs. Matching goes from the most to the least certain evidence:

1. equal names and keys (fx keeps a node's name for its lifetime; ONNX exporters are stable);
2. ``hints``: pairs the caller knows (provenance a pass stamped, shared output tensor names);
3. structure: an unmatched node whose inputs map to exactly the inputs of an unmatched node of
   the same key is that node, renamed; walking in topological order lets a rename propagate;
4. nodes of the same key and ``group`` (e.g. the layer, or a networkx Weisfeiler-Lehman hash of
   the neighbourhood) are paired in order when both sides have the same number of them unmatched,
   after which step 3 runs again. Items whose group is None take no part in this step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence


@dataclass(frozen=True)
class Item:
    """A node as the aligner sees it."""

    name: str
    key: Hashable
    inputs: tuple[str, ...]
    group: Hashable = None


def align(
    before: Sequence[Item],
    after: Sequence[Item],
    *,
    hints: Iterable[tuple[str, str]] = (),
) -> dict[str, str]:
    """Return ``{before name: after name}`` for every node judged to be the same node."""
    old = {i.name: i for i in before}
    new = {i.name: i for i in after}
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}

    def pair(o: str, n: str) -> None:
        forward[o], backward[n] = n, o

    for name, item in new.items():
        if name in old and old[name].key == item.key:
            pair(name, name)
    for o, n in hints:
        if o in old and n in new and o not in forward and n not in backward and old[o].key == new[n].key:
            pair(o, n)

    def structural() -> None:
        unmatched_old: dict[tuple, list[str]] = defaultdict(list)
        for item in before:
            if item.name not in forward:
                unmatched_old[(item.key, item.inputs)].append(item.name)
        for item in after:
            if item.name in backward:
                continue
            # The inputs as they were called before; an input with no counterpart cannot match.
            mapped = tuple(backward.get(i, "\0" + i) for i in item.inputs)
            candidates = unmatched_old.get((item.key, mapped))
            if candidates:
                pair(candidates.pop(0), item.name)

    structural()
    groups_old: dict[Hashable, list[str]] = defaultdict(list)
    groups_new: dict[Hashable, list[str]] = defaultdict(list)
    for item in before:
        if item.name not in forward and item.group is not None:
            groups_old[(item.key, item.group)].append(item.name)
    for item in after:
        if item.name not in backward and item.group is not None:
            groups_new[(item.key, item.group)].append(item.name)
    paired = False
    for group, names in groups_new.items():
        if len(groups_old.get(group, ())) == len(names):
            for o, n in zip(groups_old[group], names):
                pair(o, n)
                paired = True
    if paired:
        structural()
    return forward
