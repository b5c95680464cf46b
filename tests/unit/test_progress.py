"""Progress output: a live bar on a terminal, plain rate-limited lines otherwise, nothing when quiet."""
import io

from uckpt.conversion.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_live_bar():
    out = Terminal()
    p = Progress(10, 1000, enabled=True, stream=out)
    p.update(5, 500)
    p.update(5, 500, final=True)
    text = out.getvalue()
    assert "\r\033[K[uckpt] [##########----------] 5/10 params" in text
    assert "[####################] 10/10 params" in text and "(100%)" in text and "ETA" in text
    assert text.endswith("\n")


def test_log_file_gets_plain_lines_not_more_often_than_the_interval():
    out = io.StringIO()
    p = Progress(100, 100, enabled=True, stream=out, interval_s=3600)
    for _ in range(100):
        p.update(1, 1)
    p.update(0, 0, final=True)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[uckpt] 1/100 params") and lines[-1].startswith("[uckpt] 100/100 params")
    assert len(lines) == 2 and "\r" not in out.getvalue()


def test_quiet_prints_nothing():
    out = io.StringIO()
    p = Progress(1, 1, enabled=False, stream=out)
    p.log("hello")
    p.update(1, 1, final=True)
    assert out.getvalue() == ""


def test_first_line_shows_however_small_the_monotonic_clock(monkeypatch):
    """time.monotonic() counts from an arbitrary point (boot, on Linux): a machine up for less than
    the interval must still print the first line."""
    import uckpt.conversion.progress as progress

    monkeypatch.setattr(progress.time, "monotonic", lambda: 10.0)
    out = io.StringIO()
    p = Progress(100, 100, enabled=True, stream=out, interval_s=3600)
    p.update(1, 1)
    assert out.getvalue().startswith("[uckpt] 1/100 params")
