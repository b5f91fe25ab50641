"""Dead-branch pruning passes: structure, modified + idempotence, numerics, and negative cases."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor

from fxcompress.analysis.graph_stats import op_histogram
from fxcompress.capture import capture
from fxcompress.infra.recipe import resolve_recipe
from fxcompress.infra.registry import create_pass
from fxcompress.numerics import compare_outputs, flatten_outputs, worst_drift
from fxcompress.passes.cleanup import EliminateDeadCodePass
from tests.passes.helpers import run_pass

aten = torch.ops.aten


def assert_matches(model: nn.Module, gm: fx.GraphModule, *inputs: torch.Tensor, tol: float = 1e-5) -> None:
    with torch.no_grad():
        reference, got = flatten_outputs(model(*inputs)), flatten_outputs(gm(*inputs))
    assert worst_drift(compare_outputs(reference, got)) <= tol


def ops(gm: fx.GraphModule):
    return op_histogram(gm)


def provenance_of(gm: fx.GraphModule, pass_name: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get("fxcompress_provenance", {}).get("pass") == pass_name]


# ------------------------------------------------------------------------------------ remove-guards


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x.to(torch.float32)).relu()


class ConstantCond(nn.Module):
    """torch.cond whose predicate reads only a buffer: known once the model is captured."""

    def __init__(self, flag: float) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("flag", torch.tensor([flag]))

    def forward(self, x):
        y = torch.cond(self.flag.sum() > 0, lambda a: a.sin(), lambda a: a.cos(), (x,))
        return self.fc(y)


class InputCond(nn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda a: a.sin(), lambda a: a.cos(), (x,))


def test_remove_guards_drops_guard_module_and_true_asserts():
    model, x = Plain().eval(), torch.randn(2, 6)
    gm = capture(model, (x,))
    assert ops(gm)["call_module:_guards_fn"] == 1 and ops(gm)["aten._assert_tensor_metadata"] == 1
    result = run_pass("remove-guards", gm)
    assert result.modified
    assert result.stats["guards_removed"] == 1 and result.stats["asserts_removed"] == 1
    after = ops(result.graph_module)
    assert after["call_module:_guards_fn"] == 0 and after["aten._assert_tensor_metadata"] == 0
    assert not hasattr(result.graph_module, "_guards_fn")
    assert_matches(model, result.graph_module, x)


def test_remove_guards_can_keep_input_guards():
    gm = capture(Plain().eval(), (torch.randn(2, 6),))
    result = run_pass("remove-guards", gm, keep_input_guards=True)
    assert ops(result.graph_module)["call_module:_guards_fn"] == 1


def test_remove_guards_resolves_scalars_and_scalar_asserts():
    gm = capture(Plain().eval(), (torch.randn(2, 6),))
    graph = gm.graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    relu = next(n for n in graph.nodes if n.target is aten.relu.default)
    with graph.inserting_before(relu):
        size = graph.call_function(aten.sym_size.int, (x, 0))
        size.meta["val"] = 2  # capture resolved this size to a plain int
        holds = graph.call_function(aten._assert_scalar.default, (True, "always holds"))
        fails = graph.call_function(aten._assert_scalar.default, (False, "always fails"))
        ranged = graph.call_function(aten.sym_constrain_range.default, (size,), {"min": 1, "max": 4})
    gm.recompile()
    result = create_pass("remove-guards")(gm)
    assert result.stats["scalars_resolved"] == 1 and result.stats["asserts_removed"] == 3  # + the dtype check
    remaining = [n for n in result.graph_module.graph.nodes if n.op == "call_function"]
    assert fails in remaining and holds not in remaining and size not in remaining and ranged not in remaining
    assert any("statically false" in r.reason for r in result.rejections)


def test_remove_guards_inlines_constant_conditional():
    for flag, kept, dropped in ((1.0, "aten.sin", "aten.cos"), (-1.0, "aten.cos", "aten.sin")):
        model, x = ConstantCond(flag).eval(), torch.randn(3, 6)
        gm = capture(model, (x,))
        assert ops(gm)["cond"] == 1
        result = run_pass("remove-guards", gm)
        assert result.stats["conditionals_resolved"] == 1
        after = ops(result.graph_module)
        assert after["cond"] == 0 and after[kept] == 1 and after[dropped] == 0
        assert after["aten.sum"] == 0 and after["aten.gt"] == 0  # the predicate leaves no residue
        assert not any(name.endswith("_graph_0") for name, _ in result.graph_module.named_children())
        assert provenance_of(result.graph_module, "remove-guards")
        assert_matches(model, result.graph_module, x)


def test_remove_guards_keeps_input_dependent_conditional():
    gm = capture(InputCond(), (torch.randn(3, 6),))
    result = run_pass("remove-guards", gm)
    assert ops(result.graph_module)["cond"] == 1
    assert any("depends on the inputs" in r.reason for r in result.rejections)


# ----------------------------------------------------------------------------------- fold-constants


class ConstantArithmetic(nn.Module):
    """A weight transpose and mask arithmetic on buffers: both computed once at compile time."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.register_buffer("positions", torch.arange(8))

    def forward(self, x):
        scale = (self.positions.float() * 0.5 + 1.0).unsqueeze(0)
        return (x @ self.w.t()) * scale


class Growth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("small", torch.randn(4))

    def forward(self, x):
        return x + (self.small * 2).expand(128, 64, 4)  # 128 KiB from 16 bytes


class RandomAndMutated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("c", torch.ones(4))

    def forward(self, x):
        t = self.c * 2
        t.add_(x.mean())  # t is written with input data: not a constant
        return x + t + torch.rand(4) * 0


class FakeQuantizedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        weight = torch.fake_quantize_per_tensor_affine(self.fc.weight, 0.05, 0, -128, 127)
        return torch.nn.functional.linear(x, weight, self.fc.bias)


class ConstantOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("c", torch.ones(4))

    def forward(self, x):
        return x + 1, self.c * 3


def test_fold_constants_structure_numerics_and_state():
    model, x = ConstantArithmetic().eval(), torch.randn(2, 6)
    gm = run_pass("remove-guards", capture(model, (x,))).graph_module  # the dtype assert reads `positions`
    result = run_pass("fold-constants", gm)
    assert result.modified and result.stats["folded"] == 2 and result.stats["growth_limited"] == 0
    after = ops(result.graph_module)
    assert set(after) == {"aten.matmul", "aten.mul"}  # transpose and mask arithmetic are gone
    folded = provenance_of(result.graph_module, "fold-constants")
    assert len(folded) == 2 and all(n.op == "get_attr" for n in folded)
    for node in folded:
        val = node.meta["val"]
        assert isinstance(val, FakeTensor) and val.device.type == "cpu"
        assert tuple(val.shape) == tuple(getattr(result.graph_module, node.target).shape)
        assert node.meta["fxcompress_provenance"]["from"]
    assert_matches(model, result.graph_module, x)
    cleaned = EliminateDeadCodePass()(result.graph_module).graph_module
    names = set(cleaned.state_dict())
    assert "w" not in names and "positions" not in names and len(names) == 2


def test_fold_constants_respects_growth_limit():
    model, x = Growth().eval(), torch.randn(128, 64, 4)
    result = run_pass("fold-constants", capture(model, (x,)))
    assert result.stats["growth_limited"] == 1 and result.stats["folded"] == 1  # small * 2, not the expand
    assert ops(result.graph_module)["aten.expand"] == 1 and ops(result.graph_module)["aten.mul"] == 0
    assert any("max_growth" in r.reason for r in result.rejections)
    assert_matches(model, result.graph_module, x)
    relaxed = run_pass("fold-constants", capture(model, (x,)), always_fold_bytes=1 << 20)
    assert ops(relaxed.graph_module)["aten.expand"] == 0


def test_fold_constants_folds_nested_cones_below_growth_limits():
    class TwoExpands(Growth):
        def forward(self, x):
            a = self.small * 2
            c = a + 1  # folded after `a`, which it reads: its cone then holds a's new buffer
            return x + a.expand(128, 64, 4) + c.expand(128, 64, 4)

    model, x = TwoExpands().eval(), torch.randn(128, 64, 4)
    result = run_pass("fold-constants", capture(model, (x,)))
    assert result.stats["growth_limited"] == 2 and result.stats["folded"] == 2
    assert ops(result.graph_module)["aten.expand"] == 2 and ops(result.graph_module)["aten.mul"] == 0
    assert_matches(model, result.graph_module, x)


def test_fold_constants_skips_random_mutated_and_quantized_values():
    gm = capture(RandomAndMutated().eval(), (torch.randn(3, 4),))
    result = run_pass("fold-constants", gm)
    assert not result.modified
    after = ops(result.graph_module)
    assert after["aten.rand"] == 1 and after["aten.add_"] == 1
    quantized = run_pass("fold-constants", capture(FakeQuantizedWeight().eval(), (torch.randn(2, 4),)))
    assert not quantized.modified  # the exporter needs the fake-quantize to emit Q/DQ


def test_fold_constants_keeps_parameters_when_asked_and_outputs():
    model, x = ConstantArithmetic().eval(), torch.randn(2, 6)
    result = run_pass("fold-constants", capture(model, (x,)), fold_parameters=False)
    assert result.stats["folded"] == 1 and ops(result.graph_module)["aten.t"] == 1
    out = run_pass("fold-constants", capture(ConstantOutput().eval(), (x[:, :4],)))
    assert not out.modified and ops(out.graph_module)["aten.mul"] == 1


# --------------------------------------------------------------------------------- simplify-algebra


class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("ones", torch.ones(8))
        self.register_buffer("zeros", torch.zeros(1, 8))

    def forward(self, x):  # x: [2, 4, 8]
        y = self.fc(x) * 1 + 0
        y = (y / 1 - 0) * self.ones + self.zeros
        y = torch.cat([y], dim=1)[:, 0:4]  # export writes the full slice as aten.alias
        y = torch.ops.aten.slice.Tensor(y, 1, 0, 2**63 - 1)
        y = y.transpose(1, 2).transpose(2, 1)
        y = y.permute(2, 0, 1).permute(1, 2, 0)
        return torch.relu(y)


class KeepsBroadcastAndMutation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("zeros", torch.zeros(3, 1, 8))

    def forward(self, x):  # x: [1, 4, 8]
        h = self.fc(x)
        widened = h + self.zeros  # broadcasts h to [3, 4, 8]: not an identity
        y = h + 0
        y.add_(1)  # y is written: replacing it by h would write h
        return widened * 2, y * h


class Attention(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        mask = torch.ones(5, 5, dtype=torch.bool)
        self.register_buffer("mask", torch.tril(mask) if causal else mask)

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[None, None])


def test_simplify_algebra_removes_identities():
    model, x = Identities().eval(), torch.randn(2, 4, 8)
    plain = run_pass("simplify-algebra", capture(model, (x,)))
    assert plain.stats["no_ops"] == 0 and ops(plain.graph_module)["aten.alias"] == 1  # left to remove-no-ops
    result = run_pass("simplify-algebra", capture(model, (x,)), include_no_ops=True)
    assert result.modified
    assert result.stats["identities"] == 6 and result.stats["single_cats"] == 1 and result.stats["full_slices"] == 1
    assert result.stats["no_ops"] == 1
    assert result.stats["permutes_cancelled"] == 2
    assert set(ops(result.graph_module)) == {"aten.linear", "aten.relu", "call_module:_guards_fn"}
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_simplify_algebra_merges_permutes():
    class TwoPermutes(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 1).transpose(0, 1) * 2

    model, x = TwoPermutes(), torch.randn(2, 3, 4)
    result = run_pass("simplify-algebra", capture(model, (x,)))
    assert result.stats["permutes_merged"] == 1
    after = ops(result.graph_module)
    assert after["aten.permute"] == 1 and after["aten.transpose"] == 0
    assert provenance_of(result.graph_module, "simplify-algebra")
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_simplify_algebra_keeps_broadcasting_and_written_values():
    model, x = KeepsBroadcastAndMutation().eval(), torch.randn(1, 4, 8)
    result = run_pass("simplify-algebra", capture(model, (x,)))
    assert result.stats["identities"] == 0
    assert ops(result.graph_module)["aten.add"] == 2
    assert_matches(model, result.graph_module, x)


def test_simplify_algebra_drops_attention_mask_that_masks_nothing():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    full = Attention(causal=False).eval()
    result = run_pass("simplify-algebra", capture(full, (q, k, v)))
    assert result.stats["attention_masks_dropped"] == 1
    sdpa = next(n for n in result.graph_module.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    assert len(sdpa.args) < 4 or sdpa.args[3] is None
    assert not [n for n in result.graph_module.graph.nodes if n.op == "get_attr"]
    assert_matches(full, result.graph_module, q, k, v)
    causal = Attention(causal=True).eval()
    kept = run_pass("simplify-algebra", capture(causal, (q, k, v)))
    assert kept.stats["attention_masks_dropped"] == 0
    assert_matches(causal, kept.graph_module, q, k, v)


# ------------------------------------------------------------------ eliminate-common-subexpressions


class Repeated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, y):
        a = torch.relu(self.fc(x))
        b = torch.relu(self.fc(x))
        return a + b + x * y + y * x


class ReadWriteRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        row = h[0]
        first = row.sin()
        h.add_(1)  # writes row through its base
        second = row.sin()
        noise = torch.rand_like(x) * 0 + torch.rand_like(x) * 0
        return first + second + noise


def test_cse_merges_identical_pure_ops():
    model, x, y = Repeated().eval(), torch.randn(2, 6), torch.randn(2, 6)
    gm = capture(model, (x, y))
    assert ops(gm)["aten.linear"] == 2
    result = run_pass("eliminate-common-subexpressions", gm)
    assert result.modified and result.stats["merged"] == 3  # linear, relu, and y * x
    after = ops(result.graph_module)
    assert after["aten.linear"] == 1 and after["aten.relu"] == 1 and after["aten.mul"] == 1
    assert_matches(model, result.graph_module, x, y)


def test_cse_merges_attention_without_dropout():
    class TwiceAttention(nn.Module):
        def forward(self, q, k, v):
            sdpa = torch.nn.functional.scaled_dot_product_attention
            return sdpa(q, k, v) + sdpa(q, k, v)

    model, inputs = TwiceAttention(), tuple(torch.randn(1, 2, 5, 4) for _ in range(3))
    result = run_pass("eliminate-common-subexpressions", capture(model, inputs))
    assert result.stats["merged"] == 1 and ops(result.graph_module)["aten.scaled_dot_product_attention"] == 1
    assert_matches(model, result.graph_module, *inputs)


def test_cse_leaves_written_and_random_values():
    model, x = ReadWriteRead().eval(), torch.randn(2, 6)
    gm = capture(model, (x,))
    result = run_pass("eliminate-common-subexpressions", gm)
    after = ops(result.graph_module)
    assert after["aten.sin"] == 2 and after["aten.rand_like"] == 2
    torch.manual_seed(0)
    assert_matches(model, result.graph_module, x)


# ----------------------------------------------------------------------------- remove-zero-branches


def _zero(module: nn.Module, bias: bool = True) -> nn.Module:
    with torch.no_grad():
        module.weight.zero_()
        if bias and module.bias is not None:
            module.bias.zero_()
    return module


class ZeroLinearBranch(nn.Module):
    def __init__(self, zero_bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = _zero(nn.Linear(8, 8), bias=zero_bias)

    def forward(self, x):
        return self.a(x) + torch.relu(self.b(x))


class ZeroConvInCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.live = nn.Conv2d(3, 4, 3, padding=1)
        self.dead = _zero(nn.Conv2d(3, 4, 3, padding=1))
        self.register_buffer("mask", torch.zeros(1, 8, 1, 1))

    def forward(self, x):
        y = torch.cat([self.live(x), self.dead(x).relu()], dim=1)
        return y, self.live(x) * self.mask[:, :4]


class ZeroResidual(nn.Module):
    """torchvision-style in-place residuals: ``out += identity`` around a zero branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.dead = _zero(nn.Conv2d(4, 4, 3, padding=1, bias=False))

    def forward(self, x):
        z = torch.relu_(self.dead(x))
        y = self.conv(x)
        y += z  # y + 0: y unchanged
        out = self.dead(y)
        out += y  # 0 + y: a fresh copy of y, written by relu_ below
        return torch.relu_(out)


def test_remove_zero_branches_drops_zero_linear_from_sum():
    model, x = ZeroLinearBranch().eval(), torch.randn(2, 8)
    gm = capture(model, (x,))
    result = run_pass("remove-zero-branches", gm)
    assert result.modified and result.stats["absorbed"] == 1
    after = ops(result.graph_module)
    assert after["aten.linear"] == 1 and after["aten.relu"] == 0 and after["aten.add"] == 0
    assert_matches(model, result.graph_module, x, tol=0.0)
    cleaned = EliminateDeadCodePass()(result.graph_module).graph_module
    assert not any(name.startswith("b.") for name in cleaned.state_dict())


def test_remove_zero_branches_replaces_zero_conv_and_zero_product():
    model, x = ZeroConvInCat().eval(), torch.randn(1, 3, 8, 8)
    gm = capture(model, (x,))
    result = run_pass("remove-zero-branches", gm)
    assert result.stats["zero_branches"] == 2
    after = ops(result.graph_module)
    assert after["aten.zeros"] == 2 and after["aten.relu"] == 0 and after["aten.mul"] == 0
    zeros = [n for n in result.graph_module.graph.nodes if n.target is aten.zeros.default]
    assert sorted(tuple(n.meta["val"].shape) for n in zeros) == [(1, 4, 8, 8), (1, 4, 8, 8)]
    assert all(n.meta["fxcompress_provenance"]["pass"] == "remove-zero-branches" for n in zeros)
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_remove_zero_branches_with_in_place_residuals():
    model, x = ZeroResidual().eval(), torch.randn(1, 4, 6, 6)
    gm = capture(model, (x,))
    result = run_pass("remove-zero-branches", gm)
    assert result.stats["absorbed"] == 2
    after = ops(result.graph_module)
    assert after["aten.conv2d"] == 1 and after["aten.add_"] == 0
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_remove_zero_branches_prunes_dead_attention():
    class ZeroHead(nn.Module):  # torchvision's ViT head is initialised to zeros like this
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)
            self.head = _zero(nn.Linear(4, 3))

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1))

    model, x = ZeroHead().eval(), torch.randn(2, 5, 4)
    result = run_pass("remove-zero-branches", capture(model, (x,)))
    # SDPA is tagged random by torch; without dropout it is pure and goes with the dead branch.
    assert set(ops(result.graph_module)) == {"aten.zeros", "call_module:_guards_fn"}
    assert_matches(model, result.graph_module, x, tol=0.0)


def test_remove_zero_branches_keeps_nonzero_branches():
    model, x = ZeroLinearBranch(zero_bias=False).eval(), torch.randn(2, 8)
    result = run_pass("remove-zero-branches", capture(model, (x,)))
    assert not result.modified and ops(result.graph_module)["aten.linear"] == 2
    product = run_pass("remove-zero-branches", capture(ZeroConvInCat().eval(), (torch.randn(1, 3, 8, 8),)),
                       multiply_by_zero=False)
    assert ops(product.graph_module)["aten.mul"] == 1


# --------------------------------------------------------------------------------------- pipeline


def test_default_preset_runs_dead_branch_passes_in_order():
    names = [s.name for s in resolve_recipe("default").steps]
    expected = ["remove-guards", "fold-constants", "simplify-algebra", "remove-no-ops",
                "remove-zero-branches", "eliminate-common-subexpressions", "eliminate-dead-code"]
    assert [n for n in names if n in expected] == expected
    model, x = ZeroLinearBranch().eval(), torch.randn(2, 8)
    gm = capture(model, (x,))
    out = resolve_recipe("default").build()(gm).graph_module
    assert set(ops(out)) == {"aten.linear"}
    assert_matches(model, out, x)
