"""Trial functions and model factories that misbehave on purpose, for the executor and sweep tests.

They are module-level (``tests.sweeps.trial_functions:NAME``) so a spawned process or a Ray worker
can import them by name.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from tests.models import conv_bn_relu

HUNGRY_BYTES = 64 << 30  # far past any cap the tests set, and past this machine's memory


def echo(value) -> dict:
    """A trial that succeeds: its value, and when and where it ran."""
    return {"status": "ok", "value": value, "pid": os.getpid()}


def timed(seconds: float) -> dict:
    """A trial that holds its slot for ``seconds`` and reports when it started and ended."""
    start = time.time()
    time.sleep(seconds)
    return {"status": "ok", "start": start, "end": time.time(), "pid": os.getpid()}


def raising() -> dict:
    raise ValueError("this trial raises on purpose")


def segfault() -> dict:
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)
    return {"status": "ok"}


def hungry() -> dict:
    """Allocate (and touch) far more than the cap allows."""
    return {"status": "ok", "sum": float(torch.ones(HUNGRY_BYTES // 4).sum())}


def forever() -> dict:
    time.sleep(3600)
    return {"status": "ok"}


def crashing_model():
    """A model spec whose factory kills its own process (as a native crash in a model would)."""
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)
    return conv_bn_relu()


def hungry_model():
    """A model spec that exhausts memory while being built."""
    hungry()
    return conv_bn_relu()
