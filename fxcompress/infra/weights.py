"""Weights held once: copies of a graph module that share its tensors, and copy-on-write for them.

A compile must hold the weights about once (docs/design.md, decision 11). The pass manager's rollback
snapshot is therefore a copy of the graph *structure* only: :func:`sharing_copy` copies modules,
graph and code but hands the new module the very same parameter and buffer tensors. That is
safe as long as nothing writes into a shared tensor in place; passes that change a weight make a
new tensor. For code that still writes in place (a user's pass doing ``p.data.mul_(2)``),
:class:`WriteGuard` copies a shared tensor's bytes just before the first in-place write into it
(copy-on-write, seen at the ATen level, so ``.data`` and views are caught too), so that the
snapshot, and the user's model the weights may come from, can be put back exactly.
"""

from __future__ import annotations

import copy
import ctypes
import gc
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from fxcompress.analysis.attributes import attribute, replace_attribute


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` (tied ones once per name), plus the plain tensor
    attributes a graph's ``get_attr`` nodes read."""
    tensors = [t for _, t in module.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in module.named_buffers(remove_duplicate=False)]
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "get_attr":
                try:
                    value = attribute(module, str(node.target))
                except AttributeError:
                    continue
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
    return tensors


def sharing_copy(module: nn.Module, tensors: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """A deep copy of ``module`` that shares ``tensors`` (default: all of :func:`module_tensors`)
    instead of copying them: new modules, graph and code, the same weight objects."""
    memo: dict[int, Any] = {id(t): t for t in (module_tensors(module) if tensors is None else tensors)}
    return copy.deepcopy(module, memo)


def storage_key(tensor: torch.Tensor) -> int | None:
    """An id of the memory ``tensor`` lives in (views and ``.data`` share it), or None (fake, meta)."""
    try:
        if tensor.device.type == "meta":
            return None
        key = tensor.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - fake and functional tensors have no real storage
        return None
    return key or None


def storage_keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {k for k in map(storage_key, tensors) if k is not None}


_WRITTEN_ARGUMENTS: dict[Any, tuple[tuple[int, str], ...]] = {}


def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments an ATen op writes into (``self`` of ``add_``, ``out``)."""
    found = _WRITTEN_ARGUMENTS.get(func)
    if found is None:
        schema = getattr(func, "_schema", None)
        found = tuple((i, a.name) for i, a in enumerate(schema.arguments if schema is not None else ())
                      if a.alias_info is not None and a.alias_info.is_write)
        _WRITTEN_ARGUMENTS[func] = found
    return found


class WriteGuard(TorchDispatchMode):
    """Copy-on-write for ``tensors`` while active: before the first in-place write into the
    memory of one of them, its bytes are saved; :meth:`restore` puts them back.

    Only ATen ops that write into an argument cost anything beyond the dispatch; code that is
    known to work on its own copies may run under :func:`unguarded`.
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._storages: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            key = storage_key(t)
            if key is not None:
                self._storages.setdefault(key, t.untyped_storage())
        #: storage key -> the bytes it held before the first in-place write
        self.saved: dict[int, torch.UntypedStorage] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = _written_arguments(func)
        if written:
            for position, name in written:
                value = args[position] if position < len(args) else kwargs.get(name)
                for tensor in (value if isinstance(value, (list, tuple)) else (value,)):
                    if isinstance(tensor, torch.Tensor):
                        key = storage_key(tensor)
                        if key in self._storages and key not in self.saved:
                            self.saved[key] = self._storages[key].clone()
        return func(*args, **kwargs)

    @property
    def written(self) -> bool:
        """Whether anything wrote into a guarded tensor."""
        return bool(self.saved)

    def restore(self) -> None:
        """Put back the bytes of every guarded tensor written to (the guard must be inactive)."""
        for key, saved in self.saved.items():
            self._storages[key].copy_(saved)
        self.saved.clear()

    def keep_writes(self, module: nn.Module) -> None:
        """Give ``module`` its own copies (with the written values) of the guarded tensors written
        to, then restore the originals, which others (a snapshot, the user's model) still hold."""
        _copy_attributes(module, set(self.saved))
        self.restore()


class unguarded:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Run code that only writes into its own new tensors (GPTQ's column loop) without a
    :class:`WriteGuard`'s per-op dispatch cost."""

    def __enter__(self) -> None:
        self._context = _disable_current_modes()
        self._context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


def own_tensors(module: nn.Module, foreign: Iterable[torch.Tensor]) -> int:
    """Give ``module`` copies of its tensors that live in the memory of ``foreign`` ones (the
    user's parameters a compile shared), ties kept; returns the bytes copied."""
    return _copy_attributes(module, storage_keys(foreign))


class SharedWeights:
    """The user's tensors a compiled module still shares with the model it was compiled from.

    A compile's result keeps the weights no pass changed in the user's own tensors until it is used
    as a module (docs/cost.md): exporting then needs no second copy of them. :meth:`own` gives the
    module copies of its own (what ``result.module`` does on first access, before anyone can train
    it); :meth:`check` says whether the user's tensors still hold what was compiled. It compares the
    tensors' version counters (bumped by in-place ops: optimizer steps, ``load_state_dict``) and a
    float64 sum of each (writes through ``.data`` do not bump the counter).
    """

    def __init__(self, module: nn.Module, foreign: Iterable[torch.Tensor]) -> None:
        used = storage_keys(module_tensors(module))
        self.module: nn.Module | None = module
        self.tensors = list({id(t): t for t in foreign if storage_key(t) in used}.values())
        self._fingerprints = [self._fingerprint(t) for t in self.tensors]

    @staticmethod
    def _fingerprint(tensor: torch.Tensor) -> tuple[int, float]:
        with torch.no_grad():
            total = float(tensor.detach().sum(dtype=torch.float64)) if tensor.is_floating_point() else float(
                tensor.detach().sum())
        return tensor._version, total

    @property
    def nbytes(self) -> int:
        """Bytes still shared (0 once owned)."""
        return sum(t.nelement() * t.element_size() for t in self.tensors)

    def changed(self) -> list[int]:
        """Indices of the shared tensors whose contents changed since the compile."""
        changed = []
        for index, (tensor, (version, total)) in enumerate(zip(self.tensors, self._fingerprints)):
            now_version, now_total = self._fingerprint(tensor)
            same_total = now_total == total or (now_total != now_total and total != total)  # NaN == NaN here
            if now_version != version or not same_total:
                changed.append(index)
        return changed

    def own(self) -> int:
        """Give the module its own copies of the shared tensors (once); the bytes copied."""
        if self.module is None:
            return 0
        copied = own_tensors(self.module, self.tensors)
        self.module, self.tensors, self._fingerprints = None, [], []
        return copied


def _copy_attributes(module: nn.Module, keys: set[int]) -> int:
    """Replace every tensor attribute of ``module`` living in a storage of ``keys`` by a copy (one
    copy per tensor object, so tied attributes stay tied); the bytes copied."""
    if not keys:
        return 0
    clones: dict[int, torch.Tensor] = {}
    targets = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    targets += [name for name, _ in module.named_buffers(remove_duplicate=False)]
    if isinstance(module, fx.GraphModule):
        targets += [str(n.target) for n in module.graph.nodes if n.op == "get_attr"]
    copied = 0
    for target in dict.fromkeys(targets):
        try:
            value = attribute(module, target)
        except AttributeError:
            continue
        if isinstance(value, torch.Tensor) and storage_key(value) in keys:
            if id(value) not in clones:
                clones[id(value)] = value.detach().clone()
                copied += value.nelement() * value.element_size()
            replace_attribute(module, target, clones[id(value)])
    return copied


def release(module: nn.Module | None) -> None:
    """Drop ``module``'s references to its tensors (a discarded snapshot), so that the tensors no
    one else holds are freed now rather than by the cyclic collector (GraphModules hold cycles)."""
    if module is None:
        return
    for sub in module.modules():
        sub._parameters.clear()
        sub._buffers.clear()
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor):
                delattr(sub, name)


def collect() -> int:
    """Run the cyclic collector, so that what discarded graph modules leave is freed before the
    next stage, and hand the freed heap back to the system (glibc keeps it otherwise)."""
    found = gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by the process all the same
        pass
    return found


__all__ = ["SharedWeights", "WriteGuard", "collect", "module_tensors", "own_tensors", "release", "sharing_copy", "storage_key", "storage_keys", "unguarded"]
