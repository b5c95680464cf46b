#!/usr/bin/env python
"""The scaling model at training-cluster sizes: ``uckpt plan --simulate`` for Llama-style 8B, 70B
and 405B checkpoints and a Mixtral 8x7B one saved with AutoEP at N = 1 ... 1,024 converter ranks, drawn as one PNG (docs/scaling.png).

Left: the busiest rank's bytes (read, received and written) and the mean rank's, against N; right: the
predicted time under the given per-rank bandwidths. The model behind both is checked rank by rank
against real conversions by tests/integration/test_simulate.py; this script only plots it.

    python scripts/bench_scaling.py [--read_gbps 2] [--write_gbps 1] [--net_gbps 10] [--png docs/scaling.png]
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from uckpt import options  # noqa: E402
from uckpt.tools.simulate import handled, simulate  # noqa: E402

# the saving job of each: sizes such checkpoints are trained at
LAYOUTS = {
    "llama-8b": {"dp": 64, "tp": 1, "pp": 1, "zero_stage": 2},
    "llama-70b": {"dp": 32, "tp": 8, "pp": 1, "zero_stage": 1},
    "llama-405b": {"dp": 8, "tp": 8, "pp": 16, "zero_stage": 1},
    "mixtral-8x7b": {"dp": 64, "ep": 8, "zero_stage": 2},
}
RANKS = "1,2,4,8,16,32,64,128,256,512,1024"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--read_gbps", type=float, default=2.0)
    ap.add_argument("--write_gbps", type=float, default=1.0)
    ap.add_argument("--net_gbps", type=float, default=10.0)
    ap.add_argument("--budget_mb", type=int, default=4096)
    ap.add_argument("--png", default=os.path.join(os.path.dirname(HERE), "docs", "scaling.png"))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(HERE), "runs", "bench", "scaling.json"))
    args = ap.parse_args()
    results = {}
    for name, par in LAYOUTS.items():
        cfg = options.build(values={"simulate": name, "ranks": RANKS, "read_gbps": args.read_gbps,
                                    "write_gbps": args.write_gbps, "net_gbps": args.net_gbps,
                                    "memory": {"budget_mb": args.budget_mb}, **par},
                            schema=options.SimulateConfig)
        results[name] = simulate(cfg)
        print()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "points"} | {"points": [
            {kk: vv for kk, vv in p.items() if kk != "per_rank"} for p in v["points"]]} for k, v in results.items()},
                  f, indent=2)
    plot(results, args)


def plot(results, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for (name, sim), color in zip(results.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        ns = [p["ranks"] for p in sim["points"]]
        busiest = [max(handled(r) for r in p["per_rank"]) / 1e9 for p in sim["points"]]
        mean = [sum(handled(r) for r in p["per_rank"]) / len(p["per_rank"]) / 1e9 for p in sim["points"]]
        label = f"{name} (dp={sim['dp']} tp={sim['tp']} pp={sim['pp']} ep={sim['ep']}, ZeRO-{sim['zero_stage']})"
        left.plot(ns, busiest, "o-", color=color, label=label + ": busiest rank")
        left.plot(ns, mean, "--", color=color, alpha=0.6, label=name + ": mean rank (1/N)")
        right.plot(ns, [p["predicted_s"] for p in sim["points"]], "o-", color=color, label=name)
        if sim["scaling_limit"]["ranks"]:
            left.axvline(sim["scaling_limit"]["ranks"], color=color, lw=0.8, ls=":")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("converter ranks N")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("GB read + received + written per rank")
    left.set_title("bytes per rank (dotted: where scaling stops)")
    right.set_ylabel("predicted seconds")
    right.set_title(f"predicted time: {args.read_gbps:g} GB/s read, {args.write_gbps:g} GB/s write, "
                    f"{args.net_gbps:g} GB/s network per rank", fontsize=9)
    left.legend(fontsize=7)
    right.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.png), exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
