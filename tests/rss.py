"""A process's resident memory, read from /proc (Linux): the tests' real-memory probes.

The pool's workers start with MALLOC_MMAP_THRESHOLD_=1 MiB, so a freed buffer larger
than that goes back to the OS at once and RSS follows the tensors a process holds.
"""

from __future__ import annotations

import gc


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the high-water mark) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def reset_high_water() -> None:
    """Start the high-water mark (``VmHWM``) again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


class Peak:
    """The RSS high-water mark during the block, above the level when it starts (bytes)."""

    def __enter__(self) -> Peak:
        gc.collect()
        self.before = rss_kib("VmRSS")
        reset_high_water()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = (rss_kib("VmHWM") - self.before) * 1024
