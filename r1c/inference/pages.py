"""The page allocator of a paged KV pool: a free list of page ids and each request's pages in position order.

A request holds ceil(cached tokens / page_size) pages and grows one page at a time as it reaches a page boundary,
so memory follows what is cached, not the longest length a request may reach. Block-table rows list a request's
pages and fill the rest with -1 (never read: a step only reaches the pages under its row's positions).
"""

from __future__ import annotations

import numpy as np


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than a request needs; the scheduler queues or preempts, never crashes."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a pool needs at least one page of one token, got {num_pages} x {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        # Low ids first (pop() takes from the end): allocation order is deterministic, which keeps runs reproducible.
        self._free = list(range(num_pages - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def pages(self, owner: int) -> list[int]:
        return self._pages.get(owner, [])

    def missing(self, owner: int, tokens: int) -> int:
        """How many more pages `owner` needs to hold `tokens` cached tokens."""
        return max(0, self.pages_for(tokens) - len(self.pages(owner)))

    def reserve(self, owner: int, tokens: int) -> None:
        """Grow owner's pages to hold `tokens` tokens; all or nothing (OutOfPages leaves everything as it was)."""
        need = self.missing(owner, tokens)
        if need > len(self._free):
            raise OutOfPages(f"request {owner} needs {need} more page(s), {len(self._free)} free")
        pages = self._pages.setdefault(owner, [])
        for _ in range(need):
            pages.append(self._free.pop())

    def free(self, owner: int) -> None:
        self._free.extend(reversed(self._pages.pop(owner, [])))

    def block_table(self, owners: list[int], width: int) -> np.ndarray:
        """int32 [len(owners), width]: row i lists owners[i]'s pages, -1 after them."""
        table = np.full((len(owners), width), -1, np.int32)
        for i, owner in enumerate(owners):
            pages = self.pages(owner)
            if len(pages) > width:
                raise ValueError(f"request {owner} holds {len(pages)} pages, past the block table's {width}")
            table[i, : len(pages)] = pages
        return table
