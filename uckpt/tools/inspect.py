"""``uckpt inspect PATH``: what a DeepSpeed checkpoint (or a Universal one) holds, and whether uckpt
can convert it (and if not, why)."""
import os
from typing import Any, Dict


from ..dsformat import constants as C
from ..dsformat.autoep import all_layers
from ..errors import UckptError
from ..dsformat.index import build_index
from ..dsformat.files import Family, discover
from ..torchsave.reader import FileTensor
from ..dsformat.shards import opened_checkpoint
from ..dsformat.universal import is_universal, list_params, load_payload, model_files, optimizer_state, payload_tensor


def inspect_path(path: str) -> Dict[str, Any]:
    if is_universal(path):
        return _universal(path)
    latest = os.path.join(path, C.LATEST_FILE)
    if os.path.isfile(latest) and not any(f.endswith(C.MODEL_FILE_SUFFIX) for f in os.listdir(path)):
        with open(latest) as f:
            tag = f.read().strip()
        info = inspect_path(os.path.join(path, tag))
        info["note"] = f"save directory: inspected the tag named by 'latest' ({tag})"
        return info
    return _native(path)


def _dtype(shards, files) -> str:
    if files.optim_prefix.startswith("bf16"):
        return "bf16"
    for s in files.model_sources():
        module = shards[s.index].get(C.MODULE_KEY)
        if isinstance(module, dict):
            for t in module.values():
                if isinstance(t, FileTensor) and t.dtype.startswith(("float", "bfloat")) and t.numel():
                    return t.dtype
    return "unknown"


def _native(path: str) -> Dict[str, Any]:
    files = discover(path)  # raises a clear error when this is no checkpoint at all
    with opened_checkpoint(files) as (shards, metas):
        model0 = metas[files.model_sources()[0].index]
        dims = model0.parallel_dims or {}
        info: Dict[str, Any] = {
            "kind": "deepspeed", "path": path, "family": files.family,
            "zero_stage": next(iter({metas[s.index].zero_stage for s in files.optim_sources()})),
            "dtype": _dtype(shards, files),
            "dp": len(files.optim_sources()) // len({s.tp for s in files.optim_sources()}),
            "tp": dims.get(C.CHECKPOINT_TP_DEGREE, len({s.tp for s in files.model_sources()})),
            "pp": dims.get(C.CHECKPOINT_PP_DEGREE, 1),
            "ep": None, "files": len(files.sources), "bytes": files.total_bytes,
            "expert_files": len(files.expert_files), "pipeline_layer_files": len(files.layer_files),
            "ds_version": model0.ds_version, "global_steps": model0.global_steps,
            "universal_checkpoint_info": _uc_summary(model0.uc_info),
            "autoep_metadata": any(getattr(m, "has_autoep", False) for m in metas.values()),
        }
        layers = [e for e in all_layers(files, metas) if isinstance(e, dict)]
        if layers:
            info["ep"] = max(e.get(C.AUTOEP_EP_SIZE, 1) for e in layers)
            info["autoep_layers"] = sorted({(e.get(C.AUTOEP_EXPERT_KEY_PREFIX), e.get(C.AUTOEP_NUM_EXPERTS))
                                            for e in layers})
        try:
            index = build_index(files, metas, inject_missing_state=True)
            info.update(params=len(index.params), elements=index.total_numel,
                        bytes_per_state={st: index.total_numel * 4 for st in C.TENSOR_STATES},
                        fp32_only_folders=len(index.fallbacks), tied_aliases=len(index.aliases), convertible=True,
                        needs=None if model0.uc_info is not None else
                        f"--inject_missing_state (the checkpoint has no {C.UNIVERSAL_CHECKPOINT_INFO})")
        except UckptError as exc:
            info.update(convertible=False, why=str(exc))
        return info


def _uc_summary(uc) -> Any:
    if uc is None:
        return None
    return {k: (v if not isinstance(v, (list, dict)) else f"{len(v)} entries") for k, v in uc.items()}


def _universal(path: str) -> Dict[str, Any]:
    params = list_params(path)
    states: Dict[str, int] = {}
    elements, steps, shapes = 0, set(), {}
    for p in params:
        for st, f in p.states.items():
            states[st] = states.get(st, 0) + os.path.getsize(f)
        t = payload_tensor(load_payload(p.states[C.FP32_WEIGHT_KEY])) if C.FP32_WEIGHT_KEY in p.states else None
        if t is not None:
            shapes[p.name] = tuple(t.shape)
            if not p.fp32_only:
                elements += t.numel()
        if C.STEP_KEY in p.states:
            steps.add(float(load_payload(p.states[C.STEP_KEY])))
    opt = optimizer_state(path) or {}
    models = model_files(path)
    family = Family.ZERO3 if any(m.startswith(C.ZERO_FILE_PREFIX) for m in models) else Family.ZERO12
    groups = opt.get(C.PARAM_GROUPS) or []
    return {"kind": "universal", "path": path, "family": family, "zero_stage": int(opt[C.ZERO_STAGE])
            if C.ZERO_STAGE in opt else None, "params": len([p for p in params if not p.fp32_only]),
            "fp32_only_folders": len([p for p in params if p.fp32_only]), "elements": elements,
            "bytes_per_state": states, "steps": sorted(steps), "param_groups": len(groups),
            "model_files": len(models), "note": "already Universal: load it with checkpoint.load_universal=true"}


def format_table(info: Dict[str, Any]) -> str:
    rows = [("kind", info.get("kind")), ("path", info.get("path"))]
    keys = ["family", "zero_stage", "dtype", "dp", "tp", "pp", "ep", "files", "bytes", "params", "elements",
            "fp32_only_folders", "tied_aliases", "bytes_per_state", "steps", "param_groups", "model_files",
            "global_steps", "ds_version", "expert_files", "pipeline_layer_files", "autoep_metadata", "autoep_layers",
            "universal_checkpoint_info", "convertible", "needs", "why", "note"]
    rows += [(k, info[k]) for k in keys if k in info and info[k] is not None]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
