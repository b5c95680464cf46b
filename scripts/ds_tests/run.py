#!/usr/bin/env python
"""Run DeepSpeed's own universal-checkpoint unit tests against uckpt, on CPU (DS_ACCELERATOR=cpu, gloo).

The tests are not part of this repository: they are extracted from a DeepSpeed git directory (a bare
mirror is enough, ``--ds-git-dir``) into a cache outside the repository
(``~/.cache/uckpt-ds-tests/<commit>/tests/...``), or taken from an earlier extraction. No test is
edited. In every process the tests start (pytest, DeepSpeed's forkserver, each test rank), post-import
hooks (``hook/uckpt_ds_patch.py``, installed through ``hook/sitecustomize.py`` on PYTHONPATH) replace

- ``deepspeed.checkpoint.ds_to_universal.main(args)`` by uckpt's converter (always), and
- with ``--loader uckpt``, universal ``engine.load_checkpoint`` calls by uckpt's loader
  (``uckpt.use_for_universal_loads()``); ``--loader deepspeed`` keeps DeepSpeed's loader.

Every call of the replacements is traced per test, so the table tells a test that exercised uckpt
from one that never reached it (DeepSpeed's white-box tests of its own helpers).

Results: ``<out>/results.md`` (a table per test file), ``<out>/results.json``, ``<out>/pytest.log``
and junit XML files. Examples::

    nice -n 10 .venv/bin/python scripts/ds_tests/run.py --ds-git-dir /work/.mirror/deepspeedai+DeepSpeed/repo --list
    nice -n 10 .venv/bin/python scripts/ds_tests/run.py --loader uckpt --timeout 600
    nice -n 10 .venv/bin/python scripts/ds_tests/run.py --loader deepspeed \\
        --select 'TestZeROUniversalCheckpointDP and 2to2 and float32 and True-False-1'
"""
import argparse
import ast
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOOK = HERE / "hook"
REPO = HERE.parent.parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "uckpt-ds-tests"

# The DeepSpeed test files that call ds_to_universal's main() or load with checkpoint.load_universal.
DEFAULT_FILES = (
    "tests/unit/checkpoint/test_universal_checkpoint.py",
    "tests/unit/checkpoint/test_autotp_uc_checkpoint.py",
    "tests/unit/v1/moe/test_autoep_checkpoint.py",
)
# Always extracted: pytest's configuration and DeepSpeed's test-session hooks (DistributedTest needs them).
SUPPORT_FILES = ("tests/conftest.py", "tests/pytest.ini")
DEFAULT_PYTEST_PIN = ">=7.2.0,<8.4.0"  # DeepSpeed's requirements-dev.txt (when the source does not say)

# Tests that cannot apply to another converter or loader, whatever their outcome (function name -> why).
NOT_APPLICABLE = {
    "test_inject_missing_state_still_validates_unsupported_layout":
        "white-box test of DeepSpeed's converter: it monkeypatches ds_to_universal internals "
        "(_get_optim_files, _get_zero_stage, DeepSpeedCheckpoint, _inject_missing_state) and passes folders "
        "that do not exist",
}


def log(msg):
    print(f"[ds_tests] {msg}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------- extraction

def git(git_dir, *args, binary=False):
    out = subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    return out.stdout if binary else out.stdout.decode()


def installed_deepspeed_version(python):
    code = "import importlib.metadata as m; print(m.version('deepspeed'))"
    try:
        return subprocess.run([python, "-c", code], check=True, stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL).stdout.strip()
    except subprocess.CalledProcessError:
        return None


def resolve_ref(git_dir, ref, ds_version):
    """(commit, ref used, note): --ds-ref, else the tag of the installed DeepSpeed, else the newest commit."""
    note = ""
    if ref is None:
        tag = f"v{ds_version}" if ds_version else None
        tags = set(git(git_dir, "tag").split())
        if tag and tag in tags:
            ref = tag
        else:
            ref = "HEAD"
            note = (f"the git directory has no tag {tag or '(installed DeepSpeed version unknown)'}; using its "
                    f"newest commit")
    commit = git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()
    return commit, ref, note


def _module_paths(module):
    """Repository paths that may hold the test-tree module ``unit.x.y``."""
    base = "tests/" + module.replace(".", "/")
    return [base + ".py", base + "/__init__.py"]


def _imports(path, source):
    """Test-tree modules (``unit...``) a file imports, absolute or relative."""
    pkg = path[len("tests/"):-len(".py")].split("/")[:-1]  # tests/unit/common.py -> ['unit']
    out = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return out
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "unit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "unit":
                continue
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")  # from pkg import submodule
    return out


def needed_files(git_dir, commit, files):
    """The test files, the test-tree modules they import (transitively), the packages' __init__ and
    conftest files along the way, and pytest's configuration."""
    tree = set(git(git_dir, "ls-tree", "-r", "--name-only", commit, "tests").split("\n"))
    missing = [f for f in files if f not in tree]
    if missing:
        raise SystemExit(f"not in DeepSpeed {commit[:10]}: {', '.join(missing)}")
    want, todo = set(), list(files) + [f for f in SUPPORT_FILES if f in tree]
    while todo:
        path = todo.pop()
        if path in want:
            continue
        want.add(path)
        parts = path.split("/")
        for i in range(2, len(parts)):  # package markers and conftest files of every folder above
            for extra in ("__init__.py", "conftest.py"):
                p = "/".join(parts[:i] + [extra])
                if p in tree and p not in want:
                    todo.append(p)
        if path.endswith(".py"):
            source = git(git_dir, "show", f"{commit}:{path}")
            for mod in _imports(path, source):
                todo.extend(p for p in _module_paths(mod) if p in tree and p not in want)
    return sorted(want)


def extract(git_dir, commit, ref, note, files, cache_root, ds_version):
    dest = cache_root / commit
    source_file = dest / "SOURCE.json"
    paths = needed_files(git_dir, commit, files)
    if source_file.exists():
        have = set(json.loads(source_file.read_text())["files"])
        if set(paths) <= have:
            return dest
    dest.mkdir(parents=True, exist_ok=True)
    archive = git(git_dir, "archive", "--format=tar", commit, "--", *paths, binary=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    prior = set(json.loads(source_file.read_text())["files"]) if source_file.exists() else set()
    version_txt = None
    try:
        version_txt = git(git_dir, "show", f"{commit}:version.txt").strip()
    except subprocess.CalledProcessError:
        pass
    meta = {"git_dir": str(git_dir), "commit": commit, "ref": ref, "note": note, "version_txt": version_txt,
            "pytest_pin": pytest_pin(git_dir, commit),
            "commit_date": git(git_dir, "log", "-1", "--format=%cI", commit).strip(),
            "installed_deepspeed": ds_version, "files": sorted(prior | set(paths)),
            "extracted": datetime.datetime.now().isoformat(timespec="seconds")}
    source_file.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"extracted {len(paths)} files of DeepSpeed {commit[:10]} ({ref}) into {dest}")
    return dest


def pytest_pin(git_dir, commit):
    """DeepSpeed's pytest requirement (requirements-dev.txt), e.g. '>=7.2.0,<8.4.0'."""
    try:
        text = git(git_dir, "show", f"{commit}:requirements/requirements-dev.txt")
    except subprocess.CalledProcessError:
        return None
    for line in text.splitlines():
        m = re.match(r"^pytest\s*([<>=!~][^;#\s]*)", line.strip())
        if m:
            return m.group(1)
    return None


def ensure_pytest(args, pin):
    """A folder to put before site-packages so that the tests run under a pytest DeepSpeed supports, or
    None when the interpreter's own pytest fits. DeepSpeed pins pytest < 8.4: its DistributedFixture
    classes register as fixtures through an attribute that pytest 8.4 stopped reading ("fixture
    'baseline_ws2' not found")."""
    pin = args.pytest_pin or pin or DEFAULT_PYTEST_PIN
    code = ("import sys, importlib.metadata as m; from packaging.specifiers import SpecifierSet; "
            "v = m.version('pytest'); print(v); sys.exit(0 if SpecifierSet(sys.argv[1]).contains(v) else 3)")
    check = subprocess.run([args.python, "-c", code, pin], stdout=subprocess.PIPE, text=True)
    if check.returncode == 0:
        return None, check.stdout.strip(), pin
    target = args.cache / ("pytest" + re.sub(r"[^0-9A-Za-z.]+", "_", pin))
    if not (target / "pytest").exists():
        if args.no_install:
            raise SystemExit(f"installed pytest {check.stdout.strip()} is outside DeepSpeed's pin {pin} and "
                             f"{target} is empty (--no-install)")
        log(f"installed pytest {check.stdout.strip()} is outside DeepSpeed's pin {pin}: installing one into {target}")
        subprocess.run([args.python, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"pytest{pin}"], check=True)
    version = next(iter(sorted(p.name for p in target.glob("pytest-*.dist-info"))), "pytest-?.dist-info")
    return target, version[len("pytest-"):-len(".dist-info")], pin


def find_cache(cache_root, ds_tests, files):
    """An already-extracted tree: --ds-tests, else the newest complete one under the cache root."""
    if ds_tests:
        cands = [Path(ds_tests)]
    else:
        cands = sorted((p for p in cache_root.glob("*/SOURCE.json")), key=lambda p: p.stat().st_mtime, reverse=True)
        cands = [p.parent for p in cands]
    for cand in cands:
        if all((cand / f).exists() for f in files):
            return cand
    raise SystemExit(f"no extracted DeepSpeed tests with {', '.join(files)} under {ds_tests or cache_root}; "
                     f"pass --ds-git-dir (a DeepSpeed git directory, bare is fine)")


# -------------------------------------------------------------------------------------- runs

def test_env(args, state, only=None, phase="run"):
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu",
        # DeepSpeed's CPU accelerator counts LOCAL_SIZE devices (else NUMA nodes, usually 1): tests that
        # launch more ranks than this are skipped by DeepSpeed's own "not enough GPUs" check
        "LOCAL_SIZE": str(args.max_ranks),
        "DS_UNITTEST_TIMEOUT": str(args.timeout),  # DeepSpeed's limit for each launch of test ranks
        "PYTHONPATH": os.pathsep.join([str(HOOK)] + ([str(args.pytest_dir)] if args.pytest_dir else [])
                                      + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        "UCKPT_DS_PATCH": "1",
        "UCKPT_DS_LOADER": args.loader,
        "UCKPT_DS_CONVERTER": args.converter,
        "UCKPT_DS_CONVERT": args.convert,
        "UCKPT_DS_CONVERT_NPROC": str(args.convert_nproc),
        "UCKPT_DS_CPU_BF16": "0" if args.no_cpu_bf16 else "1",
        "UCKPT_DS_INCLUDE_FP16": "1" if args.include_fp16 else "0",
        "UCKPT_DS_STATE": str(state),
        "UCKPT_DS_PHASE": phase,
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.setdefault("OMP_NUM_THREADS", "1")  # several ranks share few cores
    env.pop("UCKPT_DS_ONLY", None)
    if only is not None:
        env["UCKPT_DS_ONLY"] = str(only)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _nice(level):
    def pre():
        os.setsid()
        current = os.nice(0)
        if level > current:
            os.nice(level - current)
    return pre


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def pytest_cmd(args, targets, extra):
    return [args.python, "-m", "pytest", "-p", "uckpt_ds_plugin", "-p", "no:cacheprovider", *extra, *targets]


def split_select(selects):
    """--select values: node ids / paths (contain '::' or end in .py) and -k expressions (OR-ed)."""
    nodes, exprs = [], []
    for s in selects:
        if "::" in s or s.endswith(".py"):
            s = s[len("tests/"):] if s.startswith("tests/") else s
            nodes.append(s)
        else:
            exprs.append(s)
    k = " or ".join(f"({e})" for e in exprs) if exprs else None
    return nodes, k


def read_jsonl(path):
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def collect(args, tests_dir, state, targets, k):
    for name in ("collected.jsonl", "deselected.jsonl"):
        (state / name).unlink(missing_ok=True)
    extra = ["--collect-only", "-q"] + (["-k", k] if k else [])
    proc = subprocess.run(pytest_cmd(args, targets, extra), cwd=tests_dir, env=test_env(args, state, phase="collect"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_nice(args.nice))
    (args.out / "collect.log").write_text(proc.stdout)
    collected = read_jsonl(state / "collected.jsonl")
    if proc.returncode not in (0, 5) or (not collected and proc.returncode != 5):
        log(f"collection failed (exit {proc.returncode}); see {args.out / 'collect.log'}:")
        print("\n".join(proc.stdout.splitlines()[-30:]), file=sys.stderr)
        raise SystemExit(2)
    return collected, read_jsonl(state / "deselected.jsonl")


def run_tests(args, tests_dir, state, collected):
    """Run the collected tests; restart after a hang or crash with the tests not yet finished."""
    todo = [row["nodeid"] for row in collected]
    done, extra_results = set(), []
    logf = open(args.out / "pytest.log", "a")
    attempt = 0
    while todo and attempt <= args.max_restarts:
        only = state / f"only-{attempt}.txt"
        only.write_text("\n".join(todo) + "\n")
        files = sorted({n.split("::")[0] for n in todo})
        basetemp = Path(tempfile.mkdtemp(prefix=f"uckpt-ds-{attempt}-", dir=args.tmp))
        extra = ["-rA", f"--junitxml={args.out / f'junit-{attempt}.xml'}", f"--basetemp={basetemp / 'pt'}"]
        cmd = pytest_cmd(args, files, extra)
        logf.write(f"\n===== attempt {attempt}: {len(todo)} tests: {' '.join(cmd)}\n")
        logf.flush()
        log_start = logf.tell()
        (state / "current").unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, cwd=tests_dir, env=test_env(args, state, only), stdout=logf,
                                stderr=subprocess.STDOUT, preexec_fn=_nice(args.nice))
        hung = None
        limit = 2 * args.timeout + 120  # a DistributedFixture launch plus the test's launch, each under the timeout
        while proc.poll() is None:
            time.sleep(2)
            try:
                cur = json.loads((state / "current").read_text())
            except (OSError, ValueError):
                continue
            if cur.get("nodeid") and time.time() - cur["start"] > limit:
                hung = cur["nodeid"]
                log(f"{hung}: over {limit} s, killing the test session")
                _kill_group(proc.pid)
                proc.wait()
        _kill_group(proc.pid)  # leftover ranks of a hung launch (the session is its own process group)
        if not args.keep_tmp:
            shutil.rmtree(basetemp, ignore_errors=True)
        finished = {r["nodeid"] for r in read_jsonl(state / "results.jsonl")}
        new = [n for n in todo if n in finished and n not in done]
        done.update(new)
        try:
            cur = json.loads((state / "current").read_text()).get("nodeid")
        except (OSError, ValueError):
            cur = None
        stuck = hung or (cur if cur and cur not in finished else None)
        if stuck:
            with open(args.out / "pytest.log", errors="replace") as f:
                f.seek(log_start)
                session_log = f.read()
            if hung:
                outcome, why = "timeout", f"killed by the runner after {limit} s"
            elif "Test hanged, exiting" in session_log:
                outcome, why = "timeout", (f"test ranks ran past DS_UNITTEST_TIMEOUT={args.timeout} s (per launch); "
                                           f"DeepSpeed ended the session: 'Test hanged, exiting'")
            else:
                tail = " / ".join(session_log.strip().splitlines()[-3:])
                outcome, why = "crashed", f"the pytest session ended during this test (exit {proc.returncode}): {tail}"
            extra_results.append({"nodeid": stuck, "outcome": outcome, "seconds": None, "message": why})
            done.add(stuck)
            log(f"{stuck}: {why}")
        todo = [n for n in todo if n not in done]
        if todo and not new and not stuck:
            log(f"pytest exited with {proc.returncode} and ran none of the {len(todo)} remaining tests; see "
                f"{args.out / 'pytest.log'}")
            break
        attempt += 1
    logf.close()
    return extra_results, todo


# ----------------------------------------------------------------------------------- results

def _count(events):
    """'N' calls, or 'N on R ranks' when several test ranks made them; ', K raised' when some raised."""
    ranks = {e.get("rank") for e in events}
    text = f"x{len(events)}" if len(ranks) <= 1 else f"x{len(events)} on {len(ranks)} ranks"
    bad = sum(1 for e in events if not e.get("ok"))
    return text + (f" ({bad} raised)" if bad else "")


def _exercised(events):
    conv = [e for e in events if e["kind"] == "convert" and e.get("converter", "uckpt") == "uckpt"]
    ds_conv = [e for e in events if e["kind"] == "convert" and e.get("converter") == "deepspeed"]
    loads = [e for e in events if e["kind"] == "load_checkpoint" and e.get("universal")]
    uloads = [e for e in events if e["kind"] == "uckpt_load"]
    parts = []
    if conv:
        parts.append(f"convert {_count(conv)}")
    if ds_conv:
        parts.append(f"DeepSpeed convert {_count(ds_conv)}")
    if uloads:
        parts.append(f"uckpt load {_count(uloads)}")
    if len(loads) > len(uloads):
        rest = [e for e in loads][len(uloads):] if uloads else loads
        who = "DeepSpeed (uckpt handed it back)" if loads[0].get("loader") == "uckpt" else "DeepSpeed"
        parts.append(f"universal load by {who} {_count(rest)}")
    return ", ".join(parts), bool(conv or uloads)


def build_rows(collected, deselected, results, extra, unrun, trace, baseline=False, timeout=None):
    by_test = {}
    for e in trace:
        by_test.setdefault(e.get("test"), []).append(e)
    res = {r["nodeid"]: r for r in results}
    res.update({r["nodeid"]: r for r in extra})
    rows = []
    for c in collected:
        r = res.get(c["nodeid"])
        uckpt, touched = _exercised(by_test.get(c["nodeid"], []))
        touched = touched or baseline  # a baseline run has no uckpt to reach
        row = dict(c, uckpt=uckpt, exercised_uckpt=touched)
        if r is None:
            row.update(outcome="not run", seconds=None, status="not run",
                       message="not reached" if c["nodeid"] in unrun else "no result recorded")
        else:
            row.update(outcome=r["outcome"], seconds=r.get("seconds"), message=r.get("message", ""),
                       durations=r.get("durations"))
            o = r["outcome"]
            if c["name"] in NOT_APPLICABLE and not baseline:
                row["status"] = "n/a"
                row["message"] = f"{NOT_APPLICABLE[c['name']]} [{o}] " + (row["message"] or "")
            elif o == "skipped":
                row["status"] = "n/a"
            elif o == "passed":
                row["status"] = "pass" if touched else "pass (uckpt not reached)"
            elif o in ("failed", "error") and timeout and (r.get("seconds") or 0) >= timeout:
                # DeepSpeed's launcher timed out, then its pool teardown failed (e.g. gloo "Connection
                # closed by peer") and that error replaced the timeout
                row["status"] = "TIMEOUT"
                row["message"] = (f"ran {r['seconds']:.0f} s, past DS_UNITTEST_TIMEOUT={timeout} s; then: "
                                  + (row["message"] or ""))
            elif o in ("failed", "error"):
                # a failure before any uckpt call is the test's or DeepSpeed's own (e.g. the tests' DeepSpeed
                # commit and the installed DeepSpeed disagree on an API), not a verdict on uckpt
                row["status"] = "FAIL" if touched else "FAIL (uckpt not reached)"
            else:
                row["status"] = o.upper()
        rows.append(row)
    for d in deselected:
        rows.append(dict(d, uckpt="", exercised_uckpt=False, outcome="deselected", seconds=None, status="n/a",
                         message=d["reason"]))
    return rows


def _cell(text, limit=300):
    text = " ".join(str(text or "").split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.replace("|", "\\|")


def _test_label(row):
    nodeid = row["nodeid"]
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid


def write_results(args, meta, rows):
    order = {"FAIL": 0, "TIMEOUT": 0, "CRASHED": 0, "FAIL (uckpt not reached)": 1, "not run": 1, "pass": 2,
             "pass (uckpt not reached)": 3, "n/a": 4}
    summary = {}
    for r in rows:
        summary[r["status"]] = summary.get(r["status"], 0) + 1
    files = sorted({r["file"] for r in rows})
    total_s = sum(r["seconds"] or 0 for r in rows)
    meta = dict(meta, summary=summary, total_test_seconds=round(total_s, 1))
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "tests": rows}, indent=2, default=str) + "\n")
    lines = ["# DeepSpeed's universal-checkpoint tests against uckpt", ""]
    nproc = f", {args.convert_nproc} ranks" if args.convert == "cli" else ""
    converter = f"uckpt ({args.convert}{nproc})" if args.converter == "uckpt" else "DeepSpeed's ds_to_universal"
    loader = "uckpt (use_for_universal_loads)" if args.loader == "uckpt" else "DeepSpeed"
    bf16 = "DeepSpeed's test gate opened" if not args.no_cpu_bf16 else "DeepSpeed's test gate kept (bf16 cases skip)"
    src = meta["ds_tests"]
    lines += [f"- DeepSpeed tests: commit `{src.get('commit', '?')[:12]}` ({src.get('ref')}, version.txt "
              f"{src.get('version_txt')}, {src.get('commit_date')}){'; ' + src['note'] if src.get('note') else ''}",
              f"- installed: deepspeed {meta['deepspeed']}, torch {meta['torch']}, pytest {meta['pytest']} "
              f"(DeepSpeed's pin {meta['pytest_pin']}); accelerator cpu (gloo), "
              f"up to {args.max_ranks} ranks",
              f"- converter: {converter}; loader: {loader}",
              f"- bf16 on CPU: {bf16}",
              f"- run: {meta['started']}, {meta['wall_seconds']:.0f} s wall, {total_s:.0f} s in tests; "
              f"selection: {meta['select'] or 'all'}", ""]
    lines += ["| result | tests |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(summary.items(), key=lambda kv: order.get(kv[0], 1))]
    lines.append("")
    for f in files:
        lines += [f"## {f}", "", "| test | ranks | result | s | traced calls | note |", "|---|---|---|---|---|---|"]
        frows = sorted((r for r in rows if r["file"] == f), key=lambda r: (order.get(r["status"], 1), r["nodeid"]))
        for r in frows:
            secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
            ranks = ",".join(str(x) for x in r.get("ranks") or []) or "1"
            note = r["message"] if r["status"] != "pass" else ""
            lines.append(f"| `{_cell(_test_label(r), 200)}` | {ranks} | {r['status']} | {secs} | {_cell(r['uckpt'])} | "
                         f"{_cell(note)} |")
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    return summary


def versions(python):
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({k: m.version(k) for k in ('deepspeed', 'torch', 'pytest')}))")
    try:
        return json.loads(subprocess.run([python, "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout)
    except (subprocess.CalledProcessError, ValueError):
        return {}


# -------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("DeepSpeed's tests")
    src.add_argument("--ds-git-dir", help="DeepSpeed git directory (bare mirror fine) to extract the tests from")
    src.add_argument("--ds-ref", help="tag or commit (default: v<installed deepspeed>, else the newest commit)")
    src.add_argument("--ds-tests", help="an extracted tree (holding tests/...) instead of the newest cached one")
    src.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"extraction cache (default {DEFAULT_CACHE})")
    src.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="DeepSpeed test files (repo paths)")
    sel = ap.add_argument_group("what and how")
    sel.add_argument("--select", action="append", default=[],
                     help="a pytest -k expression, or node ids / paths relative to tests/ (repeatable; values OR-ed)")
    sel.add_argument("--loader", choices=["uckpt", "deepspeed"], default="uckpt",
                     help="uckpt: universal loads go to uckpt (use_for_universal_loads); deepspeed: only the "
                          "converter is replaced (default uckpt)")
    sel.add_argument("--converter", choices=["uckpt", "deepspeed"], default="uckpt",
                     help="deepspeed: keep DeepSpeed's ds_to_universal (with --loader deepspeed: a baseline of "
                          "DeepSpeed's own tests on this machine, nothing of uckpt)")
    sel.add_argument("--convert", choices=["inprocess", "cli"], default="inprocess",
                     help="inprocess: call uckpt in the test's process (default); cli: run `python -m uckpt "
                          "convert` (or torchrun with --convert-nproc > 1) as a subprocess")
    sel.add_argument("--convert-nproc", type=int, default=1, help="converter ranks with --convert cli")
    sel.add_argument("--max-ranks", type=int, default=4,
                     help="CPU 'devices' DeepSpeed's tests may use (LOCAL_SIZE); tests needing more skip (default 4)")
    sel.add_argument("--include-fp16", action="store_true",
                     help="run the fp16 cases too (DeepSpeed's CPU accelerator reports no fp16 support "
                          "unless oneDNN has fp16 on this CPU, and DeepSpeed then refuses fp16 configs)")
    sel.add_argument("--no-cpu-bf16", action="store_true",
                     help="keep DeepSpeed's bf16 test gate, which wants CUDA >= 11 and NCCL >= 2.10 (bf16 cases skip)")
    sel.add_argument("--timeout", type=int, default=900,
                     help="seconds per launch of test ranks (DS_UNITTEST_TIMEOUT; a test with a DistributedFixture "
                          "launches twice); the runner kills a test after 2x this + 120 s (default 900)")
    sel.add_argument("--max-restarts", type=int, default=20, help="restarts after a hung or crashed test")
    sel.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the tests")
    sel.add_argument("--list", action="store_true", help="collect only: write the table of tests, run nothing")
    out = ap.add_argument_group("output")
    out.add_argument("--out", type=Path,
                     help="results folder (default runs/ds_tests/conv-<converter>_load-<loader>_<time>)")
    out.add_argument("--tmp", default=None, help="parent of pytest's temporary folders (default: the system's)")
    out.add_argument("--keep-tmp", action="store_true", help="keep the tests' temporary folders")
    out.add_argument("--python", default=sys.executable, help="interpreter with deepspeed, torch, pytest and uckpt")
    out.add_argument("--nice", type=int, default=10, help="niceness of the test processes (default 10)")
    out.add_argument("--pytest-pin", help="pytest version range for the tests (default: DeepSpeed's "
                                          f"requirements-dev.txt, else '{DEFAULT_PYTEST_PIN}')")
    out.add_argument("--no-install", action="store_true",
                     help="never pip-install a pytest within the pin into the cache (fail instead)")
    args = ap.parse_args(argv)
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = REPO / "runs" / "ds_tests" / f"conv-{args.converter}_load-{args.loader}_{stamp}"
    args.out = args.out.resolve()
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    ds_version = installed_deepspeed_version(args.python)
    files = list(args.files)
    nodes, k = split_select(args.select)
    node_files = sorted({"tests/" + n.split("::")[0] for n in nodes})
    needed = sorted(set(files) | set(node_files))
    if args.ds_git_dir:
        commit, ref, note = resolve_ref(args.ds_git_dir, args.ds_ref, ds_version)
        if note:
            log(f"note: {note} ({commit[:10]}); installed deepspeed is {ds_version}")
        root = extract(Path(args.ds_git_dir), commit, ref, note, needed, args.cache, ds_version)
    else:
        root = find_cache(args.cache, args.ds_tests, needed)
    source = json.loads((root / "SOURCE.json").read_text()) if (root / "SOURCE.json").exists() else {"path": str(root)}
    source.pop("files", None)
    tests_dir = root / "tests"
    args.pytest_dir, pytest_version, pin = ensure_pytest(args, source.get("pytest_pin"))

    if args.loader == "uckpt":
        check = subprocess.run([args.python, "-c", "import uckpt, sys; sys.exit(0 if hasattr(uckpt, "
                                "'use_for_universal_loads') else 3)"], cwd=str(REPO))
        if check.returncode != 0:
            log("--loader uckpt needs uckpt.use_for_universal_loads(), which this uckpt does not have; "
                "use --loader deepspeed to replace only the converter")
            return 2

    args.out.mkdir(parents=True, exist_ok=True)
    state = args.out / "state"
    if state.exists():
        shutil.rmtree(state)
    state.mkdir()
    for old in [args.out / "pytest.log", *args.out.glob("junit-*.xml")]:
        old.unlink(missing_ok=True)
    file_targets = [f[len("tests/"):] for f in files]
    if nodes and k:  # --select values are OR-ed: the -k matches in the files, plus the node ids
        collected, deselected = collect(args, tests_dir, state, file_targets, k)
        more, more_deselected = collect(args, tests_dir, state, nodes, None)
        seen = {r["nodeid"] for r in collected + deselected}
        collected += [r for r in more if r["nodeid"] not in seen]
        deselected += [r for r in more_deselected if r["nodeid"] not in seen]
    else:
        collected, deselected = collect(args, tests_dir, state, nodes or file_targets, k)
    log(f"{len(collected)} tests selected, {len(deselected)} deselected as not applicable here "
        f"(fp16 on CPU, more ranks than --max-ranks)")

    extra, unrun = [], []
    if not args.list and collected:
        extra, unrun = run_tests(args, tests_dir, state, collected)
    results = read_jsonl(state / "results.jsonl")
    trace = read_jsonl(state / "trace.jsonl")
    rows = build_rows(collected, deselected, results, extra, set(unrun), trace,
                      baseline=args.converter == "deepspeed" and args.loader == "deepspeed", timeout=args.timeout)
    if args.list:
        for r in rows:
            if r["status"] == "not run":
                r["status"], r["message"] = "collected", ""
    v = versions(args.python)
    meta = {"ds_tests": source, "deepspeed": v.get("deepspeed"), "torch": v.get("torch"), "pytest": pytest_version,
            "pytest_pin": pin, "pytest_dir": str(args.pytest_dir) if args.pytest_dir else None,
            "loader": args.loader, "converter": args.converter, "convert": args.convert,
            "convert_nproc": args.convert_nproc,
            "max_ranks": args.max_ranks, "cpu_bf16_gate_opened": not args.no_cpu_bf16, "timeout": args.timeout,
            "select": args.select, "files": files, "list_only": args.list,
            "started": datetime.datetime.fromtimestamp(t0).isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - t0, 1),
            "patch_errors": [e for e in trace if e["kind"] == "patch_error"]}
    summary = write_results(args, meta, rows)
    log(f"results: {args.out / 'results.md'}  {json.dumps(summary)}")
    if meta["patch_errors"]:
        log(f"patch errors: {meta['patch_errors'][:3]}")
    failed = sum(v for s, v in summary.items() if s.startswith("FAIL") or s in ("TIMEOUT", "CRASHED", "not run"))
    return 1 if failed and not args.list else 0


if __name__ == "__main__":
    sys.exit(main())
