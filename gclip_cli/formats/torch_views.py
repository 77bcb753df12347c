"""The geometry of a torch tensor's view of its storage (offset, shape, strides, in items):
which items it covers, whether they lie without gaps, and the pieces to read a view with gaps
in, a bounded window of the storage at a time.

Values are visited in storage order (the dimensions sorted by stride, largest outermost): the
order torch keeps them in, whatever order the view's shape gives them.  A norm's exact sum and
an element-wise product do not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .torch_pickle import TensorView


@dataclass(frozen=True)
class Piece:
    """Some items of a view: *shape* and *stride* from item *offset* of the storage, spanning
    *extent* items of it."""

    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def extent(self) -> int:
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))


def storage_order(view: TensorView) -> Piece:
    """The view with its dimensions of more than one item sorted by stride, largest first."""
    dims = sorted(((s, n) for n, s in zip(view.shape, view.stride, strict=True) if n != 1))
    dims.reverse()
    return Piece(view.offset, tuple(n for _, n in dims), tuple(s for s, _ in dims))


def storage_axes(view: TensorView) -> tuple[int, ...] | None:
    """The view's dimensions in the order its items lie in the storage, outermost first, as
    storage_order() sorts them (those of one item first: they never move); None when that is C
    order."""
    ones = [k for k, n in enumerate(view.shape) if n == 1]
    moving = sorted(
        ((s, n, k) for k, (n, s) in enumerate(zip(view.shape, view.stride, strict=True)) if n != 1),
        reverse=True,
    )
    order = [k for _, _, k in moving]
    return None if order == sorted(order) else (*ones, *order)


def item_range(view: TensorView) -> tuple[int, int]:
    """The items [first, end) of the storage the view spans (end == first when empty)."""
    if not view.numel:
        return view.offset, view.offset
    return view.offset, view.offset + storage_order(view).extent


def is_dense(view: TensorView) -> bool:
    """Whether the view's items are a contiguous run of its storage, in some order of its
    dimensions (C order, transposed, permuted): no gaps, no item twice."""
    expected = 1
    piece = storage_order(view)
    for extent, stride in zip(reversed(piece.shape), reversed(piece.stride), strict=True):
        if stride != expected:
            return False
        expected *= extent
    return True


def covers_items_once(view: TensorView) -> bool:
    """Whether no item of the storage appears twice in the view (a broadcast view, stride 0,
    or one whose rows overlap, would): each stride, from the smallest, must step past all the
    items the smaller dimensions span.  (A sufficient test: slices of any kind pass it.)"""
    piece = storage_order(view)
    spanned = 1  # items spanned by the dimensions inside this one
    for extent, stride in zip(reversed(piece.shape), reversed(piece.stride), strict=True):
        if stride < spanned:
            return False
        spanned += (extent - 1) * stride
    return True


def pieces(view: TensorView, max_items: int) -> Iterator[Piece]:
    """The view in storage order as pieces each spanning at most *max_items* items of the
    storage (or one item: a view may step further than that between items)."""
    return _split(storage_order(view), max(1, max_items))


def _split(piece: Piece, max_items: int) -> Iterator[Piece]:
    if piece.extent <= max_items or not piece.shape:
        yield piece
        return
    count, step = piece.shape[0], piece.stride[0]
    inner = Piece(piece.offset, piece.shape[1:], piece.stride[1:])
    if inner.extent > max_items:
        for index in range(count):
            yield from _split(
                Piece(inner.offset + index * step, inner.shape, inner.stride), max_items
            )
        return
    per = max(1, (max_items - inner.extent) // step + 1)  # outer indexes a piece takes
    for first in range(0, count, per):
        taken = min(per, count - first)
        yield Piece(piece.offset + first * step, (taken, *inner.shape), piece.stride)
