"""CompileContext: what a compile run knows besides the graph (inputs, calibration data).

Passes that need data (calibration for quantization, sensitivity analysis) read it from the
context the manager hands them through :meth:`Pass.bind`; all other passes ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from fxcompress.errors import InputError


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
    (a generator) can only be read once, so the items read from it are kept and replayed (passes
    read a bounded prefix, so a long generator is never drained into memory). Anything else (a
    single tensor, a number) is an InputError.
    """
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        raise InputError(
            f"calibration is one tensor of shape {list(calibration.shape)}, not a collection of input tuples.",
            "pass a list of input tuples, e.g. [(batch,) for batch in tensor.split(example_batch_size)], or a DataLoader.",
        )
    if not callable(calibration) and not isinstance(calibration, Iterable):
        raise InputError(
            f"calibration must be a list, a DataLoader, another iterable or a callable, got {type(calibration).__name__}.",
            "pass calibration=[(input,), ...] with tensors shaped like the example inputs.",
        )
    if callable(calibration) and not hasattr(calibration, "__iter__"):
        return lambda: iter(calibration())
    # isinstance, not ``iter(x) is x``: calling iter() on a DataLoader would start its workers.
    if isinstance(calibration, Iterator):  # a one-shot iterator: cache what has been read of it
        cache: list[Any] = []

        def replay() -> Iterator[Any]:
            # Every pass starts from the first item, even when an earlier pass stopped early
            # (passes read at most their batch limit), and reads the source only past the cache.
            index = 0
            while True:
                if index == len(cache):
                    try:
                        cache.append(next(calibration))
                    except StopIteration:
                        return
                yield cache[index]
                index += 1

        return replay
    return lambda: iter(calibration)
