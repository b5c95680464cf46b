"""Progress on rank 0: a live line on a terminal, periodic plain lines otherwise; silent with quiet."""
import sys
import time


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, total_params: int, total_bytes: int, enabled: bool, stream=None, interval_s: float = 5.0):
        self.total_params, self.total_bytes = total_params, total_bytes
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s
        self.start = time.monotonic()
        self._last = None  # monotonic time of the last line; None: none yet (monotonic's zero is arbitrary)
        self._shown = None
        self.params = self.bytes = 0

    def log(self, msg: str):
        if self.enabled:
            if self.tty:
                self.stream.write("\r\033[K")
            print(f"[uckpt] {msg}", file=self.stream, flush=True)

    def update(self, params: int, nbytes: int, final: bool = False):
        self.params += params
        self.bytes += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and not self.tty and self._last is not None and now - self._last < self.interval_s:
            return
        if (self.params, self.bytes) == self._shown:
            return
        self._last, self._shown = now, (self.params, self.bytes)
        elapsed = max(now - self.start, 1e-9)
        rate = self.bytes / elapsed
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else 0.0
        pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        line = (f"{self.params}/{self.total_params} params, {_fmt_bytes(self.bytes)}/{_fmt_bytes(self.total_bytes)} "
                f"({pct:.0f}%), {_fmt_bytes(rate)}/s, ETA {left:.0f}s")
        if self.tty:
            filled = int(pct / 5)
            bar = "[" + "#" * filled + "-" * (20 - filled) + "] "
            self.stream.write("\r\033[K[uckpt] " + bar + line + ("\n" if final else ""))
            self.stream.flush()
        else:
            print("[uckpt] " + line, file=self.stream, flush=True)
