"""pytest plugin loaded by scripts/ds_tests/run.py (``-p uckpt_ds_plugin``) into DeepSpeed's test session.

It changes no test. It writes, under ``$UCKPT_DS_STATE``:

- ``collected.jsonl``: every collected test with its parameters and the ranks it launches;
- ``deselected.jsonl``: tests left out, with the reason (fp16 cases on the CPU accelerator; tests not in
  ``$UCKPT_DS_ONLY``, a file of node ids, are left out silently);
- ``current``: the test running now (the patches in the test ranks read it to attribute their calls,
  the runner's watchdog reads it to spot a hung test);
- ``results.jsonl``: one line per finished test: outcome, seconds, skip reason or failure message.
"""
import json
import os
import time

import pytest

_STATE = os.environ.get("UCKPT_DS_STATE")
_reports = {}


def _write_line(name, obj):
    if not _STATE:
        return
    with open(os.path.join(_STATE, name), "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def _set_current(nodeid):
    if not _STATE:
        return
    path = os.path.join(_STATE, "current")
    with open(path + ".tmp", "w") as f:
        json.dump({"nodeid": nodeid, "start": time.time(), "pid": os.getpid()}, f)
    os.replace(path + ".tmp", path)


def _gated(cls):
    """Whether launches of ``cls`` go through DeepSpeed's device-count check (DistributedExec._launch_procs,
    which skips when the accelerator has fewer devices than ranks); some CPU tests override it."""
    launch = getattr(cls, "_launch_procs", None)
    return launch is not None and getattr(launch, "__qualname__", "").startswith("DistributedExec.")


def _ranks(item):
    """(ranks, gated) of every launch of the test: its own (a world_size mark or the class attribute) and
    those of the DistributedFixtures it requests (fixtures that launch ranks from a plain function
    are not seen)."""
    ranks = []
    cls = getattr(item, "cls", None)
    if cls is not None and getattr(cls, "is_dist_test", False):
        mark = item.get_closest_marker("world_size")
        ws = mark.args[0] if mark is not None and mark.args else getattr(cls, "world_size", None)
        ranks.extend((w, _gated(cls)) for w in (ws if isinstance(ws, (list, tuple)) else [ws]))
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fd in (info.name2fixturedefs.get(name, ()) if info is not None else ()):
            func = getattr(fd, "func", None)
            if getattr(func, "is_dist_fixture", False):
                ranks.append((getattr(func, "world_size", None), _gated(func)))
    return [(r, g) for r, g in ranks if r is not None]


def _is_fp16(item):
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return any(v is torch.float16 for v in callspec.params.values())


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: record what really runs
def pytest_collection_modifyitems(session, config, items):
    only = None
    if os.environ.get("UCKPT_DS_ONLY"):
        with open(os.environ["UCKPT_DS_ONLY"]) as f:
            only = {line.strip() for line in f if line.strip()}
    include_fp16 = os.environ.get("UCKPT_DS_INCLUDE_FP16") == "1"
    cpu = os.environ.get("DS_ACCELERATOR", "") == "cpu"
    keep, dropped = [], []
    record = os.environ.get("UCKPT_DS_PHASE") == "collect"
    max_ranks = int(os.environ.get("LOCAL_SIZE", "0") or 0)
    for item in items:
        if only is not None and item.nodeid not in only:
            dropped.append(item)
            continue
        callspec = getattr(item, "callspec", None)
        row = {"nodeid": item.nodeid, "file": item.nodeid.split("::")[0],
               "cls": getattr(item.cls, "__name__", None) if getattr(item, "cls", None) else None,
               "name": item.originalname if hasattr(item, "originalname") else item.name,
               "params": {k: repr(v) for k, v in callspec.params.items()} if callspec else {},
               "ranks": [r for r, _ in _ranks(item)]}
        reason = None
        if cpu and not include_fp16 and _is_fp16(item):
            reason = ("fp16: DeepSpeed's CPU accelerator has no fp16 (is_fp16_supported() is false without "
                      "oneDNN fp16; deselected, --include-fp16 runs it)")
        elif cpu and max_ranks and any(g and r > max_ranks for r, g in _ranks(item)):
            need = max(r for r, g in _ranks(item) if g)
            reason = (f"needs {need} ranks, more than --max-ranks {max_ranks} (DeepSpeed would skip it: "
                      f"'not enough GPUs'; deselected)")
        if reason:
            dropped.append(item)
            if record:
                _write_line("deselected.jsonl", dict(row, reason=reason))
            continue
        if record:
            _write_line("collected.jsonl", row)
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_runtest_logstart(nodeid, location):
    _reports[nodeid] = []
    _set_current(nodeid)


def pytest_runtest_logreport(report):
    _reports.setdefault(report.nodeid, []).append(report)


def _message(report):
    text = getattr(report, "longreprtext", "") or ""
    lines = text.splitlines()
    errors = [ln[2:].strip() for ln in lines if ln.startswith("E ")]
    if errors:
        return "\n".join(errors[:12])
    return "\n".join(lines[-8:])


def pytest_runtest_logfinish(nodeid, location):
    reports = _reports.pop(nodeid, [])
    seconds = sum(getattr(r, "duration", 0.0) for r in reports)
    outcome, message, phase = "passed", "", None
    for r in reports:
        if r.failed:
            outcome = "failed" if r.when == "call" else "error"
            message, phase = _message(r), r.when
            break
    else:
        for r in reports:
            if r.skipped:
                outcome, phase = "skipped", r.when
                lr = r.longrepr
                message = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
                if hasattr(r, "wasxfail"):
                    outcome, message = "xfailed", r.wasxfail
                break
    durations = {r.when: round(getattr(r, "duration", 0.0), 3) for r in reports}
    _write_line("results.jsonl", {"nodeid": nodeid, "outcome": outcome, "phase": phase, "seconds": round(seconds, 3),
                                  "durations": durations, "message": message})
    _set_current(None)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _write_line("sessions.jsonl", {"exitstatus": int(exitstatus), "time": time.time()})
