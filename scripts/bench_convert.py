#!/usr/bin/env python
"""Benchmark: uckpt convert vs DeepSpeed's ds_to_universal.py on real ZeRO checkpoints (DP=4, bf16).

Builds (once, cached under .cache/bench/) checkpoints with real DeepSpeed on CPU:
  small-tensors: hundreds of layers of tiny tensors (ZeRO-2);
  large-tensors: a few large layers, hundreds of MB of optimizer state (ZeRO-2);
  xl-tensors: a few larger layers, about 1 GB of optimizer state (ZeRO-2);
  zero2-3gb / zero3-3gb: 218 M parameters, about 2.7 / 2.3 GB (ZeRO-2 / ZeRO-3).
Runs ds_to_universal.py (its default workers) and uckpt with 1 and 2 ranks alternately, --repeat
times each (the order rotated each round), and prints median wall time, peak anonymous memory
summed over the ranks (RSS less mapped file pages; torchrun's own process left out), the bytes each
run left on disk and the temporary bytes among them (DeepSpeed's temp folder, kept by
--keep_temp_folder; for uckpt, every byte its ranks report writing minus the final output's).
The two large cases run cold (the page cache dropped before each run) and add two rows: the copy
floor (scripts/copy_floor.py: the input read once, the output's bytes written once, fsync'd) and
the bare torchrun start-up of 2 workers (scripts/launch_overhead.py), plus uckpt's per-phase times
from each run's uckpt_report.json. Outputs are checked against DeepSpeed's after the timed runs,
and deleted only when a case's runs are done (see settle()). --profile samples one uckpt-1 run.

    python scripts/bench_convert.py [--repeat 3] [--cases zero2-3gb zero3-3gb] [--profile]
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Optional

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from uckpt.tools.compare import compare_universal  # noqa: E402
from examples import runner  # noqa: E402

CASES = {
    "small-tensors": ["--layers", "800", "--hidden", "64", "--vocab", "64"],
    "large-tensors": ["--layers", "6", "--hidden", "2048", "--vocab", "256"],
    # beyond the two cases the issue names: where data, not process start-up, dominates
    "xl-tensors": ["--layers", "8", "--hidden", "3072", "--vocab", "256"],
    # issue 15: multi-GB checkpoints (about 2.8 GB: 218 M parameters, 12 bytes of optimizer state each)
    "zero2-3gb": ["--layers", "12", "--hidden", "4096", "--vocab", "256"],
    "zero3-3gb": ["--zero-stage", "3", "--layers", "12", "--hidden", "4096", "--vocab", "256"],
}
TIED_ALIAS = os.path.join("zero", "head.weight", "fp32.pt")


def build(case: str, root: str) -> str:
    key = hashlib.sha256(" ".join(CASES[case]).encode()).hexdigest()[:10]  # cached by configuration
    stage = [] if "--zero-stage" in CASES[case] else ["--zero-stage", "2"]
    return runner.cached_checkpoint(os.path.join(root, f"{case}-{key}", "native"), 4,
                                    [*stage, "--dtype", "bf16", "--steps", "1", *CASES[case]],
                                    "examples.tiny_train")


def _tree_memory(proc: psutil.Process, children: bool = True):
    rss = anon = 0
    try:
        procs = [proc] + (proc.children(recursive=True) if children else [])
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            rss += int(fields["VmRSS"].split()[0]) * 1024
            # anonymous memory, and shared anonymous memory (RssShmem), which would hide a MAP_SHARED buffer
            anon += (int(fields["RssAnon"].split()[0]) + int(fields["RssShmem"].split()[0])) * 1024
        except (FileNotFoundError, ProcessLookupError, KeyError, psutil.NoSuchProcess):
            pass
    return rss, anon


def measure(cmd, launcher: bool = False):
    """Run ``cmd``; return (wall seconds, peak summed RSS, peak summed anonymous RSS, peak anonymous RSS
    summed over the ranks only). ``launcher``: ``cmd`` is torchrun, whose own process is not a rank."""
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, cwd=runner.REPO, env=runner.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = psutil.Process(popen.pid)
    peak = [0, 0, 0]
    out = []
    reader = threading.Thread(target=lambda: out.append(popen.stdout.read()), daemon=True)
    reader.start()
    while popen.poll() is None:
        rss, anon = _tree_memory(proc)
        ranks = anon - _tree_memory(proc, children=False)[1] if launcher else anon
        peak = [max(peak[0], rss), max(peak[1], anon), max(peak[2], ranks)]
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    reader.join()
    if popen.returncode != 0:
        raise runner.JobError(cmd, popen.returncode, (out[0] if out else b"").decode(errors="replace"))
    return wall, peak[0], peak[1], peak[2]


def drop_caches(folders) -> str:
    """Start cold: write back dirty pages, then drop the page cache (root), else evict ``folders``'
    files one by one (posix_fadvise DONTNEED, which drops clean pages of files one can open)."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        evict(folders)
        return "fadvise"


def evict(folders):
    """Drop the clean cached pages of every file under ``folders`` (posix_fadvise DONTNEED)."""
    for folder in folders:
        for r, _, names in os.walk(folder):
            for n in names:
                fd = os.open(os.path.join(r, n), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def settle(previous: Optional[str], cold_input: Optional[str] = None) -> Optional[str]:
    """Flush the previous run's dirty pages, drop its output from the page cache, and give the disk a
    moment: every tool starts from the same state (free memory for its output; the input cached, or
    with ``cold_input`` not cached: the whole page cache dropped). Returns how the cache was dropped.

    Nothing is deleted between runs: every output (and DeepSpeed's temp folder, kept by
    --keep_temp_folder) stays until the case's runs are done. On a journal-less ext4 such as this
    machine's disk, the kernel avoids reusing an inode for 60 s after its deletion, 300 s while its
    inode-table block is dirty (fs/ext4/ialloc.c: recently_deleted), and each new inode scans past
    those; right after thousands of files were deleted, creating files in the same block groups ran
    2-3x slower here (perf: most time in recently_deleted). Deleting between runs would charge that
    to whichever tool runs next. DeepSpeed is spared deleting its temp folder inside its timed run.
    """
    how = None
    if cold_input:
        how = drop_caches([cold_input] + ([previous] if previous else []))
    else:
        subprocess.run(["sync"], check=False)
        evict([previous] if previous else [])
    time.sleep(2)
    return how


REUSE_WINDOW_S = 300  # fs/ext4/ialloc.c: RECENTCY_DIRTY, the longest a deleted inode is passed over


def remove_outputs(work: str, root: str):
    """Delete the benchmark's outputs and note when, for wait_for_inode_reuse()."""
    shutil.rmtree(work)
    with open(os.path.join(root, "outputs-removed-at"), "w") as f:
        f.write(f"{time.time()}\n")


def wait_for_inode_reuse(root: str):
    """Wait until the outputs that the previous benchmark deleted no longer slow file creation (see
    settle()); a run started right after another one's clean-up was slower for every tool here."""
    try:
        with open(os.path.join(root, "outputs-removed-at")) as f:
            left = float(f.read()) + REUSE_WINDOW_S - time.time()
    except (FileNotFoundError, ValueError):
        return
    if left > 0:
        print(f"waiting {left:.0f} s: the previous benchmark deleted its outputs less than {REUSE_WINDOW_S} s ago, "
              "and until then creating files here is slower (see settle())", flush=True)
        time.sleep(left)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(folder) for n in ns)


LARGE = ("zero2-3gb", "zero3-3gb")  # run cold, with the copy floor, the bare start-up and two budgets
PHASES = ("discover", "read_metadata", "verify_crc", "plan", "prepare_output", "model_files", "pack", "exchange",
          "merge_write", "other_files", "fsync", "publish", "total")


def tools_for(case: str, tag: str, reference: str):
    """Command line of each row (a function of its output folder), and whether torchrun launches it."""
    def uckpt(nproc, *extra):
        def cmd(out):
            args = ["-m", "uckpt", "convert", "--input_folder", tag, "--output_folder", out, "--inject_missing_state",
                    "--quiet", *extra]
            return [sys.executable, *args] if nproc == 1 else runner.torchrun_cmd(nproc, args)
        return cmd, nproc > 1

    tools = {
        # --keep_temp_folder: its temp files are counted, and not deleted inside the timed run (see settle())
        "deepspeed": (lambda out: [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                   tag, "--output_folder", out, "--inject_missing_state", "--keep_temp_folder"], False),
        "uckpt-1": uckpt(1),
        "uckpt-1-nocrc": uckpt(1, "--no_verify_crc"),  # the cost of checking every input record's CRC-32
        "uckpt-1-256MB": uckpt(1, "--memory_budget_mb", "256"),
        "uckpt-2": uckpt(2),
    }
    if case in LARGE:
        tools["uckpt-2-256MB"] = uckpt(2, "--memory_budget_mb", "256")
        tools["copy-floor"] = (lambda out: [sys.executable, os.path.join(HERE, "copy_floor.py"), "--input", tag,
                                            "--like", reference, "--output", out], False)
        # torchrun workers that import torch, join a gloo group and leave: what uckpt-2 pays before converting
        tools["torchrun-2-startup"] = (lambda out: runner.torchrun_cmd(2, [os.path.join(HERE, "launch_overhead.py"),
                                                                           "--worker"]), True)
    return tools


def check_space(case: str, tag: str, work: str, writers, repeat: int):
    """Every run's output stays until the case ends (see settle()): refuse up front, in one line, when
    they would not fit, instead of failing midway with ENOSPC. Each writer leaves about the input's size
    (uckpt 1.03x); DeepSpeed leaves its temp files too (1.9x), counted as one more writer, and the
    untimed reference conversion one more."""
    need = 1.05 * folder_bytes(tag) * (repeat * (len(writers) + 1) + 1)
    at = work
    while not os.path.exists(at):
        at = os.path.dirname(at)
    free = shutil.disk_usage(at).free
    if need > free:
        sys.exit(f"bench_convert: case {case} keeps every run's output until it ends, about {need / 1e9:.0f} GB for "
                 f"--repeat {repeat}, and {at} has {free / 1e9:.0f} GB free -- use a smaller --repeat or free space")


def run_case(case: str, tag: str, work: str, repeat: int, cold: bool):
    """Every tool ``repeat`` times, alternating; returns the case's results."""
    case_dir = os.path.join(work, case)
    reference = os.path.join(case_dir, "reference", "universal")  # untimed: the copy floor writes its file sizes
    tools = tools_for(case, tag, reference)
    check_space(case, tag, work, [t for t in tools if t != "torchrun-2-startup"], repeat)
    if case in LARGE and not os.path.exists(reference):
        runner.uckpt_convert(1, tag, reference, "--inject_missing_state", "--quiet")
    names = list(tools)
    outputs = lambda tool, i: os.path.join(case_dir, f"{tool}-{i}", "universal")  # noqa: E731
    runs = {t: [] for t in tools}
    previous, how = None, None  # the folder of the last timed run
    for i in range(repeat):
        # rotate the order each round, so that no tool always runs right after another one
        for tool in names[i % len(names):] + names[:i % len(names)]:
            how = settle(previous, tag if cold else None) or how
            cmd, launcher = tools[tool]
            runs[tool].append(measure(cmd(outputs(tool, i)), launcher))
            previous = os.path.dirname(outputs(tool, i))
    # checked after the timed runs, against DeepSpeed's last timed output (its tmp/ folder left out)
    ref = outputs("deepspeed", repeat - 1)
    row = {}
    for tool in tools:
        walls, rss, anon, ranks_anon = zip(*runs[tool])
        r = row[tool] = {"wall_s": statistics.median(walls), "walls": walls, "peak_rss_mib": max(rss) / 2**20,
                         "peak_anon_mib": max(anon) / 2**20, "peak_ranks_anon_mib": max(ranks_anon) / 2**20}
        out = outputs(tool, repeat - 1)
        if not os.path.isdir(out):  # the start-up row writes nothing
            continue
        # bytes written: what the run left on disk (its output, and DeepSpeed's temp folder)
        r["written_mib"] = folder_bytes(os.path.dirname(out)) / 2**20
        if tool.startswith("uckpt"):
            diffs = compare_universal(out, ref, skip=lambda rel: rel == TIED_ALIAS or rel.startswith("tmp" + os.sep))
            assert not diffs, (tool, diffs[:5])
            # per phase, each the median over the rounds (their reports are kept until the case ends)
            reports = [json.load(open(os.path.join(outputs(tool, i), "uckpt_report.json"))) for i in range(repeat)]
            r["phases_s"] = {ph: statistics.median(rep["timings_s"].get(ph, 0.0) for rep in reports) for ph in PHASES}
            written = sum(x["written_bytes"] for x in reports[-1]["ranks"])
            r["temp_mib"] = (written - (folder_bytes(out) - os.path.getsize(os.path.join(out, "uckpt_report.json")))) \
                / 2**20
    row["deepspeed"]["temp_mib"] = folder_bytes(os.path.join(ref, "tmp")) / 2**20
    return {"input_mib": folder_bytes(tag) / 2**20, "cache": how if cold else "input cached", "repeat": repeat,
            "tools": row}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--warm", action="store_true", help="keep the input in the page cache (default: only the "
                    f"small cases {', '.join(c for c in CASES if c not in LARGE)}; {', '.join(LARGE)} run cold)")
    ap.add_argument("--profile", action="store_true", help="then profile one uckpt-1 run of each case (py-spy)")
    ap.add_argument("--root", default=os.path.join(runner.REPO, ".cache", "bench"))
    ap.add_argument("--json", default=os.path.join(runner.REPO, "runs", "bench", "results.json"))
    args = ap.parse_args()
    results = {}
    work = os.path.join(args.root, "out")
    if os.path.exists(work):
        print(f"removing {work}, left by an interrupted benchmark", flush=True)
        remove_outputs(work, args.root)
    wait_for_inode_reuse(args.root)
    for case in args.cases:
        tag = build(case, args.root)
        results[case] = run_case(case, tag, work, args.repeat, cold=case in LARGE and not args.warm)
        if args.profile:
            results[case]["profile"] = profile(tag, os.path.join(work, case, "profile", "universal"),
                                               os.path.join(os.path.dirname(args.json), f"profile-{case}"))
        print_case(case, results[case])
        if case in LARGE:  # its outputs would not fit on the disk next to the next case's; a few hundred
            shutil.rmtree(os.path.join(work, case))  # files, which do not slow later file creation (see settle())
            subprocess.run(["sync"], check=False)
    if os.path.exists(work) and any(c not in LARGE for c in args.cases):
        remove_outputs(work, args.root)  # nothing is deleted before every run of a case is done, see settle()
    elif os.path.exists(work):
        shutil.rmtree(work)  # the large cases' few hundred files do not slow later file creation
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


def profile(tag: str, out: str, stem: str, top: int = 12):
    """Sample one cold uckpt-1 run with py-spy (every thread, native frames off) and return the
    functions holding most samples (self time), with the collapsed stacks kept in ``stem``.txt."""
    drop_caches([tag])
    raw = stem + ".txt"
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    subprocess.run(["py-spy", "record", "--format", "raw", "--rate", "200", "-o", raw, "--", sys.executable, "-m",
                    "uckpt", "convert", "--input_folder", tag, "--output_folder", out, "--inject_missing_state",
                    "--quiet"], cwd=runner.REPO, env=runner.env(), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    self_time, inclusive, total = {}, {}, 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if IDLE.search(frames[-1]):
                continue  # a pool thread waiting for work (py-spy counts it as running)
            total += int(count)
            self_time[frames[-1]] = self_time.get(frames[-1], 0) + int(count)
            for frame in {fr for fr in frames if "uckpt/" in fr}:
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
    top_of = lambda d: [{"frame": k, "share": v / total} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa
    return {"samples": total, "self": top_of(self_time), "inclusive": top_of(inclusive)}


IDLE = re.compile(r"^(_worker \(concurrent/futures/thread\.py|(Condition|Event)\.wait |_wait_for_tstate_lock )")


def print_case(case, res):
    ds = res["tools"]["deepspeed"]
    floor = res["tools"].get("copy-floor")
    start = res["tools"].get("torchrun-2-startup")
    print(f"\n{case}: input {res['input_mib']:.1f} MiB, median of {res['repeat']} runs ({res['cache']}), "
          "2-core CPU machine")
    print("| tool | wall s | vs DS | vs copy floor | peak anon MiB (ranks) | vs DS | written MiB | temp MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for tool, r in res["tools"].items():
        vs_floor = f"{r['wall_s'] / floor['wall_s']:.2f}" if floor else "-"
        print(f"| {tool} | {r['wall_s']:.2f} | {r['wall_s'] / ds['wall_s']:.2f} | {vs_floor} | "
              f"{r['peak_ranks_anon_mib']:.0f} | {r['peak_ranks_anon_mib'] / ds['peak_ranks_anon_mib']:.2f} | "
              f"{r.get('written_mib', 0):.0f} | {r.get('temp_mib', 0):.1f} |")
    if start:
        for tool in ("uckpt-2", "uckpt-2-256MB"):
            net = res["tools"][tool]["wall_s"] - start["wall_s"]
            print(f"{tool} less the bare start-up ({start['wall_s']:.2f} s): {net:.2f} s = "
                  f"{net / res['tools']['uckpt-1' + tool[7:]]['wall_s']:.2f} x uckpt-1{tool[7:]}")
    phased = [t for t, r in res["tools"].items() if "phases_s" in r]
    print("\nper phase, seconds (rank 0's clock, median over the rounds)")
    print("| phase | " + " | ".join(phased) + " |")
    print("|---|" + "---|" * len(phased))
    for ph in PHASES:
        print(f"| {ph} | " + " | ".join(f"{res['tools'][t]['phases_s'][ph]:.2f}" for t in phased) + " |")
    if "profile" in res:
        for kind in ("self", "inclusive"):
            print(f"\nprofile of a cold uckpt-1 run ({res['profile']['samples']} busy samples, every thread; {kind} "
                  f"time{', uckpt frames' if kind == 'inclusive' else ''})")
            for row in res["profile"][kind]:
                print(f"  {row['share'] * 100:5.1f}%  {row['frame']}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
