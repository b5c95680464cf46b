"""``uckpt export``: Hugging Face safetensors from a Universal folder, or straight from a native ZeRO /
AutoTP / AutoEP checkpoint (no Universal folder written).

From a Universal folder, the export's tensors are spread over the ranks by size (the parts of one
fused tensor together); each rank reads the ``fp32.pt`` of its own, casts and writes its files.
From a native checkpoint, the converter's plan and exchange run for the fp32 state only: each
fragment is read once, owners assemble their parameters (the parts of one fused tensor get one
owner), and hand them to this export instead of writing Universal files. Either way rank 0 numbers
the files across ranks, writes the index, copies the model's config and publishes the folder with
one rename (the converter's lock, partial folder and sync).
"""
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

from ..conversion.comm import Comm, Phase
from ..conversion.output import EXPORT_REPORT, OutputFolder, OutputKind, check_paths
from ..dsformat import constants as C
from ..conversion.durable import fsync_file
from ..conversion.plan import assign_readers
from ..dsformat.universal import deepspeed_classes, is_universal, payload_tensor, state_files
from ..errors import CheckpointError, UckptError
from ..options import ExportConfig
from ..torchsave import reader as ranged
from ..torchsave.format import materialize, shape_numel
from ..torchsave.stats import IO
from . import names as hfnames
from .shards import ShardWriter, final_names, parse_size, rename_own, write_index

HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                 "chat_template.jinja")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ExportSink:
    """Universal-named fp32 tensors in (in any order), the export's tensors out to this rank's files:
    tied aliases dropped, names mapped, fused parts held until all have come."""

    def __init__(self, targets: List[hfnames.Target], writer: ShardWriter, dtype):
        self.writer, self.dtype = writer, dtype
        self.by_part = {p: t for t in targets for p in t.parts}
        self.pending: Dict[str, Dict[str, Any]] = {}
        self.count = 0

    def wants(self, name: str) -> bool:
        return name in self.by_part

    def put(self, name: str, tensor):
        import torch

        target = self.by_part.get(name)
        if target is None:
            return
        if len(target.parts) > 1:
            held = self.pending.setdefault(target.name, {})
            held[name] = tensor
            if len(held) < len(target.parts):
                return
            parts = self.pending.pop(target.name)
            tensor = torch.cat([parts[p] for p in target.parts], dim=target.dim)
        self.writer.add(target.name, tensor.to(self.dtype))
        self.count += 1

    def close(self):
        if self.pending:  # every part of a fused tensor goes to one rank, so this means a part is missing
            raise CheckpointError(f"the parts of {', '.join(sorted(self.pending))} are not all in the checkpoint",
                                  fix="export a complete checkpoint")
        return self.writer.close()


def _model_state(folder: str) -> Dict[str, Any]:
    for name in sorted(os.listdir(folder)):
        if name.endswith(C.MODEL_FILE_SUFFIX) and (name.startswith(C.MODEL_FILE_PREFIX) or
                                                   name.startswith(C.ZERO_FILE_PREFIX + "0_")):
            return materialize(ranged.open_lazy(os.path.join(folder, name)), deepspeed_classes())
    raise CheckpointError("has no model-state file (mp_rank_00_model_states.pt)", folder,
                          "export a folder written by uckpt convert, ds_to_universal.py or engine.save_checkpoint")


def _preset(model_state: Dict[str, Any]) -> Optional[str]:
    cfg = model_state.get(C.DS_CONFIG_KEY) or {}
    ep = cfg.get("expert_parallel") if isinstance(cfg, dict) else None
    return ep.get("preset_model") if isinstance(ep, dict) else None


def _autoep_layers(model_state: Dict[str, Any]):
    return model_state.get(C.AUTOEP_LAYERS_KEY) or model_state.get(C.AUTOEP_LAYERS_KEY_LEGACY)


def _dtype(cfg: ExportConfig, model_state: Dict[str, Any]):
    import torch

    name = cfg.dtype
    if name == "auto":  # the dtype the job trained in
        ds = model_state.get(C.DS_CONFIG_KEY) or {}
        enabled = lambda key: isinstance(ds.get(key), dict) and bool(ds[key].get("enabled"))  # noqa: E731
        name = "bf16" if enabled("bf16") else "fp16" if enabled("fp16") else "fp32"
    return getattr(torch, DTYPES[name]), name


def _module_order(model_state: Dict[str, Any]) -> List[str]:
    order = list((model_state.get(C.MODULE_KEY) or {}).keys())
    for group in model_state.get(C.PARAM_SHAPES) or []:
        order += [n for n in group if n not in order]
    return order


def _shapes(model_state: Dict[str, Any]) -> Dict[str, tuple]:
    shapes = {}
    for group in model_state.get(C.PARAM_SHAPES) or []:
        shapes.update({n: tuple(s) for n, s in group.items()})
    return shapes


def _universal_tensor(folder: str, name: str, shape: Optional[tuple]):
    """A parameter's fp32 master from its ``fp32.pt``, in its module shape (a ZeRO-3-made folder keeps
    it flat)."""
    path = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER, name, C.FP32_WEIGHT_KEY + C.STATE_FILE_SUFFIX)
    tensor = payload_tensor(materialize(ranged.open_lazy(path), deepspeed_classes()), ranged.FileTensor)
    if tensor is None:
        raise CheckpointError("holds no tensor under 'param'", path)
    return shaped(tensor.load(), shape)


def shaped(value, shape):
    """``value`` in the parameter's module ``shape`` where it holds as many elements (a ZeRO-3-made
    Universal folder, and the converter's payload for it, keep the fp32 master flat)."""
    if shape is not None and tuple(value.shape) != tuple(shape) and value.numel() == shape_numel(shape):
        return value.reshape(tuple(shape))
    return value


def _config_folder(hf_config: Optional[str]) -> Optional[str]:
    """The folder of ``--hf_config`` (a folder, or its config.json), checked before any work is done."""
    if not hf_config:
        return None
    src = hf_config if os.path.isdir(hf_config) else os.path.dirname(hf_config)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise UckptError("has no config.json", src, "pass the folder holding the model's config.json")
    return src


def _copy_side_files(hf_config: Optional[str], partial: str) -> List[str]:
    src = _config_folder(hf_config)
    copied = []
    for name in HF_SIDE_FILES if src else ():
        if os.path.isfile(os.path.join(src, name)):
            dst = os.path.join(partial, name)
            shutil.copyfile(os.path.join(src, name), dst)
            fsync_file(dst)
            copied.append(name)
    return copied


def _write_report(folder: str, report: Dict[str, Any]):
    import json

    path = os.path.join(folder, EXPORT_REPORT)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    fsync_file(path)


def export(cfg: ExportConfig, comm: Comm, stream=None) -> Dict[str, Any]:
    """Export ``cfg.input_folder`` (Universal or native) into ``cfg.output_folder`` on all ranks of ``comm``."""
    t0, io0 = time.monotonic(), IO.snapshot()
    timings: Dict[str, float] = {}
    log = (lambda msg: print(f"[uckpt] {msg}", file=stream or sys.stderr, flush=True)) \
        if comm.rank == 0 and not cfg.log.quiet else (lambda msg: None)
    with Phase(comm, timings, "discover"):
        check_paths(cfg.input_folder, cfg.output_folder, cfg.overwrite, OutputKind.HF_EXPORT)
        _config_folder(cfg.hf_config)
        universal = is_universal(cfg.input_folder)
    run_id = comm.all_gather_object(os.urandom(8).hex())[0]
    out = OutputFolder(cfg.output_folder, run_id=run_id, overwrite=cfg.overwrite, kind=OutputKind.HF_EXPORT)
    try:
        with Phase(comm, timings, "prepare_output"):
            if comm.rank == 0:
                out.prepare(None, True)
        comm.barrier()
        writer = ShardWriter(out.partial, comm.rank, parse_size(cfg.max_shard_size))
        if universal:
            order, dtype_name, count = _from_universal(cfg, comm, writer, timings, log)
        else:
            from .native import export_native

            order, dtype_name, count = export_native(cfg, comm, writer, timings, log)
        with Phase(comm, timings, "index"):
            per_rank = comm.all_gather_object(writer.files)
            names = final_names(per_rank)
            rename_own(out.partial, writer.files, names)
        comm.barrier()
        report = {"input_folder": os.path.abspath(cfg.input_folder), "output_folder": os.path.abspath(cfg.output_folder),
                  "source": "universal" if universal else "native", "dtype": dtype_name,
                  "tensors": sum(len(t) for files in per_rank for _, t, _ in files), "files": len(names),
                  "bytes": sum(b for files in per_rank for _, _, b in files)}
        with Phase(comm, timings, "publish"):
            if comm.rank == 0:
                write_index(out.partial, per_rank, names, order)
                report["side_files"] = _copy_side_files(cfg.hf_config, out.partial)
                _write_report(out.partial, report)  # also what marks the folder as an export (overwrite)
                out.finish()
        report["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
        report["total_s"] = round(time.monotonic() - t0, 4)
        report["ranks"] = comm.all_gather_object({"rank": comm.rank, "io": IO.since(io0), "tensors": count})
    except BaseException:
        if comm.rank == 0:
            out.abort()
        raise
    finally:
        out.close()
    log(f"exported {report['tensors']} tensors ({report['bytes'] / 2**20:.1f} MiB, {dtype_name}) in "
        f"{report['files']} file(s) -> {out.final} in {report['total_s']:.2f}s")
    if cfg.log.json and comm.rank == 0:
        import json

        with open(cfg.log.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return report


def _from_universal(cfg: ExportConfig, comm: Comm, writer: ShardWriter, timings, log):
    folder = cfg.input_folder
    with Phase(comm, timings, "plan"):
        model_state = _model_state(folder)
        zero = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER)
        present = {n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n))}
        order = [n for n in _module_order(model_state) if n in present]
        order += sorted(present - set(order))
        targets = hfnames.targets(order, dict(model_state.get(C.SHARED_PARAMS_KEY) or {}),
                                  _autoep_layers(model_state), _preset(model_state))
        dtype, dtype_name = _dtype(cfg, model_state)
        sizes = {n: os.path.getsize(os.path.join(zero, n, C.FP32_WEIGHT_KEY + C.STATE_FILE_SUFFIX))
                 for t in targets for n in t.parts}
        # largest first onto the least-loaded rank, as the converter spreads its input files
        owners = assign_readers([sum(sizes[p] for p in t.parts) for t in targets], comm.world_size)
        shapes = _shapes(model_state)
    log(f"exporting {len(targets)} tensors from {folder} ({dtype_name}) on {comm.world_size} rank(s)")
    sink = ExportSink(targets, writer, dtype)
    with Phase(comm, timings, "read_write"):
        for target, owner in zip(targets, owners):
            if owner == comm.rank:
                for part in target.parts:
                    if C.FP32_WEIGHT_KEY in state_files(os.path.join(zero, part)):
                        sink.put(part, _universal_tensor(folder, part, shapes.get(part)))
        sink.close()
    return [t.name for t in targets], dtype_name, sink.count
