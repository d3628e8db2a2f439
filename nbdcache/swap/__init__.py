"""Swap: spill space for blocks evicted from the RAM cache, after FreeBSD's swap pager."""
