"""Rollback snapshots share the weights instead of copying them, and stay exact when a pass
writes into a shared weight in place (copy-on-write): fxcompress/infra/weights.py."""

from __future__ import annotations

import torch
from torch import fx

from fxcompress.analysis.attributes import replace_attribute
from fxcompress.capture import capture
from fxcompress.infra import Pass, PassManager, PassResult, RollbackPass
from fxcompress.infra.instrument import Instrument
from fxcompress.infra.weights import WriteGuard, module_tensors, sharing_copy
from tests.models import ConvBnRelu

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _gm() -> fx.GraphModule:
    torch.manual_seed(0)
    return capture(ConvBnRelu().eval(), (X,))


def _weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in gm.state_dict().items()}


class ReplaceWeights(Pass):
    """Changes every parameter the allowed way: a new tensor in place of the old one."""

    name = "test-replace-weights"
    lossless = False

    def call(self, gm):
        for name, p in list(gm.named_parameters()):
            replace_attribute(gm, name, p.detach() * 3.0)
        return PassResult(gm, True)


class WriteInPlace(Pass):
    """Writes into the shared parameters in place, through ``.data`` (no version counter sees that)."""

    name = "test-write-in-place"
    lossless = False

    def call(self, gm):
        for p in gm.parameters():
            p.data.mul_(3.0)
        return PassResult(gm, True)


class RejectAll(Instrument):
    def after_pass(self, pass_, graph_module, result, record):
        raise RollbackPass("rejected by the test")


def test_sharing_copy_shares_every_tensor_and_copies_the_graph():
    gm = _gm()
    copied = sharing_copy(gm)
    assert copied is not gm and copied.graph is not gm.graph
    assert all(a is b for a, b in zip(module_tensors(copied), module_tensors(gm)))


def test_rolled_back_pass_that_replaced_weights_leaves_the_originals_intact():
    gm = _gm()
    before, objects = _weights(gm), list(gm.parameters())
    out = PassManager([ReplaceWeights()], instruments=[RejectAll()])(gm).graph_module
    assert all(torch.equal(t, before[n]) for n, t in out.state_dict().items())
    # the snapshot handed back holds the very same tensors: nothing was copied for the rollback
    assert all(a is b for a, b in zip(out.parameters(), objects))


def test_rolled_back_pass_that_wrote_in_place_is_undone_exactly():
    gm = _gm()
    before = _weights(gm)
    out = PassManager([WriteInPlace()], instruments=[RejectAll()])(gm).graph_module
    assert all(torch.equal(t, before[n]) for n, t in out.state_dict().items())


def test_kept_in_place_writes_go_to_copies_and_others_holding_the_weights_see_no_change():
    gm = _gm()
    before = _weights(gm)
    held = dict(gm.named_parameters())  # e.g. the user's model, whose tensors a compile shares
    out = PassManager([WriteInPlace()])(gm).graph_module
    for name, p in out.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * 3.0)
        assert torch.equal(held[name].detach(), before[name])


def test_write_guard_sees_views_and_out_arguments():
    weight = torch.ones(4, 4)
    guard = WriteGuard([weight])
    with guard:
        weight[1:3].fill_(5.0)                 # a view of the guarded storage
        torch.add(weight, 1.0, out=weight)     # an out= argument
    assert guard.written
    guard.restore()
    assert torch.equal(weight, torch.ones(4, 4))


def test_compile_shares_no_tensor_with_the_users_model_so_fine_tuning_the_result_leaves_it_alone():
    import fxcompress
    from fxcompress.infra.weights import storage_keys

    torch.manual_seed(0)
    model = ConvBnRelu().eval()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    result = fxcompress.compile(model, (X,), ["remove-no-ops"])  # leaves every weight as it is
    assert not storage_keys(model.parameters()) & storage_keys(result.module.parameters())
    module = result.module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(X).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
