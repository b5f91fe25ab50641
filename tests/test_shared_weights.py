"""A compile's result shares the weights no pass changed with the user's model until its first use
(docs/cost.md): an export-only compile holds them once; reading ``result.module`` copies them, so
training it never changes the model; a model changed in place while shared is refused, not exported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import InputError


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


X = (torch.randn(2, 16, generator=torch.Generator().manual_seed(0)),)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval()


def _pointers(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def test_export_only_compile_shares_the_unchanged_weights(tmp_path):
    model = _model()
    result = fxcompress.compile(model, X, "default")
    assert result._shared_weights is not None and result._shared_weights.nbytes > 0
    result.export_onnx(tmp_path / "m.onnx")
    # export read the user's tensors, it did not copy them into the result
    assert result._shared_weights is not None
    assert _pointers(model) & _pointers(result._compiled_graph())


def test_reading_module_gives_the_result_its_own_weights_and_training_it_leaves_the_model_alone(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxcompress.compile(model, X, "default")
    module = result.module
    assert result._shared_weights is None
    assert not _pointers(model) & _pointers(result.graph_module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module(*X).sum().backward()
    optimizer.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the export follows the trained result, and the untouched model is still fine to change
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    result.export_onnx(tmp_path / "trained.onnx")


@pytest.mark.parametrize("write", ["optimizer step", "load_state_dict", "through .data"])
def test_model_changed_in_place_while_shared_is_refused_and_nothing_written(tmp_path, write):
    model = _model()
    result = fxcompress.compile(model, X, "default")
    if write == "optimizer step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(*X).sum().backward()
        optimizer.step()
    elif write == "load_state_dict":
        torch.manual_seed(1)
        model.load_state_dict(Mlp().state_dict())
    else:
        model.fc2.weight.data.mul_(2.0)  # does not bump the version counter: the fingerprint sees it
    with pytest.raises(InputError, match="changed after compile") as caught:
        result.export_onnx(tmp_path / "m.onnx")
    assert "read result.module once right after compile" in str(caught.value)
    assert not any(tmp_path.iterdir())
    with pytest.raises(InputError, match="changed after compile"):
        result.module


def test_decoder_graphs_share_the_users_weights_until_used(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(config).eval()
    result = fxcompress.compile_decoder(model, recipe="int8-dynamic")
    graphs = [result] + ([result.prefill] if result.prefill is not None else [])
    for graph in graphs:
        assert graph._shared_weights is not None  # the embedding, norms: tensors no pass changed
    result.export_onnx(tmp_path / "d.onnx")
    assert all(graph._shared_weights is not None for graph in graphs)
    result.module
    assert result._shared_weights is None
