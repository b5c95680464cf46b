#!/usr/bin/env python
"""The CUDA / NCCL path, end to end, on a machine with one or more NVIDIA GPUs (the tests run on CPU).

1. Train the tiny model with DeepSpeed on the GPU (ZeRO-2, bf16, NCCL) and save.
2. Convert with ``uckpt.convert`` inside an NCCL process group (fragments travel as CUDA
   tensors), and with ``torchrun -m uckpt convert`` (backend auto); compare both with
   DeepSpeed's ``ds_to_universal.py`` output.
3. Save in-job from the GPU (``uckpt.save_universal``, blocking over NCCL and in the background with
   the live state overwritten while it converts); compare each with ``save_checkpoint`` of the same
   state followed by ``ds_to_universal.py``.
4. Resume on the GPU at ZeRO-1 with DeepSpeed's ``load_universal`` and with
   ``uckpt.load_into_engine``, and at ZeRO-3 with uckpt's (DeepSpeed 0.19.8 refuses a ZeRO-2-made
   Universal checkpoint there): same fp32 parameters, Adam moments and step; same next losses at ZeRO-1.
5. Timed, at scale (``--no-scale`` skips it): the 2.7 GB ZeRO-2 checkpoint of scripts/bench_convert.py
   (zero2-3gb, trained on this machine's CPUs at DP=4), converted cold by ``ds_to_universal.py``, by
   uckpt in one process and by ``torchrun`` with 4 ranks, then loaded into a DP=1 engine on the GPU
   by DeepSpeed's ``load_universal`` and by ``uckpt.load_into_engine`` (same state required), for the
   README next to the 2-core CPU figures.

    python scripts/gpu_check.py [--work /tmp/uckpt-gpu] [--ranks N] [--no-scale]

Prints one line per check and ``GPU CHECK: PASS`` at the end (exit 0), else the failures (exit 1).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# DeepSpeed writes the tied alias from the lp weight, uckpt from the fp32 master (README: differences)
TIED_ALIAS = os.path.join("zero", "head.weight", "fp32.pt")


def _run(cmd, **kw):
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "scripts")]))  # uckpt, examples
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, time.perf_counter() - t0


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def convert_worker(tag, out, report_path):
    """Under torchrun: an NCCL process group owned by the caller, as in a training job."""
    import torch
    import torch.distributed as dist

    import uckpt

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    t0 = time.perf_counter()
    report = uckpt.convert(tag, out, inject_missing_state=True, log={"quiet": True})
    seconds = time.perf_counter() - t0
    if dist.get_rank() == 0:
        with open(report_path, "w") as f:
            json.dump({"backend": report["backend"], "world": dist.get_world_size(), "seconds": seconds}, f)
    dist.barrier()
    dist.destroy_process_group()


def _same_state(a, b):
    import torch
    problems = []
    if a["global_steps"] != b["global_steps"] or set(a["step"]) != set(b["step"]) or not a["step"]:
        problems.append(f"steps {a['global_steps']}/{a['step']} vs {b['global_steps']}/{b['step']}")
    for key in ("params", "exp_avg", "exp_avg_sq"):
        if a[key].keys() != b[key].keys() or not a[key]:
            problems.append(f"{key}: different parameter names")
            continue
        problems += [f"{key}[{n}] differs" for n in a[key] if not torch.equal(a[key][n], b[key][n])]
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/uckpt-gpu")
    ap.add_argument("--ranks", type=int, default=0, help="converter ranks for the NCCL run (default: GPU count)")
    ap.add_argument("--no-scale", dest="scale", action="store_false", help="skip the timed multi-GB conversion and load")
    ap.add_argument("--scale-only", action="store_true", help="run step 5 alone (with or without a GPU)")
    ap.add_argument("--scale-cache", help="where the 2.7 GB checkpoint is built and cached (default: under --work)")
    ap.add_argument("--convert-worker", nargs=3, metavar=("TAG", "OUT", "REPORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.convert_worker:
        return convert_worker(*args.convert_worker)

    import torch

    from uckpt.tools.compare import compare_universal

    if args.scale_only:
        failures = []
        os.makedirs(args.work, exist_ok=True)
        scale(lambda *p: os.path.join(args.work, *p), failures, args.scale_cache)
        print("SCALE CHECK: " + ("PASS" if not failures else "FAIL " + ", ".join(failures)), flush=True)
        return 0 if not failures else 1
    if not torch.cuda.is_available():
        print("GPU CHECK: no CUDA device here", flush=True)
        return 1
    gpus = torch.cuda.device_count()
    ranks = args.ranks or gpus
    print(f"torch {torch.__version__}, {gpus} x {torch.cuda.get_device_name(0)}, NCCL "
          f"{'.'.join(map(str, torch.cuda.nccl.version()))}", flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    w = lambda *p: os.path.join(args.work, *p)  # noqa: E731
    failures = []
    model = ["--layers", "4", "--hidden", "64", "--vocab", "128"]

    _, secs = _run(_torchrun(1, "-m", "examples.tiny_train", "--zero-stage", "2", "--dtype", "bf16",
                             "--steps", "3", "--save-dir", w("native"), "--tag", "step3", *model,
                             "--save-universal", w("injob"), "--inject-missing-state"))
    tag = w("native", "step3")
    print(f"trained and saved on the GPU with DeepSpeed ZeRO-2 bf16: {secs:.1f}s", flush=True)
    # the same state again, in the background, with the live GPU state overwritten while it converts
    _run(_torchrun(1, "-m", "examples.tiny_train", "--zero-stage", "2", "--dtype", "bf16", "--steps", "3",
                   "--save-dir", w("native-bg"), "--tag", "step3", *model, "--save-universal", w("injob-bg"),
                   "--inject-missing-state", "--background", "--clobber-after-save", "--report", w("bg.json")))

    _, secs = _run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag,
                    "--output_folder", w("ds", "universal"), "--inject_missing_state"])
    print(f"ds_to_universal: {secs:.1f}s", flush=True)

    _run(_torchrun(ranks, os.path.abspath(__file__), "--convert-worker", tag, w("nccl", "universal"),
                   w("nccl.json")))
    info = json.load(open(w("nccl.json")))
    diffs = compare_universal(w("nccl", "universal"), w("ds", "universal"), skip=lambda rel: rel == TIED_ALIAS)
    ok = info["backend"] == "nccl" and not diffs
    print(f"uckpt.convert in an NCCL group of {info['world']}: backend {info['backend']}, {info['seconds']:.2f}s, "
          f"{len(diffs)} differences from ds_to_universal {diffs[:3]}", flush=True)
    if not ok:
        failures.append("NCCL conversion")

    _, secs = _run(_torchrun(2, "-m", "uckpt", "convert", "--input_folder", tag, "--output_folder",
                             w("auto", "universal"), "--inject_missing_state", "--quiet"))
    report = json.load(open(w("auto", "universal", "uckpt_report.json")))
    diffs = compare_universal(w("auto", "universal"), w("ds", "universal"), skip=lambda rel: rel == TIED_ALIAS)
    print(f"torchrun -m uckpt convert, 2 ranks: backend {report['backend']}, {secs:.1f}s, {len(diffs)} differences",
          flush=True)
    if diffs:
        failures.append("torchrun conversion")

    for name, native, injob in (("blocking (NCCL)", tag, w("injob", "global_step3_universal")),
                                ("background (pinned snapshot, gloo)", w("native-bg", "step3"),
                                 w("injob-bg", "global_step3_universal"))):
        reference = w("ds-" + os.path.basename(os.path.dirname(native)))
        _run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", native,
              "--output_folder", reference, "--inject_missing_state"])
        diffs = compare_universal(injob, reference, skip=lambda rel: rel == TIED_ALIAS)
        print(f"uckpt.save_universal on the GPU, {name}: {len(diffs)} differences from save_checkpoint + "
              f"ds_to_universal {diffs[:3]}", flush=True)
        if diffs:
            failures.append(f"in-job save {name}")
    bg = json.load(open(w("bg.json.injob.json")))["in_job"]
    print(f"background save: blocked {bg['blocked_s']:.3f}s, total {bg['total_s']:.3f}s, snapshot "
          f"{bg['snapshot_bytes'] / 2**20:.1f} MiB", flush=True)

    dumps = {}
    for stage, loader, folder in (("1", "deepspeed", "ds"), ("1", "uckpt", "nccl"), ("3", "uckpt", "nccl")):
        dump, rep = w(f"z{stage}-{loader}.pt"), w(f"z{stage}-{loader}.json")
        _run(_torchrun(1, "-m", "examples.tiny_train", "--zero-stage", stage, "--dtype", "bf16",
                       "--steps", "2", "--load-dir", w(folder), "--loader", loader, "--dump-state", dump,
                       "--report", rep, *model))
        dumps[stage, loader] = (torch.load(dump, weights_only=True), json.load(open(rep))["losses"])
    ref, ref_losses = dumps["1", "deepspeed"]
    for stage in ("1", "3"):  # DeepSpeed 0.19.8 refuses a ZeRO-2-made Universal checkpoint in a ZeRO-3 engine
        state, losses = dumps[stage, "uckpt"]
        problems = _same_state(state, ref)
        if stage == "1" and losses != ref_losses:
            problems.append(f"losses {losses} vs {ref_losses}")
        print(f"resume on the GPU at ZeRO-{stage} with uckpt.load_into_engine vs ZeRO-1 with DeepSpeed's "
              f"load_universal: {'same fp32 params, moments and step' if not problems else problems[:5]}; "
              f"next losses {losses} vs {ref_losses}", flush=True)
        if problems:
            failures.append(f"resume ZeRO-{stage}")

    if args.scale:
        scale(w, failures, args.scale_cache)
    print("GPU CHECK: " + ("PASS" if not failures else "FAIL " + ", ".join(failures)), flush=True)
    return 0 if not failures else 1


def scale(w, failures, cache=None):
    """Step 5: cold conversions of the 2.7 GB checkpoint on this machine's cores and disk, and its load
    into a GPU engine by both loaders (each run's wall time; the load call's own time from the trainer)."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from bench_convert import CASES, build, drop_caches
    from uckpt.tools.compare import compare_universal

    tag = build("zero2-3gb", cache or w("scale"))  # DeepSpeed on the CPUs (DS_ACCELERATOR=cpu, gloo), DP=4
    uckpt = [sys.executable, "-m", "uckpt", "convert", "--input_folder", tag, "--inject_missing_state", "--quiet"]
    runs = {"deepspeed": [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag,
                          "--inject_missing_state"],
            "uckpt-1": uckpt, "uckpt-4": _torchrun(4, *uckpt[1:])}
    for name, cmd in runs.items():
        out = w("scale", name, "universal")
        how = drop_caches([tag])
        _, secs = _run(cmd + ["--output_folder", out])
        print(f"scale: {name} converted {tag} ({how}): {secs:.1f}s", flush=True)
    for name in ("uckpt-1", "uckpt-4"):
        diffs = compare_universal(w("scale", name, "universal"), w("scale", "deepspeed", "universal"),
                                  skip=lambda rel: rel == TIED_ALIAS)
        if diffs:
            failures.append(f"scale {name}: {diffs[:3]}")
    states = {}
    for loader in ("deepspeed", "uckpt"):
        drop_caches([w("scale", "uckpt-4")])
        dump, rep = w("scale", f"{loader}.pt"), w("scale", f"{loader}.json")
        _, secs = _run(_torchrun(1, "-m", "examples.tiny_train", "--zero-stage", "2", "--dtype", "bf16",
                                 *CASES["zero2-3gb"], "--steps", "1", "--load-dir", w("scale", "uckpt-4"),
                                 "--loader", loader, "--dump-state", dump, "--report", rep))
        info = json.load(open(rep + ".load0.json"))
        states[loader] = torch.load(dump, weights_only=True)
        where = "GPU" if torch.cuda.is_available() else "CPU"
        print(f"scale: {loader} loaded it into a DP=1 {where} engine: load call {info['load_s']:.2f}s, read "
              f"{info['rchar'] / 1e9:.2f} GB for {info['kept_bytes'] / 1e9:.2f} GB kept, added peak host memory "
              f"{info['peak_added_mib']:.0f} MiB (job {secs:.1f}s)", flush=True)
    problems = _same_state(states["uckpt"], states["deepspeed"])
    if problems:
        failures.append(f"scale load: {problems[:3]}")


if __name__ == "__main__":
    sys.exit(main())
