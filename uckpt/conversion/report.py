"""The conversion report: what was converted, the plan, per-phase timings and per-rank I/O. Rank 0
writes it as ``uckpt_report.json`` into the output and, with ``log.json``, to a file of the user's."""
import json
import os
import resource
from typing import Any, Dict, List

from .. import __version__
from ..dsformat import constants as C
from ..dsformat.index import CheckpointIndex
from ..options import ConvertConfig, to_plain
from .plan import ConvertPlan


def header(cfg: ConvertConfig, index: CheckpointIndex, plan: ConvertPlan, backend: str, source: str) -> Dict[str, Any]:
    """What every rank knows once the plan is made (``source``: the input folder, or an in-job save)."""
    files = index.files
    return {
        "uckpt_version": __version__,
        "input_folder": source,
        "output_folder": os.path.abspath(cfg.output_folder),
        "checkpoint": {"family": index.family, "zero_stage": index.zero_stage, "dp": index.dp_degree,
                       "tp": index.tp_degree, "pp": index.pp_degree, "files": len(files.sources),
                       "bytes": files.total_bytes, "params": len(index.params), "elements": index.total_numel,
                       "fp32_only_folders": len(index.fallbacks), "tied_aliases": dict(index.aliases),
                       "injected_universal_checkpoint_info": index.injected_uc_info},
        "plan": {"world_size": plan.world_size, "waves": len(plan.waves), "budget_bytes": plan.budget_bytes,
                 "ranks": plan.rank_summary(index)},
        "backend": backend,
        "notes": list(index.notes),  # warnings, e.g. AutoEP expert moments skipped
    }


def rank_io(rank: int, opened: List[str], read_bytes: int, written_bytes: int, files_written: int,
            io: Dict[str, int], crc_checked_bytes: int, payload_bytes: int = 0, sent_bytes: int = 0,
            collective_calls: int = 0) -> Dict[str, Any]:
    """One rank's row of ``report["ranks"]``; ``io``: what this run added to the codec's counters
    (bytes asked of the file system, bytes written directly and buffered). ``payload_bytes``: tensor
    bytes written (and files copied), ``sent_bytes``: fragment bytes sent to other ranks,
    ``collective_calls``: collectives joined before this report was gathered; the three that
    :mod:`uckpt.conversion.costs` predicts from the plan alone."""
    return {"rank": rank, "opened": opened, "read_bytes": read_bytes, "written_bytes": written_bytes,
            "files_written": files_written, "payload_bytes": payload_bytes, "sent_bytes": sent_bytes,
            "collective_calls": collective_calls, "io": io, "crc_checked_bytes": crc_checked_bytes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def write(folder: str, report: Dict[str, Any], cfg: ConvertConfig):
    report["config"] = to_plain(cfg)
    text = json.dumps(report, indent=2, default=str)
    with open(os.path.join(folder, C.REPORT_FILE), "w") as f:
        f.write(text)
    if cfg.log.json:
        with open(cfg.log.json, "w") as f:
            f.write(text)
