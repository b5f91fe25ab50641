"""The tensors a ``get_attr`` node reads: find, replace and delete them by dotted target.

A get_attr target (``layer1.0.conv1.weight``) names an attribute of a submodule of the
GraphModule. Every pass, the rewrite context and the exporter go through these functions to
reach it, so the split of a target into owner module and attribute name exists once.
"""

from __future__ import annotations

from typing import Any

import torch


def attribute(root: torch.nn.Module, target: str) -> Any:
    """The object at dotted path ``target`` below ``root`` (what a get_attr node reads)."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def attribute_owner(root: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """The submodule that holds ``target`` and the attribute's name in it."""
    owner_path, _, name = target.rpartition(".")
    return (root.get_submodule(owner_path) if owner_path else root), name


def replace_attribute(root: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Store ``value`` at ``target`` keeping its kind: a Parameter stays one (same requires_grad),
    a buffer stays a buffer (persistent or not)."""
    owner, name = attribute_owner(root, target)
    old = getattr(owner, name)
    if isinstance(old, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(owner, name, value)  # Module.__setattr__ keeps a registered buffer in _buffers


def add_attribute(owner: torch.nn.Module, base: str, tensor: torch.Tensor, parameter: bool = False,
                  requires_grad: bool = True) -> str:
    """Register ``tensor`` on ``owner`` as a buffer (or a Parameter) named ``base``, made unique
    (``base_1``, ``base_2``...) when taken; returns the name used."""
    name, i = base, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    if parameter:
        owner.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=requires_grad))
    else:
        owner.register_buffer(name, tensor)
    return name


def delete_attribute(root: torch.nn.Module, target: str) -> None:
    """Remove the parameter, buffer or plain attribute at ``target``."""
    owner, name = attribute_owner(root, target)
    delattr(owner, name)
