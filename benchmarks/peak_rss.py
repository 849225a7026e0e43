"""The peak resident memory of this process, shared by the memory benchmarks that measure in subprocesses."""
from __future__ import annotations

import resource
import sys


def maxrss_mib() -> float:
    """Peak resident set of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
