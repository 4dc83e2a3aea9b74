"""Count the bytes of the tensors a piece of code creates and keeps alive, and their peak.

``with LiveTensorBytes(exclude=model.parameters()) as counter: ...`` then ``counter.peak``: the largest
number of bytes held at once, over the storages of the plain (non-meta) tensors that torch ops created
while the counter was active. A storage counts from the first op that returns a tensor on it until the
last such tensor object is gone; storages of the ``exclude`` tensors (a model's weights, which exist
before) do not count while those tensors are alive (their views, e.g. ``weight.detach()``, neither).
Work space inside a kernel (LAPACK's, a communication library's copies) is not a tensor and is not seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """A dispatch mode that tracks the live bytes of the tensors created under it (see the module).

    It follows storages, not tensor objects: torch keeps one Python object per live storage, so a
    storage stops counting when its memory is freed, whatever tensors (views, ``nn.Parameter`` wrappers)
    held it.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # storage address -> bytes
        self._excluded: set[int] = set()
        for tensor in exclude:
            if type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                self._excluded.add(storage.data_ptr())
                weakref.finalize(storage, self._excluded.discard, storage.data_ptr())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if type(leaf) is torch.Tensor and leaf.device.type != "meta":
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if not size or key in self._excluded or key in self._live:
            return
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key)
