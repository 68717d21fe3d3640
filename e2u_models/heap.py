"""Giving freed heap memory back to the system between the phases of an edit.

PyTorch's CPU tensors live in the C library's heap. After a training loop over many rows frees
its graphs, glibc keeps most of those pages as free heap rather than returning them, and the
allocations of the next phase (the check of the edit's targets) land beside them instead of in
them: the process's resident memory peaks at both together. ``malloc_trim`` hands the free pages
back, so the next phase starts from the live memory alone.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, Windows, musl)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # Windows has no process-wide CDLL(None)
        return None


def return_freed_memory() -> bool:
    """Return the heap's free pages to the system. No ``gc.collect`` first: it walks every Python
    object, and ROME's sequence calls this once per request. True when the C library could do
    so; elsewhere nothing is returned and the caller's results are the same either way."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
