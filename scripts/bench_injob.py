#!/usr/bin/env python
"""Benchmark: a Universal checkpoint written by the training job itself vs saved natively and converted.

In one torchrun job (real DeepSpeed on CPU, ZeRO-2 bf16, DP=--nproc; the benchmark's large-tensors
model by default: a few hundred MB of optimizer state), after one training step, alternately (the
order rotated each round):
  (a) engine.save_checkpoint + uckpt.convert (the converter on the same ranks, in process: no start-up);
  (b) uckpt.save_universal(blocking=True);
  (c) uckpt.save_universal(blocking=False): the time training is blocked (call to return), and the total.
Times are the slowest rank's. The outputs of (b) and (c) are checked against (a)'s once.

    python scripts/bench_injob.py [--repeat 3] [--nproc 2] [--layers 6 --hidden 2048]
"""
import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _worker(args):
    import torch
    import torch.distributed as dist
    import deepspeed

    import uckpt
    from uckpt.tools.compare import compare_universal
    from examples.tiny_train import TinyLM, batch, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.hidden, args.layers)
    cfg = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "Adam", "params": {"torch_adam": True, "lr": 1e-3}},
           "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)
    data = batch(0, 2 * world, 8, args.vocab)[2 * rank:2 * rank + 2]
    loss = torch.nn.functional.cross_entropy(engine(data[:, :-1]).float().reshape(-1, args.vocab),
                                             data[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()
    state_bytes = sum(12 * p.numel() for p in model.parameters() if p.requires_grad)
    quiet = {"log": {"quiet": True}}

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def rss(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def reset_peak() -> int:
        """Reset this process's peak RSS to its current RSS (Linux: clear_refs 5); returns it."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return rss("VmRSS")

    def run(mode: str, out: str):
        result = _run(mode, out)
        t = torch.tensor([float(rss("VmHWM") - base[0])], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        result["peak_added"] = float(t.item())
        return result

    base = [0]

    def _run(mode: str, out: str):
        gc.collect()
        dist.barrier()
        base[0] = reset_peak()
        t0 = time.monotonic()
        if mode == "a":
            engine.save_checkpoint(os.path.join(out, "native"), tag="t")
            uckpt.convert(os.path.join(out, "native", "t"), os.path.join(out, "u"), inject_missing_state=True, **quiet)
            return {"total": slowest(time.monotonic() - t0)}
        if mode == "b":
            uckpt.save_universal(engine, out, tag="u", **quiet)
            return {"total": slowest(time.monotonic() - t0)}
        handle = uckpt.save_universal(engine, out, tag="u", blocking=False, **quiet)
        blocked = time.monotonic() - t0
        parts = handle.wait()["in_job"]
        total = time.monotonic() - t0
        return {"blocked": slowest(blocked), "total": slowest(total),
                **{k: slowest(parts[k]) for k in ("prepare_s", "capture_s", "snapshot_s")}}

    times = {m: [] for m in "abc"}
    for r in range(args.repeat):
        order = "abc"[r % 3:] + "abc"[:r % 3]
        for mode in order:
            out = os.path.join(args.root, f"r{r}-{mode}")
            times[mode].append(run(mode, out))
        if r == 0 and rank == 0:
            a = os.path.join(args.root, "r0-a", "u")
            for mode in "bc":
                diffs = compare_universal(os.path.join(args.root, f"r0-{mode}", "u"), a)
                assert diffs == [], (mode, diffs[:3])
        dist.barrier()
        if rank == 0:  # keep the disk from filling: earlier rounds' outputs go
            for mode in "abc":
                if r > 0:
                    shutil.rmtree(os.path.join(args.root, f"r{r}-{mode}"), ignore_errors=True)
    if rank == 0:
        med = {m: {k: statistics.median(t[k] for t in times[m]) for k in times[m][0]} for m in "abc"}
        a = med["a"]["total"]
        mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
        rows = [("(a) save_checkpoint + uckpt convert", med["a"]["total"], 1.0, mib(med["a"]["peak_added"])),
                ("(b) save_universal, blocking", med["b"]["total"], med["b"]["total"] / a, mib(med["b"]["peak_added"])),
                ("(c) save_universal, background: blocked", med["c"]["blocked"], med["c"]["blocked"] / a, ""),
                ("(c) save_universal, background: total", med["c"]["total"], med["c"]["total"] / a,
                 mib(med["c"]["peak_added"]))]
        print(f"optimizer state {state_bytes / 2**20:.0f} MiB ({state_bytes / world / 2**20:.0f} MiB per rank), "
              f"DP={world}, median of {args.repeat} round(s)")
        print("| mode | wall time | vs (a) | peak RSS added, largest rank |\n|---|---|---|---|")
        for label, t, ratio, peak in rows:
            print(f"| {label} | {t:.2f} s | {ratio:.2f} | {peak} |")
        print("background, blocked per round (the first pays for fresh host memory; later saves reuse it): "
              + ", ".join(f"{t['blocked']:.3f} s" for t in times["c"]))
        c = med["c"]
        print(f"background call, slowest rank: prepare (join, checks) {c['prepare_s']:.3f} s, capture "
              f"(DeepSpeed's save_checkpoint into memory) {c['capture_s']:.3f} s, snapshot {c['snapshot_s']:.3f} s")
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"state_bytes": state_bytes, "world": world, "rounds": times, "median": med}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--root", default=os.path.join(os.path.dirname(HERE), ".cache", "bench-injob"))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(HERE), "runs", "bench", "injob.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    from examples import runner

    shutil.rmtree(args.root, ignore_errors=True)
    os.makedirs(args.root)
    argv = [a for a in sys.argv[1:]]
    proc = runner.run(runner.torchrun_cmd(args.nproc, [os.path.abspath(__file__), "--worker", *argv]), timeout=3600)
    print("\n".join(line for line in proc.stdout.splitlines()
                    if line.startswith(("|", "optimizer state", "background"))))
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
