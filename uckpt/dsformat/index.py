"""Build one global index of a checkpoint from the per-file metadata every rank contributed.

Pure function of (file table, metadata): each rank computes the same index, so each rank
raises the same error for bad input. Rules follow DeepSpeed 0.19.8's ``ds_to_universal.py``
(spec sections 1.5, 2.2, 2.3); deliberate differences are marked ``DIFFERENCE``.
"""
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from . import autoep
from . import constants as C
from ..errors import CheckpointError, UnsupportedCheckpointError
from .files import CheckpointFiles, Family
from .shards import ModelMeta, OptimMeta
from ..regions import FallbackSpec, Fragment, ParamSpec
from ..torchsave.format import TensorData, is_torch_tensor, shape_numel
from .tp_rules import MergeKind, MergeRule, RuleBook
from .universal import check_name
from .zero3 import zero3_span


@dataclass(frozen=True, kw_only=True)
class CheckpointIndex:
    """Every parameter of a checkpoint with the fragments that rebuild it, and what else the output holds."""

    files: CheckpointFiles
    family: Family
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
    # tensor bytes each of them holds, what its writer writes when it rewrites the file (AutoEP adds
    # expert metadata) instead of copying it
    model_tensor_bytes: Dict[int, int] = field(default_factory=dict)
    # tensor bytes zero/optimizer_state.pt holds (ZeRO-3: DeepSpeed copies the whole first optimizer
    # partition into it, so its writer reads and writes them; ZeRO-1/2: none, the partitions are left out)
    optimizer_state_bytes: int = 0
    # AutoEP: (expert pattern, layers) written into the output model files' UC info; layers None: each file's own
    autoep_uc: Optional[Tuple[str, Optional[List[Dict[str, Any]]]]] = None
    global_steps: Optional[int] = None
    ds_version: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def total_numel(self) -> int:
        return sum(p.numel for p in self.params)


def _steps_equal(a, b) -> bool:
    """Steps as read from shards (``TensorData``) or from a Universal folder (torch tensors)."""
    if is_torch_tensor(a) or is_torch_tensor(b):
        import torch
        a, b = [x.to_torch() if isinstance(x, TensorData) else x for x in (a, b)]
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, TensorData) or isinstance(b, TensorData):
        return isinstance(a, TensorData) and isinstance(b, TensorData) and a == b
    return a == b


def _check_bounds(frag: Fragment, meta: OptimMeta, path: str, name: str, allow_missing: bool = False):
    g = meta.groups[frag.group]
    if g.missing and not allow_missing:
        raise UnsupportedCheckpointError(g.refusal, path, "save after at least one step of an Adam/AdamW optimizer")
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
    return uc, False


def _check_recorded_dp(files: CheckpointFiles, metas: Dict[int, Any]):
    """Every shard file the saving run's recorded DP size implies is in the folder: a missing last DP
    rank leaves a complete-looking grid of files, so file names alone cannot tell."""
    recorded = {metas[s.index].dp_world_size for s in files.model_sources()} - {None}
    if len(recorded) != 1:
        return
    dp = recorded.pop()
    kinds = [(files.optim_sources(), f"{files.optim_prefix}{C.ZERO_FILE_PREFIX}{{d}}_{C.MODEL_FILE_PREFIX}{{mp:02d}}"
              f"{C.OPTIM_FILE_SUFFIX}")]
    if files.family is Family.ZERO3:
        kinds.append((files.model_sources(), f"{C.ZERO_FILE_PREFIX}{{d}}_{C.MODEL_FILE_PREFIX}{{mp:02d}}"
                      f"{C.MODEL_FILE_SUFFIX}"))
    missing = []
    for sources, name in kinds:
        have = {(s.dp, s.tp) for s in sources}
        missing += [name.format(d=d, mp=mp) for mp in sorted({s.tp for s in sources}) for d in range(dp)
                    if (d, mp) not in have]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(f"the model states record dp_world_size={dp}, but {len(missing)} shard file(s) are "
                              f"missing: {shown}", files.folder, "copy the complete tag folder from the training job")


def build_index(files: CheckpointFiles, metas: Dict[int, Any], inject_missing_state: bool = False,
                strict: bool = True) -> CheckpointIndex:
    _check_recorded_dp(files, metas)
    stage = _stage_of(files, metas)
    if stage == 3 or files.family is Family.ZERO3:
        layers = autoep.all_layers(files, metas)
        if layers and not autoep.is_zero3_partitioned(layers):
            raise UnsupportedCheckpointError(
                "is a ZeRO-3 AutoEP checkpoint in the legacy (non partition-native) format: AutoEP currently requires "
                "ZeRO Stage 1 or 2 for Universal conversion", files.model_sources()[0].path,
                "save with ZeRO stage 1 or 2, or with DeepSpeed's partition-native ZeRO-3 AutoEP format")
    ep_info = None if files.family is Family.ZERO3 else autoep.collect(
        [(s.path, metas[s.index]) for s in files.model_sources()], files.expert_files, files.folder)
    if files.family is Family.ZERO3:
        return _build_zero3(files, metas, stage, strict)
    if ep_info is not None:
        autoep.check_expert_files(ep_info, files.expert_files, files.folder)
    return _build_zero12(files, metas, stage, inject_missing_state, strict, ep_info)


def _zero12_slice(name, shape, tp, optim_by_dp, lookup, metas, files, allow_missing=False):
    """Fragments of TP rank ``tp``'s slice of a ZeRO-1/2 parameter, from the recorded
    ``param_slice_mappings`` of each DP rank (spec 1.5); (fragments, step, has_step)."""
    frags, offset, step, step_src = [], 0, None, None
    for d, src in enumerate(optim_by_dp):
        hit = lookup[d].get(name)
        if hit is None:
            continue
        g, start, numel = hit
        meta = metas[src.index]
        frag = Fragment(src.index, g, start, numel, tp, d, offset)
        _check_bounds(frag, meta, src.path, name, allow_missing)
        frags.append(frag)
        offset += numel
        gm = meta.groups[g]
        if gm.has_step:
            if step_src is None:
                step, step_src = gm.step, src.path
            elif not _steps_equal(step, gm.step):
                raise CheckpointError(f"optimizer step {gm.step} of {name!r} differs from {step} in {step_src}",
                                      src.path, "the shards come from different saves; copy the tag folder again")
    if frags and offset != shape_numel(shape):
        raise CheckpointError(f"the optimizer shards hold {offset} elements of TP rank {tp}'s slice of {name!r} but "
                              f"its shape {tuple(shape)} has {shape_numel(shape)}: a shard is missing or from another "
                              "save", files.folder, "copy the complete tag folder from the training job")
    return frags, step, step_src is not None


def _expert_slice(name, local_shape, ep_info, dp, optim_by_dp, lookup, metas, files):
    """The full ``[E, ...]`` shape of an AutoEP expert weight and its fragments placed at their global
    offsets (see :mod:`uckpt.autoep`); (shape, (fragments, step, has_step))."""
    entry = ep_info.params[name]
    ep = entry[C.AUTOEP_EP_SIZE]
    row = shape_numel(local_shape[1:])
    full = (entry[C.AUTOEP_NUM_EXPERTS],) + tuple(local_shape[1:])
    frags, step, has_step, taken = [], None, False, set()
    for e in range(ep):
        owners = autoep.owner_dp_ranks(e, dp, ep, ep_info.data_before_ep)
        experts = autoep.local_experts(entry, e)
        shape = (len(experts),) + tuple(local_shape[1:])
        got, s, has = _zero12_slice(name, shape, 0, [optim_by_dp[d] for d in owners],
                                    {i: lookup[d] for i, d in enumerate(owners)}, metas, files, allow_missing=True)
        if has and not has_step:
            step, has_step = s, True
        for f in got:  # _zero12_slice numbered the owners 0..; keep the real DP rank
            frags += autoep.place_fragment(replace(f, dp=owners[f.dp]), row, experts, taken)
        taken.update(experts)
    covered = sum(f.numel for f in frags)
    if covered != shape_numel(full):
        raise CheckpointError(f"the expert shards hold {covered} elements of {name!r}, its {full[0]} experts need "
                              f"{shape_numel(full)}: a shard is missing or the placement leaves experts out",
                              files.folder, "copy the complete tag folder from the training job")
    return full, (frags, step, has_step)


def _finish_tp_params(order, shapes, frags, steps, tp, uc, strict, files, notes, flat_output=False, experts=None,
                      metas=None):
    """ParamSpecs with their merge rules; DeepSpeed's strict check for patterns no parameter used.

    ``experts``: AutoEP expert weights -> their number of experts (DeepSpeed's expert payload, never
    a bare tensor). With ``metas`` (ZeRO-1/2), an expert whose shards lack a moment is converted
    without it, best effort (the guide's rule; DeepSpeed 0.19.8 raises), and a note says so."""
    experts = experts or {}
    expert_notes: List[str] = []
    book = RuleBook(uc, tp, names=set(order))
    params = []
    for name in order:
        check_name(name, "parameter name", files.model_sources()[0].path)
        per_tp = shapes[name]
        if all(not frags[name].get(t) for t in range(tp)):
            continue  # DeepSpeed skips a parameter without fragments; the fp32 fallback covers it
        for t in range(tp):
            if per_tp[t] is None:
                raise CheckpointError(f"{name!r} is missing from the param_shapes of TP rank {t}", files.folder,
                                      "the model files come from different saves; copy the tag folder again")
            if not frags[name].get(t) and shape_numel(per_tp[t]):
                raise CheckpointError(f"no optimizer fragments for TP rank {t} of {name!r} (shape {per_tp[t]})",
                                      files.folder, "copy the complete tag folder from the training job")
        fragments = [f for t in range(tp) for f in frags[name].get(t, [])]
        rule = None if flat_output else book.resolve(name, per_tp)
        skip: Tuple[str, ...] = ()
        if name in experts:
            rule = replace(rule or MergeRule(MergeKind.CAT, 0), experts=experts[name])
            if metas is not None:
                skip = tuple(sorted({st for f in fragments for st in metas[f.source].groups[f.group].missing}))
            if skip:
                expert_notes.append(f"warning: {name}: the optimizer shards hold no {', '.join(skip)}; wrote fp32.pt without "
                             "them")
        step, has_step = steps.get(name, (None, False))
        params.append(ParamSpec(name, tuple(per_tp[0]), [tuple(s) for s in per_tp], fragments, step,
                                flat_output=flat_output and name not in experts, has_step=has_step, rule=rule,
                                skip_states=skip))
    unused = book.unused()
    if unused and not flat_output:
        if strict:
            raise CheckpointError(f"patterns of universal_checkpoint_info match no parameter: {sorted(unused)}",
                                  files.model_sources()[0].path, "pass --no_strict to convert anyway (as DeepSpeed)")
        notes.append(f"warning: unused patterns {sorted(unused)}")
    notes.extend(expert_notes)
    return params


def _build_zero12(files, metas, stage, inject, strict, ep_info=None) -> CheckpointIndex:
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
    uc, injected = _uc_info(model0, models[0].path, inject)
    dp = len(optims) // len(models)
    optim_at = {(s.dp, s.tp): s for s in optims}  # (dp, mp) -> source
    replicated = uc.get(C.PIPELINE_REPLICATED_PARAMETER_PATTERNS, [])
    order: List[str] = []
    shapes: Dict[str, List] = {}
    frags: Dict[str, Dict[int, list]] = {}
    steps: Dict[str, tuple] = {}
    for pp_stage in range(pp):
        for t in range(tp):
            mp = pp_stage * tp + t  # pp-major model-parallel rank
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
                    if name not in shapes:
                        order.append(name)
                        shapes[name], frags[name] = [None] * tp, {}
                    if shapes[name][t] is not None:
                        # Tied across stages without a pipeline_replicated pattern: DeepSpeed keeps whichever
                        # stage's fragments it wrote last; training keeps the replicas equal; uckpt reads the first.
                        continue
                    if ep_info is not None and name in ep_info.params:
                        if tp > 1:
                            raise UnsupportedCheckpointError(
                                f"is an AutoEP checkpoint at TP={tp}: combined AutoEP + AutoTP conversion is out of "
                                "scope", models[mp].path, "load it with the topology it was saved at")
                        shapes[name][t], (got, step, has_step) = _expert_slice(
                            name, tuple(shape), ep_info, dp, [optim_at[(d, mp)] for d in range(dp)], lookup, metas,
                            files)
                        frags[name][t] = got
                        if has_step:
                            steps[name] = (step, True)
                        continue
                    shapes[name][t] = tuple(shape)
                    got, step, has_step = _zero12_slice(name, shape, t, [optim_at[(d, mp)] for d in range(dp)],
                                                        lookup, metas, files)
                    frags[name][t] = got
                    if t == 0 and has_step:
                        steps[name] = (step, True)  # DeepSpeed writes TP rank 0's step
    notes: List[str] = []
    experts = {name: entry[C.AUTOEP_NUM_EXPERTS] for name, entry in ep_info.params.items()} if ep_info else {}
    params = _finish_tp_params(order, shapes, frags, steps, tp, uc, strict, files, notes, experts=experts, metas=metas)
    written = {p.name for p in params}
    by_name = {p.name: p for p in params}
    fallbacks, aliases = [], {}
    shared = model0.shared_params
    for s in models:  # DeepSpeed 0.19.8: every module key without a fp32.pt gets one; the first file wins
        for key in metas[s.index].module_shapes:
            if key in written or key in aliases:
                continue
            check_name(key, "module key", s.path)
            canonical = by_name.get(shared.get(key))
            if (canonical is not None and tp == 1 and canonical.rule is not None and canonical.rule.vocab_rows is None
                    and canonical.numel == shape_numel(metas[s.index].module_shapes[key])):
                # DIFFERENCE: DeepSpeed casts the alias's bf16 module weight to fp32 (lossy); uckpt writes the
                # canonical parameter's fp32 master, which is what the tied weight holds. Only where that master
                # is exactly the alias's tensor (TP=1, no vocabulary cut); elsewhere as DeepSpeed does.
                aliases[key] = canonical.name
            else:
                fallbacks.append(FallbackSpec(key, s.index, metas[s.index].module_nbytes.get(key, 0),
                                              shape_numel(metas[s.index].module_shapes[key])))
            written.add(key)
    return CheckpointIndex(files=files, family=Family.ZERO12, zero_stage=stage, tp_degree=tp, pp_degree=pp,
                           dp_degree=dp, params=params, fallbacks=fallbacks, aliases=aliases, uc_info=uc,
                           injected_uc_info=injected, optimizer_state_source=optim_at[(0, 0)].index,
                           copy_sources=[s.index for s in models],
                           model_tensor_bytes={s.index: metas[s.index].tensor_bytes for s in models},
                           autoep_uc=(C.AUTOEP_UNIVERSAL_EXPERT_PATTERN, ep_info.lightweight()) if ep_info else None,
                           global_steps=model0.global_steps, ds_version=model0.ds_version, notes=notes)


def partition_bytes(meta: OptimMeta) -> int:
    """Tensor bytes of an optimizer file's flat fp32 groups, moments and steps."""
    total = 0
    for g in meta.groups:
        total += 4 * (g.fp32_numel + sum(g.state_numels.values()))
        if isinstance(g.step, TensorData):
            total += len(memoryview(g.step.data).cast("B"))
    return total


def _build_zero3(files, metas, stage, strict) -> CheckpointIndex:
    models, optims = files.model_sources(), files.optim_sources()
    if stage != 3:
        raise CheckpointError(f"holds ZeRO-{stage} optimizer shards next to ZeRO-3 model files", files.folder,
                              "keep the files of one save only")
    tp = 1 + max(s.tp for s in models)
    dp = 1 + max(s.dp for s in models)
    model0 = next(s for s in models if s.dp == 0 and s.tp == 0)
    uc = metas[model0.index].uc_info or {}
    if tp > 1:
        _uc_info(metas[model0.index], model0.path, inject=True)  # refuses autotp_unsupported patterns
    optim_at = {(s.dp, s.tp): s for s in optims}
    model_at = {(s.dp, s.tp): s for s in models}
    experts = autoep.zero3_experts({d: metas[model_at[(d, 0)].index].autoep_layers for d in range(dp)},
                                   {d: model_at[(d, 0)].path for d in range(dp)}, tp)
    order: List[str] = []
    shapes: Dict[str, List] = {}
    frags: Dict[str, Dict[int, list]] = {}
    for t in range(tp):
        model_t = next(s for s in models if s.dp == 0 and s.tp == t)
        tshapes = metas[model_t.index].param_shapes
        if tshapes is None:
            raise CheckpointError("has no param_shapes", model_t.path, "copy the file again from the training job")
        for k, group_shapes in enumerate(tshapes):
            for d in range(dp):
                src = optim_at[(d, t)]
                meta: OptimMeta = metas[src.index]
                if k >= len(meta.groups):
                    raise CheckpointError(f"has {len(meta.groups)} optimizer sub-groups, the model states list "
                                          f"{len(tshapes)}", src.path,
                                          "the shards come from different saves; copy the tag folder again")
                gm = meta.groups[k]
                world = gm.partition_count or dp
                rank = gm.partition_rank if gm.partition_rank is not None else d
                offset = 0
                for name, shape in group_shapes.items():
                    start, real, q = zero3_span(shape_numel(shape), rank, world)
                    frag = Fragment(src.index, k, offset, real, t, d, start)
                    _check_bounds(frag, meta, src.path, name)
                    if name not in shapes:
                        order.append(name)
                        shapes[name], frags[name] = [None] * tp, {}
                    if name in experts:  # this file's EP rank's experts, placed at their global rows
                        full, placed = experts.place(name, d, tuple(shape), frag)
                        shapes[name][t] = full
                        frags[name].setdefault(t, []).extend(placed)
                    else:
                        shapes[name][t] = tuple(shape)
                        frags[name].setdefault(t, []).append(frag)
                    offset += q
    for name in order:
        for t, got in frags[name].items():
            if sum(f.numel for f in got) != shape_numel(shapes[name][t]):
                raise CheckpointError(f"the ZeRO-3 partitions hold {sum(f.numel for f in got)} elements of TP rank "
                                      f"{t}'s slice of {name!r} but its shape has {shape_numel(shapes[name][t])}",
                                      files.folder, "copy the complete tag folder again")
    notes: List[str] = []
    # DeepSpeed writes ZeRO-3 parameters as bare flat tensors at TP=1, and merges them like ZeRO-1/2 above.
    params = _finish_tp_params(order, shapes, frags, {}, tp, uc, strict, files, notes, flat_output=(tp == 1),
                               experts={name: experts.num_experts(name) for name in order if name in experts})
    first_optim = min(optims, key=lambda s: (s.dp, s.tp))
    return CheckpointIndex(files=files, family=Family.ZERO3, zero_stage=stage, tp_degree=tp, pp_degree=1, dp_degree=dp,
                           params=params, fallbacks=[], aliases={}, uc_info=uc, injected_uc_info=False,
                           optimizer_state_source=first_optim.index, copy_sources=[s.index for s in models],
                           model_tensor_bytes={s.index: metas[s.index].tensor_bytes for s in models},
                           optimizer_state_bytes=partition_bytes(metas[first_optim.index]),
                           autoep_uc=(C.AUTOEP_ZERO3_EXPERT_PATTERN, None) if experts else None,
                           global_steps=metas[model0.index].global_steps, ds_version=metas[model0.index].ds_version,
                           notes=notes)
