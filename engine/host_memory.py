"""Keep freed host memory from piling up in glibc's heap.

The reference MoE decodes one expert at a time into short-lived tensors of tens of MB. glibc raises
its mmap threshold after such blocks are freed, so later ones come from the heap and, fragmented,
are never returned: a gpt-oss-20b prefill grew the process by ~6 GB that way. Fixing the threshold
at 1 MiB keeps every large temporary in its own mapping, returned to the OS on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def release_large_frees_to_os() -> bool:
    """Ask glibc to serve allocations >= 1 MiB by mmap; True if it applied (a no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        logger.debug("mallopt unavailable; heap tuning skipped")
        return False
