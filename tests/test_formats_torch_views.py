"""The geometry of torch views, against every item listed one by one."""

from __future__ import annotations

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from gclip_cli.formats.torch_pickle import Storage, TensorView
from gclip_cli.formats.torch_views import covers_items_once, is_dense, item_range, pieces


def items(offset, shape, stride) -> list[int]:
    """The storage item of every element, in C order of the shape."""
    return [
        offset + sum(i * s for i, s in zip(index, stride, strict=True))
        for index in itertools.product(*(range(n) for n in shape))
    ]


views = st.integers(0, 3).flatmap(
    lambda dims: st.tuples(
        st.integers(0, 5),
        st.lists(st.integers(0, 4), min_size=dims, max_size=dims),
        st.lists(st.integers(0, 13), min_size=dims, max_size=dims),
    )
)


def view_of(offset, shape, stride) -> TensorView:
    return TensorView(
        Storage("0", "float32", 10**6), "float32", offset, tuple(shape), tuple(stride)
    )


@given(views, st.integers(1, 40))
def test_pieces_visit_every_item_once_within_their_window(described, max_items):
    offset, shape, stride = described
    view = view_of(offset, shape, stride)
    listed = items(offset, shape, stride)
    assert covers_items_once(view) <= (len(set(listed)) == len(listed))  # a sufficient test
    if math.prod(shape) == 0:
        assert item_range(view) == (offset, offset)
        return
    first, end = item_range(view)
    assert (first, end) == (min(listed), max(listed) + 1)
    assert is_dense(view) == (sorted(listed) == list(range(first, end)))
    if not covers_items_once(view):
        return
    visited = []
    for piece in pieces(view, max_items):
        got = items(piece.offset, piece.shape, piece.stride)
        assert piece.extent <= max_items or len(got) == 1
        assert max(got) - piece.offset + 1 <= piece.extent
        visited += got
    assert sorted(visited) == sorted(listed)  # each item once
    assert visited == sorted(visited)  # in storage order


def test_slices_pass_and_broadcasts_do_not():
    assert covers_items_once(view_of(3, (70, 3), (9, 1)))  # matrix[:, 3:6]
    assert not covers_items_once(view_of(0, (4, 2), (0, 1)))  # expand
    assert not covers_items_once(view_of(0, (2, 3), (1, 1)))  # overlapping windows
    assert is_dense(view_of(0, (3, 5), (1, 3)))  # transposed
    assert not is_dense(view_of(0, (3,), (2,)))
