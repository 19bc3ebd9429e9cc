"""The C allocator under a worker's decodes: keep freed pixel memory from piling up.

The decode budget (`budget.py`) bounds the pixels held at once, but not what the process
keeps after they are freed. glibc gives each thread that allocates its own malloc arena
(up to eight per core), and a frame freed in one arena is not reused by another thread's
next frame, nor returned to the system while anything else in that arena's heap sits
above it. Pillow allocates images in blocks smaller than glibc's (dynamic) mmap threshold
of up to 32 MiB, so they land in those heaps. Measured with 32 threads decoding 49 MP
PNGs through a 2 GiB budget (`bench/decode_memory.py`, 2 cores): peak RSS 2187 MB as
glibc comes (3089 MB with the 128 arenas of a 16-core machine), 1058 MB with two
arenas, 971 MB (1001 with 128 arenas) trimming after each large reservation, 888 MB
with both.

`configure_allocator()` caps the arenas; it must run at process start, before the task
threads exist (arenas already made stay). `release_free_memory()` hands back the free
memory of every arena; the budget calls it when a large reservation ends.
Elsewhere than glibc (musl, macOS) both do nothing and say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from functools import lru_cache

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
_M_ARENA_MAX = -8
# Two arenas: threads contend for them a little (malloc is a small part of a decode's
# time), and one frame's blocks freed in one arena are reused by the next frame there.
DEFAULT_ARENA_MAX = 2

_trim_lock = threading.Lock()


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        # Both are glibc's own; musl has neither.
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def configure_allocator(arena_max: int = DEFAULT_ARENA_MAX) -> bool:
    """Cap glibc's malloc arenas at `arena_max`. Call once at process start, before
    threads allocate. Returns whether it took effect (False where malloc is not glibc's)."""
    libc = _glibc()
    if libc is None or libc.mallopt(_M_ARENA_MAX, arena_max) != 1:
        logger.info("malloc arenas left as they are: not glibc")
        return False
    return True


def release_free_memory() -> bool:
    """Return the free memory of every malloc arena to the system (glibc's malloc_trim).

    Takes a few milliseconds with gigabytes free; one thread at a time, as a second
    caller would only walk the same arenas again. Returns whether anything was released.
    """
    libc = _glibc()
    if libc is None:
        return False
    with _trim_lock:
        return bool(libc.malloc_trim(0))
