"""The page allocator: pages as needed, all-or-nothing growth, freed pages reused, block-table rows."""

from __future__ import annotations

import numpy as np
import pytest

from r1c.inference.pages import OutOfPages, PageAllocator


def test_grow_free_and_reuse():
    a = PageAllocator(5, 4)
    a.reserve(1, 5)  # 2 pages
    a.reserve(2, 4)  # 1 page
    a.reserve(1, 8)  # still 2 pages
    assert a.pages(1) == [0, 1] and a.pages(2) == [2] and a.free_pages == 2
    with pytest.raises(OutOfPages):
        a.reserve(2, 13)  # needs 3 more: nothing is taken
    assert a.pages(2) == [2] and a.free_pages == 2
    a.free(1)
    a.reserve(2, 13)
    assert sorted(a.pages(2)) == [0, 1, 2, 3] and a.pages(2)[0] == 2 and a.free_pages == 1
    table = a.block_table([2, 7], 5)
    np.testing.assert_array_equal(table, [a.pages(2) + [-1], [-1] * 5])
    assert table.dtype == np.int32
    with pytest.raises(ValueError, match="past the block table"):
        a.block_table([2], 3)


def test_no_page_is_shared():
    rng = np.random.default_rng(0)
    a = PageAllocator(16, 2)
    for _ in range(300):
        owner = int(rng.integers(6))
        if rng.random() < 0.3:
            a.free(owner)
        else:
            try:
                a.reserve(owner, int(rng.integers(1, 12)))
            except OutOfPages:
                pass
        held = [p for o in range(6) for p in a.pages(o)]
        assert len(held) == len(set(held)) and len(held) + a.free_pages == 16
