"""CompileContext: what a compile run knows besides the graph (inputs, calibration data).

Passes that need data (calibration for quantization, sensitivity analysis) read it from the
context the manager hands them through :meth:`Pass.bind`; all other passes ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch


@dataclass
class CompileContext:
    """Inputs and data shared by the passes of one compile run.

    Attributes:
        example_inputs: the tuple of tensors the model was captured with.
        calibration: a callable returning a fresh iterator over input tuples (so a pass may
            stream the data several times without holding it in memory), or None.
        reference_outputs: the original model's outputs on ``example_inputs``.
        progress: whether passes may show progress bars.
    """

    example_inputs: tuple[torch.Tensor, ...]
    calibration: Callable[[], Iterator[tuple[torch.Tensor, ...]]] | None = None
    reference_outputs: Any = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def calibration_batches(self) -> Iterable[tuple[torch.Tensor, ...]]:
        """A fresh pass over the calibration data (empty if none was given)."""
        return self.calibration() if self.calibration is not None else iter(())


def calibration_source(calibration: Any) -> Callable[[], Iterator[Any]] | None:
    """Turn what users pass as ``calibration=`` into a factory of fresh iterators.

    Lists, tuples, DataLoaders and other re-iterable objects are streamed anew on every pass,
    never copied; a zero-argument callable is called for each pass; a one-shot iterator
    (a generator) can only be read once, so it is read on first use and cached.
    """
    if calibration is None:
        return None
    if callable(calibration) and not hasattr(calibration, "__iter__"):
        return lambda: iter(calibration())
    if iter(calibration) is calibration:  # a one-shot iterator: cache what it yields
        cache: list[Any] = []
        state = {"consumed": False}

        def replay() -> Iterator[Any]:
            if not state["consumed"]:
                for item in calibration:
                    cache.append(item)
                    yield item
                state["consumed"] = True
            else:
                yield from cache

        return replay
    return lambda: iter(calibration)
