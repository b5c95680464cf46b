"""``uckpt plan --simulate``: the conversion plan of a synthetic checkpoint at many converter sizes.

The layout's metadata is written from DeepSpeed's partition rules
(:mod:`uckpt.dsformat.synthetic`), then the real index, plan and cost model run on it
(:mod:`uckpt.conversion.costs`), so what it prints for N ranks is what a conversion of that
checkpoint on N ranks would read, send and write, rank by rank.
"""
import json
import sys
from typing import Any, Dict, List

from ..conversion.costs import Bandwidth, as_dicts, predicted_seconds, rank_costs, written_numel
from ..conversion.plan import make_plan, param_bytes
from ..dsformat import synthetic
from ..dsformat.index import build_index
from ..errors import UckptError
from ..options import SimulateConfig

GB = 1e9


def parse_ranks(text: str) -> List[int]:
    try:
        ranks = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise UckptError(f"--ranks {text!r} is not a list of positive converter sizes", fix="e.g. --ranks 1,2,4,8")
    return ranks


def _summary(rows, key: str) -> Dict[str, float]:
    values = [getattr(r, key) for r in rows]
    mean = sum(values) / len(values)
    return {"max": max(values), "mean": mean, "imbalance": max(values) / mean if mean else 1.0}


def handled(row: Dict[str, int]) -> int:
    """Bytes one rank moves: read from its files, received from other ranks, written."""
    return row["read_bytes"] + row["received_bytes"] + row["written_bytes"]


def scaling_limit(points: List[Dict[str, Any]], plan_items: Dict[str, int]) -> Dict[str, Any]:
    """The first converter size after which doubling cuts the busiest rank's bytes (read, received and
    written) by less than 10%, and the indivisible piece of work that bounds that rank: a model file
    one rank copies, an optimizer file one rank reads, or a parameter one rank assembles and writes."""
    limit = None
    busiest = lambda p: max(handled(r) for r in p["per_rank"])  # noqa: E731
    for a, b in zip(points, points[1:]):
        if b["ranks"] >= 2 * a["ranks"] and busiest(b) > 0.9 * busiest(a):
            limit = a
            break
    bound, nbytes = max(plan_items.items(), key=lambda kv: kv[1])
    return {"ranks": limit["ranks"] if limit else None, "busiest_rank_bytes": busiest(limit) if limit else None,
            "bound": bound, "bound_bytes": nbytes}


def simulate(cfg: SimulateConfig) -> Dict[str, Any]:
    layout = synthetic.layout(cfg.simulate, cfg.pp)
    par = synthetic.Parallel(cfg.dp, cfg.tp, cfg.pp, cfg.zero_stage, synthetic.Dtype(cfg.dtype), ep=cfg.ep,
                             data_before_ep=cfg.data_before_ep)
    files, metas = synthetic.synthesize(layout, par)
    index = build_index(files, metas, inject_missing_state=True)
    bw = Bandwidth(cfg.read_gbps * GB, cfg.write_gbps * GB, cfg.net_gbps * GB)
    budget = int(cfg.memory.budget_mb) << 20
    largest_file = max(s.nbytes for s in files.sources)
    unread = files.unread_share(0, 1)  # the layer and per-expert files
    largest_param = param_bytes(max(p.numel for p in index.params))
    # the indivisible pieces of work (bytes in and out of one rank), one of which bounds the busiest rank
    copies = [files.sources[i].nbytes for i in index.copy_sources]
    items = {"a model-file copy": 2 * max(copies),
             "an optimizer file read": max(s.nbytes for s in files.optim_sources()),
             "one parameter's assembly and write": max(param_bytes(p.numel + written_numel(p)) for p in index.params)}
    out: Dict[str, Any] = {
        "layout": cfg.simulate, "dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "ep": cfg.ep, "zero_stage": cfg.zero_stage,
        "dtype": cfg.dtype, "files": len(files.sources), "input_bytes": files.total_bytes,
        "unread_files": len(unread), "unread_bytes": sum(map(files.unread_nbytes, unread)),
        "params": len(index.params), "elements": index.total_numel, "largest_file_bytes": largest_file,
        "largest_param_bytes": largest_param, "budget_bytes": budget,
        "bandwidth_gbps": {"read": cfg.read_gbps, "write": cfg.write_gbps, "network": cfg.net_gbps}, "points": []}
    quiet = cfg.log.quiet
    if not quiet:
        print(f"{cfg.simulate}: ZeRO-{cfg.zero_stage} {cfg.dtype}, dp={cfg.dp} tp={cfg.tp} pp={cfg.pp} ep={cfg.ep}: "
              f"{len(files.sources)} files, {files.total_bytes / GB:.1f} GB"
              + (f" (and {len(unread)} layer / expert files, {out['unread_bytes'] / GB:.1f} GB, which "
                 "only the CRC pass reads)" if unread else "")
              + f", {len(index.params)} parameters "
              f"({index.total_numel / 1e9:.2f} B elements); largest file {largest_file / GB:.2f} GB, largest "
              f"parameter {largest_param / GB:.2f} GB of states; budget {cfg.memory.budget_mb} MiB per rank")
        print(f"{'ranks':>6} {'waves':>5} {'calls':>5} {'read GB max/mean':>17} {'written GB max/mean':>20} "
              f"{'sent GB max/mean':>17} {'imbal r/w':>9} {'peak buf GB':>11} {'time s':>8}")
    for n in parse_ranks(cfg.ranks):
        plan = make_plan(index, n, budget)
        rows = rank_costs(index, plan)
        point = {"ranks": n, "waves": len(plan.waves), "collective_calls": rows[0].collective_calls,
                 "read_bytes": _summary(rows, "read_bytes"), "written_bytes": _summary(rows, "written_bytes"),
                 "sent_bytes": _summary(rows, "sent_bytes"),
                 "peak_buffer_bytes": max(r.peak_buffer_bytes for r in rows),
                 "predicted_s": predicted_seconds(index, plan, bw, rows), "per_rank": as_dicts(rows)}
        out["points"].append(point)
        if not quiet:
            r, w, s = point["read_bytes"], point["written_bytes"], point["sent_bytes"]
            print(f"{n:>6} {point['waves']:>5} {point['collective_calls']:>5} "
                  f"{r['max'] / GB:>8.2f}/{r['mean'] / GB:<8.2f} {w['max'] / GB:>9.2f}/{w['mean'] / GB:<10.2f} "
                  f"{s['max'] / GB:>8.2f}/{s['mean'] / GB:<8.2f} {r['imbalance']:>4.1f}/{w['imbalance']:<4.1f} "
                  f"{point['peak_buffer_bytes'] / GB:>11.2f} {point['predicted_s']:>8.1f}")
    limit = out["scaling_limit"] = scaling_limit(out["points"], items)
    if not quiet:
        if limit["ranks"]:
            print(f"scaling stops near {limit['ranks']} ranks: the busiest rank moves "
                  f"{limit['busiest_rank_bytes'] / GB:.2f} GB (read, received, written), bounded by {limit['bound']} "
                  f"({limit['bound_bytes'] / GB:.2f} GB through one rank: files have one reader, parameters one "
                  "owner); past that, added ranks get no bytes to move")
        else:
            print(f"the busiest rank's bytes still fall at {out['points'][-1]['ranks']} ranks")
    if cfg.log.json:
        with open(cfg.log.json, "w") as f:
            json.dump(out, f, indent=2)
    sys.stdout.flush()
    return out
