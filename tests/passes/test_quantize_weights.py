"""quantize-weights: block-wise int4/int8 weights, RTN and GPTQ, trainable fake-quant, tied tables, options.

The ONNX side (MatMulNBits / GatherBlockQuantized packing, ORT parity, file size) is in
tests/export/test_nbits.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import InputError, RecipeError
from fxcompress.graph_meta import PRECISION_KEY, QUANT_META
from fxcompress.infra.pass_base import ALREADY_QUANTIZED
from fxcompress.passes.block_quant import block_codes, block_grid, fake_quantize_blocks, gptq
from fxcompress.passes.quantize_weights import QuantizeWeightsPass, nbits_embedding, nbits_linear

aten = torch.ops.aten


def tiny_llama(vocab: int = 256, hidden: int = 64, layers: int = 2, tied: bool = True):
    """A random-init LlamaForCausalLM (no downloads), called with input_ids only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), torch.randint(0, vocab, (1, 12))


def _targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _layers(result) -> dict[str, dict]:
    record = next(r for r in result.report.records if r.name == "quantize-weights")
    return {row["name"]: row for row in record.stats["layers"]}


@pytest.fixture(scope="module")
def llama_int4():
    model, ids = tiny_llama()
    return model, ids, fxcompress.compile(model, (ids,), [QuantizeWeightsPass()], tolerance=1.0)


def test_structure_every_linear_and_the_tied_table(llama_int4):
    _, _, result = llama_int4
    targets = _targets(result.module)
    assert targets[nbits_linear] == 15 and targets[aten.linear.default] == 0  # 2 x 7 projections + lm_head
    assert targets[nbits_embedding] == 1 and targets[aten.embedding.default] == 0
    layers = _layers(result)
    assert layers["lm_head"]["lm_head"] is True and layers["lm_head"]["precision"] == "int4"
    # Lookups default to 8 bits: the tied table gets a grid per precision, read from the one float weight.
    assert layers["model.embed_tokens"]["precision"] == "int8"
    embed, head = _tied_readers(result.module)
    assert embed.args[1] is head.args[1] and embed.args[2] is not head.args[2]
    assert embed.args[4] == 8 and head.args[5] == 4
    assert head.meta[PRECISION_KEY] == "int4 weights" and embed.meta[PRECISION_KEY] == "int8 weights"


def _tied_readers(gm):
    embed = next(n for n in gm.graph.nodes if n.target is nbits_embedding)
    head = next(n for n in gm.graph.nodes if n.target is nbits_linear and n.meta[QUANT_META]["layer"] == "lm_head")
    return embed, head


def test_a_tied_table_at_one_precision_has_one_grid():
    model, ids = tiny_llama(layers=1)
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(embedding_bits=4)], tolerance=1.0)
    embed, head = _tied_readers(result.module)
    assert embed.args[1:4] == head.args[1:4] and embed.args[4] == head.args[5] == 4
    assert _layers(result)["model.embed_tokens"]["precision"] == "int4"


def test_a_tied_table_that_dominates_the_weights_stays_one_copy():
    model, ids = tiny_llama(vocab=4096, layers=1)  # the table: 262k of 315k weights
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass()], tolerance=1.0)
    embed, head = _tied_readers(result.module)
    assert embed.args[1:4] == head.args[1:4] and embed.args[4] == 4
    row = _layers(result)["model.embed_tokens"]
    assert row["precision"] == "int4" and "one 4-bit copy shared with lm_head" in row["note"]
    forced = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(embedding_bits=8)], tolerance=1.0)
    assert _layers(forced)["model.embed_tokens"]["precision"] == "int8"


def test_idempotent(llama_int4):
    _, _, result = llama_int4
    again = QuantizeWeightsPass()(result.module)
    assert not again.modified and again.stats == {"skipped_graph": ALREADY_QUANTIZED}


def test_user_model_untouched_and_outputs_close(llama_int4):
    model, ids, result = llama_int4
    fresh, _ = tiny_llama()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert result.report.drift < 0.3


def _reference_blocks(weight: torch.Tensor, bits: int, block: int, symmetric: bool) -> torch.Tensor:
    """Independent round-to-nearest reference: a loop over blocks, as the issue describes it."""
    out = torch.empty_like(weight)
    qmax = 2**bits - 1
    for r in range(weight.shape[0]):
        for start in range(0, weight.shape[1], block):
            w = weight[r, start:start + block].double()
            lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
            if symmetric:
                mid = 2 ** (bits - 1)
                scale = max(hi / (qmax - mid), -lo / mid) or 1.0
                zero = mid
            else:
                scale = (hi - lo) / qmax or 1.0
                zero = min(max(round(-lo / scale), 0), qmax)
            q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
            out[r, start:start + block] = ((q - zero) * scale).float()
    return out


@pytest.mark.parametrize("bits, symmetric, block, cols", [(4, False, 32, 64), (4, True, 16, 40), (8, True, 32, 72), (8, False, 64, 64)])
def test_fake_quant_matches_a_reference_dequantization(bits, symmetric, block, cols):
    weight = torch.randn(6, cols)
    scale, zero = block_grid(weight, bits, block, symmetric)
    assert scale.shape == zero.shape == (6, -(-cols // block))
    if symmetric:
        assert bool((zero == 2 ** (bits - 1)).all())
    got = fake_quantize_blocks(weight, scale, zero, bits, block)
    assert torch.allclose(got, _reference_blocks(weight, bits, block, symmetric), atol=1e-5)
    codes = block_codes(weight, scale, zero, bits, block)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1 and torch.equal(codes, codes.round())


def test_int8_error_is_below_int4_error():
    weight = torch.randn(32, 128)
    errors = {}
    for bits in (4, 8):
        scale, zero = block_grid(weight, bits, 32, symmetric=bits == 8)
        errors[bits] = float((fake_quantize_blocks(weight, scale, zero, bits, 32) - weight).abs().max())
    assert errors[8] < errors[4] / 8


class Outliers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 64)

    def forward(self, x):
        return self.fc(x)


def _outlier_data(n: int, seed: int) -> torch.Tensor:
    """Inputs whose channels differ in scale by 100x, and are correlated: what GPTQ exploits."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, 128, generator=g)
    mix = torch.randn(128, 128, generator=torch.Generator().manual_seed(7)) * 0.3 + torch.eye(128)
    x = base @ mix
    x[..., :4] *= 30.0
    return x


def test_gptq_beats_round_to_nearest_on_outlier_channels():
    torch.manual_seed(0)
    model = Outliers().eval()
    calibration = [(_outlier_data(4, seed),) for seed in range(8)]
    held_out = _outlier_data(4, 99)  # the captured batch size
    with torch.no_grad():
        reference = model(held_out)
    errors = {}
    for method in ("rtn", "gptq"):
        result = fxcompress.compile(model, calibration[0], [QuantizeWeightsPass(method=method)], calibration=calibration,
                                    tolerance=1.0)
        with torch.no_grad():
            errors[method] = float((result.module(held_out) - reference).square().mean())
        assert _layers(result)["fc"]["precision"] == "int4"
    assert errors["gptq"] < 0.7 * errors["rtn"], errors


def test_gptq_weights_lie_on_their_grid():
    weight = torch.randn(16, 96)
    x = torch.randn(200, 96)
    new, scale, zero = gptq(weight, x.T.double() @ x.double(), 4, 32, symmetric=False)
    assert torch.allclose(fake_quantize_blocks(new, scale, zero, 4, 32), new, atol=1e-6)


def test_gptq_needs_calibration_data_or_falls_back():
    model, ids = tiny_llama(layers=1)
    with pytest.raises(InputError, match="needs calibration data"):
        fxcompress.compile(model, (ids,), [QuantizeWeightsPass(method="gptq")], tolerance=1.0)
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(method="gptq", without_calibration="rtn")], tolerance=1.0)
    stats = result.report.records[0].stats
    assert stats["method"] == "rtn" and "fallback" in stats


def test_keep_float_and_the_tied_table_follow_lm_head():
    model, ids = tiny_llama(layers=1)
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(keep_float=("lm_head", "*.mlp.down_proj"))], tolerance=1.0)
    layers = _layers(result)
    assert layers["lm_head"]["precision"] == "float" and layers["lm_head"]["reason"] == "keep_float"
    assert layers["model.layers.0.mlp.down_proj"]["precision"] == "float"
    # The embedding shares lm_head's float table: a quantized copy would only add bytes.
    assert layers["model.embed_tokens"]["precision"] == "float" and "tied" in layers["model.embed_tokens"]["reason"]
    targets = _targets(result.module)
    assert targets[nbits_linear] == 6 and targets[aten.linear.default] == 2 and targets[aten.embedding.default] == 1


def test_lm_head_int8_takes_the_tied_embedding_along():
    model, ids = tiny_llama(layers=1)
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(lm_head="int8")], tolerance=1.0)
    layers = _layers(result)
    assert layers["lm_head"]["precision"] == "int8" and layers["model.embed_tokens"]["precision"] == "int8"
    assert layers["model.layers.0.mlp.up_proj"]["precision"] == "int4"
    embed, head = _tied_readers(result.module)
    assert embed.args[1:4] == head.args[1:4]  # both 8 bits: one grid


def test_max_drift_keeps_the_most_sensitive_layers_in_float():
    model, ids = tiny_llama(layers=1)
    calibration = [(torch.randint(0, 256, (1, 12)),) for _ in range(2)]
    full = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(bits=4)], calibration=calibration, tolerance=1.0)
    budget = full.report.drift / 3
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(bits=4, max_drift=budget)], calibration=calibration,
                                tolerance=1.0)
    layers = _layers(result)
    kept = [name for name, row in layers.items() if row.get("reason") == "max_drift"]
    assert kept and any(row["precision"] == "int4" for row in layers.values())
    assert result.report.records[0].stats["calibration_drift"] <= budget


def test_fake_quant_is_trainable(llama_int4):
    model, ids, result = llama_int4
    import copy

    gm = copy.deepcopy(result.module).train()
    weight = gm.get_parameter("model.layers.0.mlp.up_proj.weight")
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    target = torch.roll(ids, -1, dims=1)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        logits = gm(ids)["logits"]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss.backward()
        losses.append(float(loss.detach()))
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        optimizer.step()
    assert not torch.equal(weight.detach(), before) and losses[-1] < losses[0]


@pytest.mark.parametrize("options, words", [
    ({"bits": 3}, "bits must be 4 or 8"),
    ({"block_size": 24}, "power of 2"),
    ({"block_size": 8}, "at least 16"),
    ({"accuracy_level": 7}, "accuracy_level must be 0..4"),
    ({"method": "awq"}, "must be"),
    ({"damp": 1.5}, "damp"),
    ({"embedding_bits": 2}, "embedding_bits must be 4, 8 or None"),
])
def test_bad_options_say_what_and_how(options, words):
    with pytest.raises(RecipeError) as info:
        QuantizeWeightsPass(options)
    message = str(info.value)
    assert words in message and "\n\n" not in message


def test_presets_run_on_a_tiny_llama():
    model, ids = tiny_llama(layers=1)
    calibration = [(torch.randint(0, 256, (1, 12)),) for _ in range(4)]
    for preset, bits in (("int4-weights", 4), ("int8-weights", 8)):
        result = fxcompress.compile(model, (ids,), preset, calibration=calibration)
        record = next(r for r in result.report.records if r.name == "quantize-weights")
        assert record.stats["bits"] == bits and record.stats["quantized_layers"] == 9
        assert record.stats["method"] == ("gptq" if bits == 4 else "rtn")
        assert result.report.drift <= result.recipe.tolerance


def test_the_users_metric_decides_which_layers_stay_float():
    model, ids = tiny_llama(layers=1)
    batch = torch.randint(0, 256, (1, 12))

    def evaluate(module) -> float:  # higher is better: agreement with the float model's logits
        with torch.no_grad():
            return -float((module(batch)["logits"] - reference).abs().mean())

    with torch.no_grad():
        reference = model(batch)["logits"]
    full = fxcompress.compile(model, (ids,), [QuantizeWeightsPass()], evaluate=evaluate, tolerance=1.0).report.metric["drop"]
    assert full > 0
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass()], evaluate=evaluate, max_metric_drop=full / 3,
                                tolerance=1.0)
    stats = result.report.records[0].stats
    assert stats["metric_trials"] and any(row.get("reason") == "max_metric_drop" for row in stats["layers"])
    assert result.report.metric["drop"] <= full / 3


class Small(nn.Module):
    """A wide layer, a narrow one (8 input features) and an embedding; the narrow one reads the wide one's weight too."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.wide = nn.Linear(64, 8)
        self.narrow = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.wide(self.embed(ids))
        return self.narrow(h), h @ self.wide.weight  # wide's weight also read by a matmul: shared


@pytest.mark.parametrize("options, layer, reason", [
    ({}, "narrow", "min_features"),
    ({"embeddings": "float"}, "embed", "embeddings=float"),
    ({"keep_float": ("emb*",)}, "embed", "keep_float"),
])
def test_each_reason_to_stay_float(options, layer, reason):
    model, ids = Small().eval(), torch.randint(0, 50, (2, 5))
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(options)], tolerance=1.0)
    layers = _layers(result)
    assert layers[layer]["precision"] == "float" and layers[layer]["reason"] == reason
    assert layers["wide"]["precision"] == "int4"


def test_gptq_leaves_a_shared_weight_to_round_to_nearest():
    model, ids = Small().eval(), torch.randint(0, 50, (2, 5))
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(method="gptq")], calibration=[(ids,)], tolerance=1.0)
    wide = _layers(result)["wide"]
    assert wide["precision"] == "int4" and wide["method"].startswith("rtn (weight shared")
    # the weight is not rewritten: the matmul reading it too still sees the float values
    assert torch.equal(result.module.get_parameter("wide.weight"), model.wide.weight)


def test_gptq_survives_collinear_inputs():
    weight = torch.randn(8, 64)
    x = torch.randn(3, 64).repeat(20, 1)  # rank 3: the Hessian is singular without damping
    new, scale, zero = gptq(weight, x.T.double() @ x.double(), 4, 32, symmetric=False, damp=0.0)
    assert torch.isfinite(new).all() and torch.allclose(fake_quantize_blocks(new, scale, zero, 4, 32), new, atol=1e-6)


def test_gptq_quantizes_a_tied_lm_head_from_the_float_table(monkeypatch):
    """The 8-bit lookups and the 4-bit lm_head are two groups: lm_head gets GPTQ, starting from the
    float weight (not the 8-bit values the earlier lookup left in the sequential working copy)."""
    from fxcompress.passes import quantize_weights

    model, ids = tiny_llama(layers=1)
    seen: list[torch.Tensor] = []

    def recording_gptq(weight, *args, **kwargs):
        seen.append(weight.clone())
        return gptq(weight, *args, **kwargs)

    monkeypatch.setattr(quantize_weights, "gptq", recording_gptq)
    calibration = [(torch.randint(0, 256, (1, 12)),) for _ in range(2)]
    result = fxcompress.compile(model, (ids,), [QuantizeWeightsPass(method="gptq")], calibration=calibration, tolerance=1.0)
    layers = _layers(result)
    assert "method" not in layers["lm_head"] and layers["model.embed_tokens"]["precision"] == "int8"
    table = model.lm_head.weight.detach()
    assert any(w.shape == table.shape and torch.equal(w, table) for w in seen)
    embed, head = _tied_readers(result.module)
    assert embed.args[1] is not head.args[1]  # lm_head reads its GPTQ weight, the lookup the float table
    assert torch.equal(result.module.get_parameter(str(embed.args[1].target)), table)
