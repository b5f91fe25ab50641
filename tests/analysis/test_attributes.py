"""analysis.attributes: the one place a get_attr target is split into owner module and name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxcompress.analysis.attributes import attribute, attribute_owner, delete_attribute, replace_attribute


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight.requires_grad_(False)
    model[0].register_buffer("scale", torch.ones(3))
    model[0].register_buffer("cache", torch.zeros(3), persistent=False)
    model.register_buffer("top", torch.zeros(1))
    return model


def test_owner_and_lookup():
    model = _model()
    assert attribute_owner(model, "0.weight") == (model[0], "weight")
    assert attribute_owner(model, "top") == (model, "top")
    assert attribute(model, "0.scale") is model[0].scale


def test_replace_keeps_the_kind_of_the_attribute():
    model = _model()
    replace_attribute(model, "0.weight", torch.zeros(2, 4))
    replace_attribute(model, "0.bias", torch.zeros(2))
    replace_attribute(model, "0.cache", torch.ones(2))
    replace_attribute(model, "top", torch.ones(1))
    assert isinstance(model[0].weight, nn.Parameter) and not model[0].weight.requires_grad
    assert isinstance(model[0].bias, nn.Parameter) and model[0].bias.requires_grad
    assert model[0].weight.shape == (2, 4)
    assert "0.cache" not in model.state_dict() and torch.equal(model[0].cache, torch.ones(2))
    assert "cache" in model[0]._buffers and torch.equal(model.state_dict()["top"], torch.ones(1))


def test_delete_removes_buffers_and_parameters():
    model = _model()
    delete_attribute(model, "0.scale")
    delete_attribute(model, "0.bias")
    assert "0.scale" not in model.state_dict() and "0.bias" not in model.state_dict()
    with pytest.raises(AttributeError):
        attribute(model, "0.scale")
