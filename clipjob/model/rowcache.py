"""The frozen towers' cache (MiniLM text, EfficientNet-Lite trunk): a frozen network maps an input to the same row
of features every time, so each distinct input of a batch is computed once and remembered."""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch


def cached_rows(cache: dict, keys: list[Hashable], limit: int, compute: Callable[[list[int]], torch.Tensor],
                chunk: int, order: Callable[[int], Any] | None = None) -> torch.Tensor:
    """The rows of a batch whose inputs have these `keys`, from `cache`, computing the missing ones:
    `compute(indices)` gives the rows of those batch positions; each distinct key is computed once, `chunk` at a time,
    in `order` (of batch positions) where given. The cache is emptied first when the new keys would take it past
    `limit` entries. Each row is kept as a float32 copy of its own (not a view that keeps its chunk's tensor), on the
    device `compute` gave it on."""
    first = {k: i for i, k in enumerate(keys)}
    todo = [i for k, i in first.items() if k not in cache]
    if len(cache) + len(todo) > limit:
        cache.clear()
        todo = list(first.values())
    if order is not None:
        todo.sort(key=order)
    for c in range(0, len(todo), chunk):
        part = todo[c:c + chunk]
        for i, row in zip(part, compute(part).float()):
            cache[keys[i]] = row.clone()
    return torch.stack([cache[k] for k in keys])
