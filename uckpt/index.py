"""Build one global index of a checkpoint from the per-file metadata every rank contributed.

Pure function of (file table, metadata): each rank computes the same index, so each rank
raises the same error for bad input. Rules follow DeepSpeed 0.19.8's ``ds_to_universal.py``
(spec sections 1.5, 2.2, 2.3); deliberate differences are marked ``DIFFERENCE``.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from . import constants as C
from .errors import CheckpointError, UnsupportedCheckpointError
from .layout import CheckpointFiles
from .read import ModelMeta, OptimMeta
from .shard import FallbackSpec, Fragment, ParamSpec, shape_numel


@dataclass
class CheckpointIndex:
    files: CheckpointFiles
    family: str
    zero_stage: int
    tp_degree: int
    pp_degree: int
    dp_degree: int
    params: List[ParamSpec]
    fallbacks: List[FallbackSpec]
    aliases: Dict[str, str]  # tied alias -> canonical parameter written from its fp32 master
    uc_info: Dict[str, Any]
    injected_uc_info: bool
    optimizer_state_source: int  # source whose optimizer state becomes zero/optimizer_state.pt
    copy_sources: List[int]  # model files copied into the output
    global_steps: Optional[int] = None
    ds_version: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def total_numel(self) -> int:
        return sum(p.numel for p in self.params)


def _steps_equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def _check_bounds(frag: Fragment, meta: OptimMeta, path: str, name: str):
    g = meta.groups[frag.group]
    limit = min([g.fp32_numel] + list(g.state_numels.values()))
    if frag.start < 0 or frag.start + frag.numel > limit:
        raise CheckpointError(f"fragment of {name!r} [{frag.start}, {frag.start + frag.numel}) lies outside optimizer "
                              f"group {frag.group} of length {limit}", path,
                              "the file does not match the checkpoint's model states; copy the tag folder again")


def _stage_of(files: CheckpointFiles, metas: Dict[int, Any]) -> int:
    stages = {}
    for s in files.optim_sources():
        stages.setdefault(metas[s.index].zero_stage, s.path)
    if len(stages) > 1:
        (s1, p1), (s2, p2) = sorted(stages.items())[:2]
        raise CheckpointError(f"is a ZeRO-{s2} optimizer shard but {p1} is ZeRO-{s1}: the folder mixes stages", p2,
                              "keep the files of one save only")
    return next(iter(stages))


def _uc_info(model0: ModelMeta, path: str, inject: bool):
    uc = model0.uc_info
    if uc is None:
        if not inject:
            raise CheckpointError(f"has no {C.UNIVERSAL_CHECKPOINT_INFO} (DeepSpeed writes it only for AutoTP or when the "
                                  "client supplies it)", path,
                                  "pass --inject_missing_state, as with DeepSpeed's ds_to_universal.py")
        return {C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE}, True
    unsupported = uc.get(C.AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS, {})
    if unsupported:
        details = ", ".join(f"{p}: {r}" for p, r in sorted(unsupported.items()))
        raise UnsupportedCheckpointError(f"AutoTP universal checkpoint conversion is not supported for {details}.", path)
    rules = [k for k in C.MERGE_RULE_KEYS if uc.get(k)]
    if rules:
        # DeepSpeed applies these rules even at TP=1 (e.g. vocabulary rows are stripped and tagged), so
        # writing the plain layout would differ from its output: refuse instead.
        raise UnsupportedCheckpointError(f"carries tensor-parallel merge rules in {C.UNIVERSAL_CHECKPOINT_INFO} "
                                         f"({', '.join(rules)}); uckpt does not apply them yet", path,
                                         "use DeepSpeed's ds_to_universal.py for this checkpoint")
    return uc, False


def build_index(files: CheckpointFiles, metas: Dict[int, Any], inject_missing_state: bool = False) -> CheckpointIndex:
    models = files.model_sources()
    optims = files.optim_sources()
    for s in models:
        if metas[s.index].has_autoep:
            raise UnsupportedCheckpointError("carries AutoEP metadata (ds_autoep_layers); uckpt does not convert "
                                             "AutoEP checkpoints yet", s.path,
                                             "use DeepSpeed's ds_to_universal.py for this checkpoint")
    stage = _stage_of(files, metas)
    if files.family == "zero3":
        return _build_zero3(files, metas, stage)
    return _build_zero12(files, metas, stage, inject_missing_state)


def _zero12_param(name, shape, optim_by_dp, lookup, metas, files) -> Optional[ParamSpec]:
    """A ZeRO-1/2 parameter from the recorded ``param_slice_mappings`` of each DP rank (spec 1.5)."""
    frags, offset, step, step_src = [], 0, None, None
    for d, src in enumerate(optim_by_dp):
        hit = lookup[d].get(name)
        if hit is None:
            continue
        g, start, numel = hit
        meta = metas[src.index]
        frag = Fragment(src.index, g, start, numel, 0, d, offset)
        _check_bounds(frag, meta, src.path, name)
        frags.append(frag)
        offset += numel
        gm = meta.groups[g]
        if gm.has_step:
            if step_src is None:
                step, step_src = gm.step, src.path
            elif not _steps_equal(step, gm.step):
                raise CheckpointError(f"optimizer step {gm.step} of {name!r} differs from {step} in {step_src}",
                                      src.path, "the shards come from different saves; copy the tag folder again")
    if not frags:
        return None  # DeepSpeed skips a parameter without fragments; the fp32 fallback covers it
    if offset != shape_numel(shape):
        raise CheckpointError(f"the optimizer shards hold {offset} elements of {name!r} but its shape {tuple(shape)} "
                              f"has {shape_numel(shape)}: a shard is missing or from another save",
                              files.folder, "copy the complete tag folder from the training job")
    return ParamSpec(name, tuple(shape), [tuple(shape)], frags, step, extra={C.CAT_DIM: 0},
                     has_step=step_src is not None)


def _build_zero12(files, metas, stage, inject) -> CheckpointIndex:
    models, optims = files.model_sources(), files.optim_sources()
    model0 = metas[models[0].index]
    if stage == 3:
        raise CheckpointError("holds ZeRO-3 optimizer shards next to ZeRO-1/2 model files", files.folder,
                              "keep the files of one save only")
    dims = [metas[s.index].parallel_dims for s in models]
    if all(isinstance(d, dict) for d in dims):
        pp, tp = dims[0].get(C.CHECKPOINT_PP_DEGREE, 1), dims[0].get(C.CHECKPOINT_TP_DEGREE, 1)
    else:
        pp, tp = 1, len(models)
    if tp * pp != len(models):
        raise CheckpointError(f"records pp_degree={pp} x tp_degree={tp} but the folder has {len(models)} model files",
                              models[0].path, "copy the complete tag folder from the training job")
    if tp > 1:
        raise UnsupportedCheckpointError(f"is a tensor-parallel checkpoint (tp={tp}); uckpt converts data- and "
                                         "pipeline-parallel checkpoints only so far", files.folder,
                                         "use DeepSpeed's ds_to_universal.py for this checkpoint")
    uc, injected = _uc_info(model0, models[0].path, inject)
    dp = len(optims) // len(models)
    optim_at = {(s.dp, s.tp): s for s in optims}  # (dp, mp) -> source
    replicated = uc.get(C.PIPELINE_REPLICATED_PARAMETER_PATTERNS, [])
    params: List[ParamSpec] = []
    seen = set()
    for pp_stage in range(pp):
        mp = pp_stage * tp  # pp-major model-parallel rank of (stage, tp rank 0)
        meta_m = metas[models[mp].index]
        if meta_m.param_shapes is None:
            raise CheckpointError("has no param_shapes (saved without a ZeRO optimizer)", models[mp].path,
                                  "save with ZeRO stage 1, 2 or 3")
        lookup = {}
        for d in range(dp):
            meta = metas[optim_at[(d, mp)].index]
            lookup[d] = {name: (g, start, numel) for g, gm in enumerate(meta.groups)
                         for name, (start, numel) in gm.mappings.items()}
        for group_shapes in meta_m.param_shapes:
            for name, shape in group_shapes.items():
                if pp_stage > 0 and any(re.match(pat, name) for pat in replicated):
                    continue  # DeepSpeed reads pipeline-replicated (tied) parameters from stage 0 only
                if name in seen:
                    # A tied parameter without a pipeline_replicated pattern: DeepSpeed keeps whichever stage's
                    # fragments it wrote last; the replicas are kept equal by training, uckpt reads the first stage.
                    continue
                spec = _zero12_param(name, shape, [optim_at[(d, mp)] for d in range(dp)], lookup, metas, files)
                if spec is not None:
                    params.append(spec)
                    seen.add(name)
    written = {p.name for p in params}
    fallbacks, aliases = [], {}
    shared = model0.shared_params
    for s in models:  # DeepSpeed 0.19.8: every module key without a fp32.pt gets one; the first file wins
        for key in metas[s.index].module_shapes:
            if key in written or key in aliases:
                continue
            canonical = shared.get(key)
            if canonical in {p.name for p in params}:
                # DIFFERENCE: DeepSpeed casts the alias's bf16 module weight to fp32 (lossy); uckpt writes the
                # canonical parameter's fp32 master, which is what the tied weight holds.
                aliases[key] = canonical
            else:
                fallbacks.append(FallbackSpec(key, s.index))
            written.add(key)
    return CheckpointIndex(files, "zero12", stage, tp, pp, dp, params, fallbacks, aliases, uc, injected,
                           optim_at[(0, 0)].index, [s.index for s in models],
                           global_steps=model0.global_steps, ds_version=model0.ds_version)


def _build_zero3(files, metas, stage) -> CheckpointIndex:
    models, optims = files.model_sources(), files.optim_sources()
    if stage != 3:
        raise CheckpointError(f"holds ZeRO-{stage} optimizer shards next to ZeRO-3 model files", files.folder,
                              "keep the files of one save only")
    tp = 1 + max(s.tp for s in models)
    dp = 1 + max(s.dp for s in models)
    if tp > 1:
        raise UnsupportedCheckpointError(f"is a ZeRO-3 tensor-parallel checkpoint (tp={tp}); uckpt converts dense "
                                         "data-parallel checkpoints only so far", files.folder,
                                         "use DeepSpeed's ds_to_universal.py for this checkpoint")
    model0 = next(s for s in models if s.dp == 0 and s.tp == 0)
    shapes = metas[model0.index].param_shapes
    if shapes is None:
        raise CheckpointError("has no param_shapes", model0.path, "copy the file again from the training job")
    optim_by_dp = {s.dp: s for s in optims if s.tp == 0}
    params: Dict[str, ParamSpec] = {}
    order: List[str] = []
    for k, group_shapes in enumerate(shapes):
        for d in range(dp):
            src = optim_by_dp[d]
            meta: OptimMeta = metas[src.index]
            if k >= len(meta.groups):
                raise CheckpointError(f"has {len(meta.groups)} optimizer sub-groups, the model states list {len(shapes)}",
                                      src.path, "the shards come from different saves; copy the tag folder again")
            gm = meta.groups[k]
            world = gm.partition_count or dp
            rank = gm.partition_rank if gm.partition_rank is not None else d
            offset = 0
            for name, shape in group_shapes.items():
                numel = shape_numel(shape)
                q = math.ceil(numel / world)
                real = max(0, min(q, numel - rank * q))
                frag = Fragment(src.index, k, offset, real, 0, d, rank * q)
                _check_bounds(frag, meta, src.path, name)
                if name not in params:
                    params[name] = ParamSpec(name, tuple(shape), [tuple(shape)], [], None, flat_output=True)
                    order.append(name)
                params[name].fragments.append(frag)
                offset += q
    out = []
    for name in order:
        p = params[name]
        if p.numel != shape_numel(p.shape):
            raise CheckpointError(f"the ZeRO-3 partitions hold {p.numel} elements of {name!r} but its shape has "
                                  f"{shape_numel(p.shape)}", files.folder, "copy the complete tag folder again")
        out.append(p)
    first_optim = min(optims, key=lambda s: (s.dp, s.tp))
    return CheckpointIndex(files, "zero3", stage, tp, 1, dp, out, [], {}, metas[model0.index].uc_info or {}, False,
                           first_optim.index, [s.index for s in models],
                           global_steps=metas[model0.index].global_steps, ds_version=metas[model0.index].ds_version)
