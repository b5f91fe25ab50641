"""One intra-op thread for the fuzz tests.

The generated models are tiny, so threads buy nothing, and on a loaded 2-core machine torch's
OpenMP workers spin against each other: a 4x4x4 conv measured 50 ms with 2 threads and 0.06 ms
with 1 while other jobs ran. The previous setting is restored after each test.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
