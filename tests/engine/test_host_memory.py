"""Host heap tuning: glibc's mmap threshold is pinned so large temporaries go back to the OS."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from engine.host_memory import release_large_frees_to_os


@pytest.mark.skipif(
    platform.system() != "Linux" or ctypes.util.find_library("c") is None, reason="glibc only"
)
def test_threshold_applies_and_is_idempotent() -> None:
    assert release_large_frees_to_os() is True
    assert release_large_frees_to_os() is True
