"""Calibration: the data a compile's data-driven passes read, normalised once.

``compile(..., calibration=...)`` takes what users have: a list, a DataLoader, any re-iterable
(:class:`fxcompress.data.Batches` among them), a zero-argument callable returning an iterator,
or a one-shot iterator (a generator), each item in the example inputs' form (a tensor, a tuple
of positional tensors, a dict of keyword tensors, ...). :class:`Calibration` is built from it
once, by compile, and is what passes get from the compile context and export parity reads:

    batches = calibration.take(graph_module, "quantize-int8", limit=256)   # checked flat tuples

It streams the data anew on every read (nothing is copied; a one-shot iterator is replayed from
what was read of it), gives every batch as the flat tensor tuple the graph takes, and checks each
against the example inputs with one error per problem.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import fx

from fxcompress.errors import InputError
from fxcompress.inputs import ModelCall, describe_inputs, model_call


class Calibration:
    """The calibration data of one compile, as the flat input tuples its graph takes.

    Args:
        data: what the user passed as ``calibration=`` (see the module docstring), another
            Calibration (its data is shared: a one-shot iterator is read once for both), or None.
        example: the example inputs, in any input form: batches are flattened like them and
            checked against their flat tensors. A :class:`~fxcompress.inputs.ModelCall` is used as
            it is.

    Iterating gives a fresh pass over the batches, each flattened like the example (unchecked);
    :meth:`take` gives the checked batches a pass runs on. ``bool(calibration)`` says whether
    data was given.

    Raises:
        InputError: ``data`` is one tensor, or something that is neither iterable nor callable.
    """

    def __init__(self, data: Any = None, example: Any = ()) -> None:
        self._items: Callable[[], Iterator[Any]] | None = data._items if isinstance(data, Calibration) else _item_source(data)
        call = example if isinstance(example, ModelCall) or example is None else (
            model_call(None, example) if _given(example) else None)
        self._call = call

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """The flat example tensors batches are checked against (empty without an example)."""
        return self._call.flat if self._call is not None else ()

    def __bool__(self) -> bool:
        return self._items is not None

    def items(self) -> Iterator[Any]:
        """A fresh pass over the items as the user gave them (empty without data)."""
        return self._items() if self._items is not None else iter(())

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """A fresh pass over the batches, each flattened like the example inputs (not yet checked)."""
        for index, item in enumerate(self.items()):
            yield self._flat(item, index)

    def map(self, function: Callable[[int, Any], Any], example: Any = ()) -> "Calibration":
        """The same data with ``function(index, item)`` applied to each item as it is read: what a
        wrapper model needs (compile_decoder turns prompts into prefill-step inputs). The data is
        read once however many compiles read the result."""
        source = self._items
        mapped = Calibration(None, example)
        if source is not None:
            mapped._items = lambda: (function(i, item) for i, item in enumerate(source()))
        return mapped

    def take(self, graph_module: fx.GraphModule | None, reader: str, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
        """The checked batches a data-driven pass runs on: at most ``limit``, as a list.

        Each batch must match the example inputs in count, dtypes and shapes, except along the
        dimensions ``graph_module`` keeps symbolic (a decoder's sequence and past lengths); a batch
        whose leading dimension is a multiple of the example's is split into example-sized chunks
        (a captured graph may have its batch size baked in). Calibration sets are small by nature
        (tens to hundreds of inputs), so holding them lets a pass read them several times.

        Raises:
            InputError: no data was given (or it was empty), naming ``reader`` (the pass); a batch
                that does not fit, or that holds NaN or Inf, naming the batch.
        """
        symbolic = symbolic_dims(graph_module) if graph_module is not None else ()
        out: list[tuple[torch.Tensor, ...]] = []
        for index, batch in enumerate(self):
            out.extend(_checked(batch, index, self.example_inputs, f"{reader}'s calibration", symbolic))
            if limit is not None and len(out) >= limit:
                del out[limit:]
                break
        if not out:
            raise InputError(
                f"Pass '{reader}' needs calibration data, but none was given (or the iterable was empty).",
                "pass calibration=[(input,), ...] to fxcompress.compile (16 to 512 representative inputs), "
                "or --calibration random:16 / a .pt file on the command line.",
            )
        return out

    def fitting(self, free_dims: Iterable[int], count: int) -> list[tuple[torch.Tensor, ...]]:
        """The first ``count`` batches shaped like the example inputs apart from ``free_dims`` (the
        axes an exported file leaves symbolic): what export parity runs besides the example. Batches
        that do not fit are passed over, not refused (the passes already checked them)."""
        free = set(free_dims)
        example = self.example_inputs
        chosen: list[tuple[torch.Tensor, ...]] = []
        for batch in self:
            if len(batch) != len(example) or any(
                    not isinstance(a, torch.Tensor) or a.dim() != b.dim() or a.dtype != b.dtype
                    or any(x != y for d, (x, y) in enumerate(zip(a.shape, b.shape)) if d not in free)
                    for a, b in zip(batch, example)):
                continue
            chosen.append(batch)
            if len(chosen) == count:
                break
        return chosen

    def __repr__(self) -> str:
        return f"Calibration({'data' if self else 'none'}, example {describe_inputs(self.example_inputs)})"

    def _flat(self, item: Any, index: int) -> tuple[Any, ...]:
        if self._call is not None and self._call.structured:
            return self._call.flatten(item, f"calibration batch {index}")
        # Plain inputs: a tensor or a sequence of them; what else is there is named by the check.
        return tuple(item) if isinstance(item, (list, tuple)) else (item,)


def _given(example: Any) -> bool:
    return isinstance(example, torch.Tensor) or bool(example)


def _item_source(data: Any) -> Callable[[], Iterator[Any]] | None:
    """A factory of fresh iterators over what users pass as ``calibration=``.

    Lists, tuples, DataLoaders and other re-iterable objects are streamed anew on every pass, never
    copied; a zero-argument callable is called for each pass; a one-shot iterator (a generator) can
    only be read once, so the items read from it are kept and replayed (passes read a bounded
    prefix, so a long generator is never drained into memory).
    """
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        raise InputError(
            f"calibration is one tensor of shape {list(data.shape)}, not a collection of input tuples.",
            "pass a list of input tuples, e.g. [(batch,) for batch in tensor.split(example_batch_size)], or a DataLoader.",
        )
    if not callable(data) and not isinstance(data, Iterable):
        raise InputError(
            f"calibration must be a list, a DataLoader, another iterable or a callable, got {type(data).__name__}.",
            "pass calibration=[(input,), ...] with tensors shaped like the example inputs.",
        )
    if callable(data) and not hasattr(data, "__iter__"):
        return lambda: iter(data())
    # isinstance, not ``iter(x) is x``: calling iter() on a DataLoader would start its workers.
    if isinstance(data, Iterator):  # a one-shot iterator: cache what has been read of it
        cache: list[Any] = []

        def replay() -> Iterator[Any]:
            # Every pass starts from the first item, even when an earlier pass stopped early
            # (passes read at most their batch limit), and reads the source only past the cache.
            index = 0
            while True:
                if index == len(cache):
                    try:
                        cache.append(next(data))
                    except StopIteration:
                        return
                yield cache[index]
                index += 1

        return replay
    return lambda: iter(data)


def symbolic_dims(graph_module: fx.GraphModule) -> tuple[frozenset[int], ...]:
    """Per graph input, the dimensions captured as symbolic (a decoder's batch, sequence and past
    lengths; a symbolic batch or sequence): calibration batches may differ from the example there."""
    dims = []
    for node in graph_module.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        shape = getattr(value, "shape", ())
        dims.append(frozenset(i for i, size in enumerate(shape) if not isinstance(size, int)))
    return tuple(dims)


def _checked(batch: tuple[Any, ...], index: int, example: Sequence[torch.Tensor], what: str,
             symbolic: Sequence[frozenset[int]]) -> list[tuple[torch.Tensor, ...]]:
    """``batch`` as example-shaped chunks, or an InputError saying how it differs."""
    expected = describe_inputs(example)
    if len(batch) != len(example) or not all(isinstance(t, torch.Tensor) for t in batch):
        raise InputError(
            f"Calibration batch {index} is {describe_inputs(batch)} but the model was captured with {expected}.",
            f"give {what} input tuples with one tensor per model input, shaped like the example inputs.",
        )
    chunks = [batch] if _fits_symbolic(batch, example, symbolic) else _split_like(batch, example)
    if chunks is None:
        raise InputError(
            f"Calibration batch {index} is {describe_inputs(batch)} but the model was captured with {expected}; "
            "shapes and dtypes must match (the batch dimension may be a multiple of the example's).",
            "shape the calibration data like the example inputs, e.g. the same preprocessing and batch size.",
        )
    for t in batch:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(
                f"Calibration batch {index} contains NaN or Inf values.",
                "clean the calibration data (ranges computed from NaN/Inf would make every scale useless).",
            )
    return chunks


def _fits_symbolic(batch: tuple[torch.Tensor, ...], example: Sequence[torch.Tensor],
                   symbolic: Sequence[frozenset[int]]) -> bool:
    if len(symbolic) != len(example) or not any(symbolic):
        return False
    return all(t.dtype == e.dtype and t.dim() == e.dim()
               and all(a == b or i in dims for i, (a, b) in enumerate(zip(t.shape, e.shape)))
               for t, e, dims in zip(batch, example, symbolic))


def _split_like(batch: tuple[torch.Tensor, ...], example: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]] | None:
    if all(t.dtype == e.dtype and t.shape == e.shape for t, e in zip(batch, example)):
        return [batch]
    if any(t.dtype != e.dtype or t.dim() != e.dim() or t.dim() == 0 or t.shape[1:] != e.shape[1:]
           for t, e in zip(batch, example)):
        return None
    sizes = {t.shape[0] for t in batch}
    step = example[0].shape[0]
    if len(sizes) != 1 or any(e.shape[0] != step for e in example) or step == 0 or next(iter(sizes)) % step:
        return None
    total = next(iter(sizes))
    return [tuple(t[i:i + step] for t in batch) for i in range(0, total, step)]


__all__ = ["Calibration", "symbolic_dims"]
