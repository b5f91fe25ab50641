"""Compiling from several threads of one process (a service) works: tracing is serialized.

torch.export keeps process-wide tracing state; without fxcompress.capture.TRACING_LOCK three
concurrent compiles failed with "Trying to pop empty mode stack" / fake tensors in constants.
"""

from __future__ import annotations

import threading

import torch

import fxcompress
from fxcompress.capture import TRACING_LOCK
from tests.models import ConvBnRelu, Residual, randomize_bn


def test_three_threads_compile_and_export_at_once(tmp_path):
    torch.manual_seed(0)
    models = [randomize_bn(ConvBnRelu().eval()), randomize_bn(Residual().eval()), randomize_bn(ConvBnRelu(16).eval())]
    inputs = [(torch.randn(1, 3, 16, 16),), (torch.randn(1, 3, 16, 16),), (torch.randn(1, 3, 16, 16),)]
    errors: list[BaseException] = []
    results: dict[int, object] = {}
    start = threading.Barrier(len(models))

    def work(i: int) -> None:
        try:
            start.wait()
            result = fxcompress.compile(models[i], inputs[i], "default")
            result.export_onnx(tmp_path / f"m{i}.onnx")
            results[i] = result
        except BaseException as exc:  # collected and asserted below, with the message
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
    for i, result in results.items():
        with torch.no_grad():
            torch.testing.assert_close(result.module(*inputs[i]), models[i](*inputs[i]), rtol=1e-4, atol=1e-5)
        assert (tmp_path / f"m{i}.onnx").stat().st_size > 0
    assert len(results) == 3


def test_the_tracing_lock_is_reentrant_and_released():
    with TRACING_LOCK:  # compile inside a held lock must not deadlock (it re-acquires)
        fxcompress.compile(ConvBnRelu().eval(), (torch.randn(1, 3, 8, 8),), "default")
    assert TRACING_LOCK.acquire(blocking=False)
    TRACING_LOCK.release()
