"""Serving: decoding caches over shared page pools that a batching loop drives (page_pool.py: the
allocator; paged_cache.py: the sequences' slots, block tables and per-slot state)."""
