"""Giving a long process's memory back between units of work: a study's cells, a many-users job's users.

Two things keep a finished cell's memory (measured in docs/experiments.md, "Memory between cells"):

* reference cycles. An exception caught deep inside training keeps its traceback, whose frames keep
  `train`'s frame and with it the cell's model copy, gradients, optimizer and best state (pyparsing does
  this when matplotlib is first imported to draw the loss curve). Only Python's full collection frees
  them, and it runs rarely in a process holding a model's millions of objects.
* glibc's heap. Tensors under the mmap threshold (which grows to 32 MB) are carved from the heap, and
  free() keeps their pages: after a fine-tuning cell the process stays at that cell's peak.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import sys


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim  # musl has no libc.so.6: OSError
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> None:
    """Free unreachable cycles now, then hand the heap's free pages back to the system (glibc only)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
