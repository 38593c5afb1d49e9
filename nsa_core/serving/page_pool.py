"""PagePool: the allocator of one shared pool of fixed-size pages (host-side bookkeeping only).

Page 0 is reserved: the null page that every unallocated block-table entry points at (and that
the writes meant for nowhere, such as a decoding step's scratch slot, land on), so a table row of
zeros is always safe to read through. Pages 1 .. num_pages - 1 are handed out on demand and taken
back when a sequence finishes; asking for more than are free raises before anything is written.
"""

from __future__ import annotations

NULL_PAGE = 0


class PagePool:
    def __init__(self, num_pages: int, *, name: str = "num_pages"):
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"{name} must be an int >= 2 (page 0 is the reserved null page), got {num_pages!r}")
        self.num_pages, self.name = num_pages, name
        self._free = list(range(num_pages - 1, 0, -1))  # popped from the end: lowest ids first
        self._used: set[int] = set()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        """n free page ids; a ValueError naming the pool's size when fewer than n are free."""
        if n > len(self._free):
            raise ValueError(f"page pool exhausted: {n} more pages needed, {len(self._free)} free of {self.name}="
                             f"{self.num_pages} (one is the reserved null page); finish a sequence or make the "
                             f"pool larger")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def release(self, pages: list[int]) -> None:
        """Give pages back (each exactly once)."""
        stray = [p for p in pages if p not in self._used]
        if stray:
            raise ValueError(f"pages {stray} are not allocated from this pool (released twice?)")
        self._used.difference_update(pages)
        self._free.extend(sorted(pages, reverse=True))
