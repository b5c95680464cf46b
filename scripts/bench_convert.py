#!/usr/bin/env python
"""Benchmark: uckpt convert vs DeepSpeed's ds_to_universal.py on real ZeRO-2 bf16 DP=4 checkpoints.

Builds (once, cached under .cache/bench/) two checkpoints with real DeepSpeed on CPU:
  small-tensors: hundreds of layers of tiny tensors;
  large-tensors: a few large layers (hundreds of MB of optimizer state);
  xl-tensors: a few larger layers (about 1 GB of optimizer state).
Runs ds_to_universal.py (its default workers) and uckpt with 1 and 2 ranks alternately, --repeat
times each (the order rotated each round), and prints median wall time, peak memory summed over all processes of the run
(RSS, and anonymous RSS which excludes mapped file pages), and temporary bytes written.
Temporary bytes: DeepSpeed's temp folder (its timed runs keep it, --keep_temp_folder); for uckpt,
every byte its ranks report writing minus the bytes of the final output. Outputs are checked
against DeepSpeed's after the timed runs, and deleted only at the end (see settle()).

    python scripts/bench_convert.py [--repeat 3] [--only small-tensors]
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Optional

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from uckpt.tools.compare import compare_universal  # noqa: E402
from examples import runner  # noqa: E402

CASES = {
    "small-tensors": ["--layers", "800", "--hidden", "64", "--vocab", "64"],
    "large-tensors": ["--layers", "6", "--hidden", "2048", "--vocab", "256"],
    # beyond the two cases the issue names: where data, not process start-up, dominates
    "xl-tensors": ["--layers", "8", "--hidden", "3072", "--vocab", "256"],
}
TIED_ALIAS = os.path.join("zero", "head.weight", "fp32.pt")


def build(case: str, root: str) -> str:
    key = hashlib.sha256(" ".join(CASES[case]).encode()).hexdigest()[:10]  # cached by configuration
    return runner.cached_checkpoint(os.path.join(root, f"{case}-{key}", "native"), 4,
                                    ["--zero-stage", "2", "--dtype", "bf16", "--steps", "1", *CASES[case]],
                                    "examples.tiny_train")


def _tree_memory(proc: psutil.Process):
    rss = anon = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            with open(f"/proc/{p.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            rss += int(fields["VmRSS"].split()[0]) * 1024
            # anonymous memory, and shared anonymous memory (RssShmem), which would hide a MAP_SHARED buffer
            anon += (int(fields["RssAnon"].split()[0]) + int(fields["RssShmem"].split()[0])) * 1024
        except (FileNotFoundError, ProcessLookupError, KeyError, psutil.NoSuchProcess):
            pass
    return rss, anon


def measure(cmd):
    """Run ``cmd``; return (wall seconds, peak summed RSS, peak summed anonymous RSS)."""
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, cwd=runner.REPO, env=runner.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = psutil.Process(popen.pid)
    peak = [0, 0]
    out = []
    reader = threading.Thread(target=lambda: out.append(popen.stdout.read()), daemon=True)
    reader.start()
    while popen.poll() is None:
        rss, anon = _tree_memory(proc)
        peak = [max(peak[0], rss), max(peak[1], anon)]
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    reader.join()
    if popen.returncode != 0:
        raise runner.JobError(cmd, popen.returncode, (out[0] if out else b"").decode(errors="replace"))
    return wall, peak[0], peak[1]


def settle(previous: Optional[str]):
    """Flush the previous run's dirty pages, drop its output from the page cache, and give the disk a
    moment: every tool starts from the same state (the input cached, free memory for its output).

    Nothing is deleted between runs: every output (and DeepSpeed's temp folder, kept by
    --keep_temp_folder) stays until the benchmark ends. On a journal-less ext4 such as this
    machine's disk, the kernel avoids reusing an inode for 60 s after its deletion, 300 s while its
    inode-table block is dirty (fs/ext4/ialloc.c: recently_deleted), and each new inode scans past
    those; right after thousands of files were deleted, creating files in the same block groups ran
    2-3x slower here (perf: most time in recently_deleted). Deleting between runs would charge that
    to whichever tool runs next. DeepSpeed is spared deleting its temp folder inside its timed run.
    """
    subprocess.run(["sync"], check=False)
    if previous:
        for r, _, names in os.walk(previous):
            for n in names:
                fd = os.open(os.path.join(r, n), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    time.sleep(2)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=sorted(CASES))
    ap.add_argument("--root", default=os.path.join(runner.REPO, ".cache", "bench"))
    ap.add_argument("--json", default=os.path.join(runner.REPO, "runs", "bench", "results.json"))
    args = ap.parse_args()
    results = {}
    work = os.path.join(args.root, "out")
    if os.path.exists(work):
        print(f"removing {work}, left by an interrupted benchmark", flush=True)
        remove_outputs(work, args.root)
    wait_for_inode_reuse(args.root)
    previous = None  # the folder of the last timed run
    for case in [args.only] if args.only else list(CASES):
        tag = build(case, args.root)
        in_bytes = folder_bytes(tag)
        tools = {
            # --keep_temp_folder: its temp files are counted, and not deleted inside the timed run (see settle())
            "deepspeed": lambda out: [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                      tag, "--output_folder", out, "--inject_missing_state", "--keep_temp_folder"],
            "uckpt-1": lambda out: [sys.executable, "-m", "uckpt", "convert", "--input_folder", tag, "--output_folder",
                                    out, "--inject_missing_state", "--quiet"],
            # the cost of checking every input record's CRC-32 (on by default)
            "uckpt-1-nocrc": lambda out: [sys.executable, "-m", "uckpt", "convert", "--input_folder", tag,
                                          "--output_folder", out, "--inject_missing_state", "--quiet",
                                          "--no_verify_crc"],
            "uckpt-1-256MB": lambda out: [sys.executable, "-m", "uckpt", "convert", "--input_folder", tag,
                                          "--output_folder", out, "--inject_missing_state", "--quiet",
                                          "--memory_budget_mb", "256"],
            "uckpt-2": lambda out: runner.torchrun_cmd(2, ["-m", "uckpt", "convert", "--input_folder", tag,
                                                           "--output_folder", out, "--inject_missing_state", "--quiet"]),
        }
        runs = {t: [] for t in tools}
        names = list(tools)
        outputs = lambda tool, i: os.path.join(work, case, f"{tool}-{i}", "universal")  # noqa: E731
        for i in range(args.repeat):
            # rotate the order each round, so that no tool always runs right after another one
            for tool in names[i % len(names):] + names[:i % len(names)]:
                settle(previous)
                runs[tool].append(measure(tools[tool](outputs(tool, i))))
                previous = os.path.dirname(outputs(tool, i))
        # checked after the timed runs, against DeepSpeed's last timed output (its tmp/ folder left out)
        ref = outputs("deepspeed", args.repeat - 1)
        runs["deepspeed:temp"] = folder_bytes(os.path.join(ref, "tmp"))
        for tool in names[1:]:
            out = outputs(tool, args.repeat - 1)
            diffs = compare_universal(out, ref, skip=lambda rel: rel == TIED_ALIAS or rel.startswith("tmp" + os.sep))
            assert not diffs, (tool, diffs[:5])
            report = json.load(open(os.path.join(out, "uckpt_report.json")))
            written = sum(r["written_bytes"] for r in report["ranks"])
            runs[tool + ":temp"] = written - (folder_bytes(out) - os.path.getsize(
                os.path.join(out, "uckpt_report.json")))
        row = {}
        for tool in tools:
            walls, rss, anon = zip(*runs[tool])
            row[tool] = {"wall_s": statistics.median(walls), "peak_rss_mib": max(rss) / 2**20,
                         "peak_anon_mib": max(anon) / 2**20, "temp_mib": runs[tool + ":temp"] / 2**20,
                         "walls": walls}
        results[case] = {"input_mib": in_bytes / 2**20, "tools": row}
        print_case(case, results[case], args.repeat)
    remove_outputs(work, args.root)  # nothing is deleted before every run is done, see settle()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


def print_case(case, res, repeat):
    ds = res["tools"]["deepspeed"]
    print(f"\n{case}: input {res['input_mib']:.1f} MiB, median of {repeat} runs, 2-core CPU machine")
    print("| tool | wall s | vs DS | peak RSS MiB (sum) | vs DS | peak anon MiB (sum) | vs DS | temp MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for tool, r in res["tools"].items():
        print(f"| {tool} | {r['wall_s']:.2f} | {r['wall_s'] / ds['wall_s']:.2f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] / ds['peak_rss_mib']:.2f} | {r['peak_anon_mib']:.0f} | "
              f"{r['peak_anon_mib'] / ds['peak_anon_mib']:.2f} | {r['temp_mib']:.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
