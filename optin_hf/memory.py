"""Handing freed CPU memory back to the system between the pruner's phases.

glibc's malloc raises its mmap threshold to the size of the largest mapped block freed (up to 32 MiB). After the first
multi-MB tensors are freed, later tensors of that size come from its heap, and what is freed there stays in the
process's resident memory: on the language-model default about 5.8 GB of its 16.3 GB peak was such memory, not live
tensors (`benchmarks/RESULTS.md`, "Where the peak RSS goes"). A fixed low threshold returns it but maps every tensor
afresh (47% slower there); `release_freed_memory` instead asks glibc to return the free pages where the scoring, a
recorded batch of the dense run, a refit-selection group or a layer's refit has ended (`malloc_trim`), and what
follows faults in only what it uses: the default's peak 16.2 -> 10.6 GB, its pruning 8% slower in one comparison.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the C library this process already runs on
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the system; True if any were returned (False where nothing was free or the
    C library cannot). Live tensors are untouched; the cost is a walk over the heap's free chunks."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
