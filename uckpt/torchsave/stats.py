"""Byte counters of this process's reads and writes through the codec, for reports and tests.

Writer threads and the main thread add to them at once, so every update holds a lock. A run (a
conversion, a load) takes a :meth:`IOStats.snapshot` when it starts and reports what it added
(:meth:`IOStats.since`), so its figures do not depend on what ran before it in the process.
"""
import threading
from typing import Dict

FIELDS = ("read_bytes", "read_calls", "direct_bytes", "buffered_bytes")


class IOStats:
    """``read_bytes`` / ``read_calls``: bytes and calls asked of the file system by reads;
    ``direct_bytes`` / ``buffered_bytes``: bytes written past the page cache, and through it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(FIELDS, 0)

    def add(self, **counts: int):
        with self._lock:
            for key, n in counts.items():
                self._values[key] += n

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._values)

    def since(self, before: Dict[str, int]) -> Dict[str, int]:
        """What was added after ``before`` (a :meth:`snapshot`)."""
        now = self.snapshot()
        return {key: now[key] - before.get(key, 0) for key in FIELDS}


IO = IOStats()  # this process's codec I/O
