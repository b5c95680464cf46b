"""The metadata a DeepSpeed save of a model layout would hold, written from DeepSpeed's partition
rules without any file: what ``uckpt plan --simulate`` plans for (Llama-style 8B / 70B / 405B at
any DP x TP x PP and converter size) without a checkpoint of that size.

The output is exactly what :func:`uckpt.dsformat.shards.source_meta` extracts from real shards
(``ModelMeta`` / ``OptimMeta`` per file) plus the file table, so the real
:func:`~uckpt.dsformat.index.build_index` and plan run on it. Rules (DeepSpeed 0.19.8):

* ZeRO-1/2 (``stage_1_and_2.py``): each optimizer param group's trainable parameters, flattened
  in order, padded to a multiple of ``2 x dp`` (``nccl_start_alignment_factor x dp``) and cut into
  ``dp`` equal partitions; ``param_slice_mappings`` record each parameter's run in a partition.
* ZeRO-3 (``stage3.py``): every parameter is cut into ``dp`` partitions of ``ceil(numel / dp)``
  (:func:`~uckpt.dsformat.zero3.zero3_span`); a group is split into sub-groups of at least
  ``sub_group_size`` partition elements (``_create_fp16_sub_groups``).
* AutoTP: a split parameter's TP rank ``t`` holds slice ``t`` of its split dimension; others are
  replicated on every TP rank. Pipeline stages hold their own layers (one model file per stage
  and TP rank, ``mp = pp x tp + t``).

File sizes are estimates (tensor bytes plus a fixed allowance for the pickle) unless given: they
only decide which rank reads which file (:func:`uckpt.conversion.plan.assign_readers`).
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import constants as C
from ..errors import UckptError
from ..regions import Kind
from ..torchsave.format import TensorData, shape_numel
from .files import CheckpointFiles, classify
from .index import partition_bytes
from .shards import GroupMeta, ModelMeta, OptimizerKind, OptimMeta
from .zero3 import zero3_span

Shape = Tuple[int, ...]
FILE_ALLOWANCE = 64 << 10  # bytes a shard holds besides its tensors (pickle, zip records), an estimate
DEFAULT_SUB_GROUP_SIZE = 10**9  # DeepSpeed's zero_optimization.sub_group_size


class Dtype(Kind):
    BF16 = "bf16"
    FP32 = "fp32"

    @property
    def itemsize(self) -> int:
        return 2 if self is Dtype.BF16 else 4


@dataclass(frozen=True)
class Entry:
    """One key of the module's state_dict."""

    name: str
    shape: Shape
    group: Optional[int] = None  # optimizer param group; None: no optimizer state (frozen, buffer)
    tp_dim: Optional[int] = None  # the dimension AutoTP splits; None: the same on every TP rank
    stage: int = 0  # pipeline stage that holds it
    alias_of: Optional[str] = None  # a tied weight: the parameter it shares storage with
    itemsize: Optional[int] = None  # bytes per element as saved (None: the training dtype's; buffers keep theirs)


@dataclass(frozen=True)
class ModelLayout:
    name: str
    entries: Tuple[Entry, ...]
    groups: int = 2
    # universal_checkpoint_info AutoTP records for the model's parameters (its TP merge patterns)
    tp_patterns: Dict[str, List[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Parallel:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 2
    dtype: Dtype = Dtype.BF16
    sub_group_size: int = DEFAULT_SUB_GROUP_SIZE


LLAMA = {  # hidden, layers, heads, kv heads, intermediate, vocab (Llama 3.1 configurations)
    "llama-8b": (4096, 32, 32, 8, 14336, 128256),
    "llama-70b": (8192, 80, 64, 8, 28672, 128256),
    "llama-405b": (16384, 126, 128, 8, 53248, 128256),
}


def llama(model: str, pp: int = 1) -> ModelLayout:
    """A Llama-style decoder's state_dict (Hugging Face names, untied head) with AutoTP's splits:
    q/k/v/gate/up by rows, o/down and the head by columns, embedding and norms replicated; the
    layers spread evenly over ``pp`` stages (embedding on the first, final norm and head on the last)."""
    h, layers, heads, kv, inter, vocab = LLAMA[model]
    kv_dim = h // heads * kv
    if pp > layers:
        raise UckptError(f"pp={pp} exceeds the {layers} layers of {model}", fix="use fewer pipeline stages")
    entries = [Entry("model.embed_tokens.weight", (vocab, h), group=0)]
    for i in range(layers):
        stage = i * pp // layers
        p = f"model.layers.{i}."
        entries += [Entry(p + "self_attn.q_proj.weight", (h, h), 0, 0, stage),
                    Entry(p + "self_attn.k_proj.weight", (kv_dim, h), 0, 0, stage),
                    Entry(p + "self_attn.v_proj.weight", (kv_dim, h), 0, 0, stage),
                    Entry(p + "self_attn.o_proj.weight", (h, h), 0, 1, stage),
                    Entry(p + "mlp.gate_proj.weight", (inter, h), 0, 0, stage),
                    Entry(p + "mlp.up_proj.weight", (inter, h), 0, 0, stage),
                    Entry(p + "mlp.down_proj.weight", (h, inter), 0, 1, stage),
                    Entry(p + "input_layernorm.weight", (h,), 1, None, stage),
                    Entry(p + "post_attention_layernorm.weight", (h,), 1, None, stage)]
    entries += [Entry("model.norm.weight", (h,), 1, None, pp - 1), Entry("lm_head.weight", (vocab, h), 0, 1, pp - 1)]
    patterns = {C.TP_REPLICATED_PARAMETER_PATTERNS: [r"model\.embed_tokens\.weight", r".*norm\.weight$"],
                C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r".*\.(o_proj|down_proj)\.weight$", r"lm_head\.weight"]}
    return ModelLayout(model, tuple(entries), 2, patterns)


def tp_shape(e: Entry, tp: int) -> Shape:
    if e.tp_dim is None or tp == 1:
        return e.shape
    if e.shape[e.tp_dim] % tp:
        raise UckptError(f"{e.name} {e.shape}: dimension {e.tp_dim} does not divide by tp={tp}",
                         fix="use a TP size that divides the model's head and MLP sizes")
    return tuple(d // tp if i == e.tp_dim else d for i, d in enumerate(e.shape))


def _step() -> TensorData:
    return TensorData("float32", (), bytes(4))  # torch Adam's step: a float32 scalar tensor


def _names(par: Parallel):
    prefix = C.BF16_ZERO_FILE_PREFIX[:-len(C.ZERO_FILE_PREFIX)] if par.dtype is Dtype.BF16 else ""  # "bf16_"
    optim = lambda d, mp: f"{prefix}{C.ZERO_FILE_PREFIX}{d}_{C.MODEL_FILE_PREFIX}{mp:02d}{C.OPTIM_FILE_SUFFIX}"  # noqa
    if par.zero_stage == 3:
        model = lambda d, mp: f"{C.ZERO_FILE_PREFIX}{d}_{C.MODEL_FILE_PREFIX}{mp:02d}{C.MODEL_FILE_SUFFIX}"  # noqa
    else:
        model = lambda d, mp: f"{C.MODEL_FILE_PREFIX}{mp:02d}{C.MODEL_FILE_SUFFIX}"  # noqa
    return model, optim


def synthesize(layout: ModelLayout, par: Parallel, sizes: Optional[Dict[str, int]] = None,
               folder: str = "<simulated>") -> Tuple[CheckpointFiles, Dict[int, object]]:
    """(file table, metadata by source index) of ``layout`` saved at ``par``; ``sizes``: real file
    sizes by name where known (else estimated)."""
    if par.pp > 1 and par.zero_stage > 1:
        raise UckptError(f"pipeline parallelism with ZeRO-{par.zero_stage}: DeepSpeed's pipeline engine supports "
                         "ZeRO stage 0 and 1 only", fix="use --zero_stage 1 with --pp")
    model_name, optim_name = _names(par)
    kind = OptimizerKind.ZERO3 if par.zero_stage == 3 else OptimizerKind.ZERO12
    metas_by_name: Dict[str, object] = {}
    estimate: Dict[str, int] = {}
    uc = dict(layout.tp_patterns, **{C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE}) \
        if par.tp > 1 else None
    for stage in range(par.pp):
        for t in range(par.tp):
            mp = stage * par.tp + t
            here = [e for e in layout.entries if e.stage == stage]
            shapes = {e.name: tp_shape(e, par.tp) for e in here}
            # zero-element parameters hold no optimizer state and DeepSpeed leaves them out of param_shapes
            groups = [[e for e in here if e.group == g and e.alias_of is None and shape_numel(e.shape)]
                      for g in range(layout.groups)]
            if par.zero_stage == 3:
                sub_groups = [s for g in groups for s in _sub_groups(g, par)]
                param_shapes = [{e.name: shapes[e.name] for e in s} for s in sub_groups]
            else:
                param_shapes = [{e.name: shapes[e.name] for e in g} for g in groups]
            module = {e.name: shapes[e.name] for e in here} if par.zero_stage < 3 else {}
            saved = {e.name: shape_numel(shapes[e.name]) * (e.itemsize or par.dtype.itemsize) for e in here}
            lp_bytes = sum(saved[e.name] for e in here if e.name in module and not e.alias_of)  # tied: saved once
            model_meta = ModelMeta(
                param_shapes=param_shapes, module_shapes=module,
                module_nbytes={k: saved[k] for k in module},
                frozen_param_shapes={},  # not read by the index
                shared_params={e.name: e.alias_of for e in here if e.alias_of},
                uc_info=uc, parallel_dims={C.CHECKPOINT_PP_DEGREE: par.pp, C.CHECKPOINT_TP_DEGREE: par.tp},
                ds_version=None, global_steps=1, skipped_steps=0, has_autoep=False,
                dp_world_size=par.dp, mp_world_size=par.tp * par.pp)
            for d in range(par.dp if par.zero_stage == 3 else 1):
                metas_by_name[model_name(d, mp)] = model_meta
                estimate[model_name(d, mp)] = FILE_ALLOWANCE + lp_bytes
            for d in range(par.dp):
                if par.zero_stage == 3:
                    gms = [_zero3_group(s, shapes, par.dp) for s in sub_groups]
                else:
                    gms = [_zero12_group(g, shapes, par.dp, d) for g in groups]
                meta = metas_by_name[optim_name(d, mp)] = OptimMeta(par.zero_stage, gms, optimizer_kind=kind)
                estimate[optim_name(d, mp)] = FILE_ALLOWANCE + partition_bytes(meta)
    known = dict(estimate, **{k: v for k, v in (sizes or {}).items() if k in estimate})
    files = classify(folder, known)
    return files, {s.index: metas_by_name[os.path.basename(s.path)] for s in files.sources}


def _sub_groups(group: List[Entry], par: Parallel) -> List[List[Entry]]:
    """DeepSpeed's ``_create_fp16_sub_groups``: cut when the partition elements reach sub_group_size."""
    numel = lambda e: _partition_numel(shape_numel(tp_shape(e, par.tp)), par.dp)  # noqa: E731
    if par.sub_group_size >= sum(numel(e) for e in group):
        return [group]
    out, cur, size = [], [], 0
    for e in group:
        cur.append(e)
        size += numel(e)
        if size >= par.sub_group_size or e is group[-1]:
            out.append(cur)
            cur, size = [], 0
    return out


def _partition_numel(numel: int, dp: int) -> int:
    """Slots of each ZeRO-3 partition of a parameter (DeepSpeed's ``partition_numel``)."""
    return zero3_span(numel, 0, dp)[2]


def _zero3_group(sub: List[Entry], shapes: Dict[str, Shape], dp: int) -> GroupMeta:
    n = sum(_partition_numel(shape_numel(shapes[e.name]), dp) for e in sub)
    return GroupMeta(n, {C.EXP_AVG_KEY: n, C.EXP_AVG_SQ_KEY: n}, _step(), True)


def _zero12_group(group: List[Entry], shapes: Dict[str, Shape], dp: int, d: int) -> GroupMeta:
    total = sum(shape_numel(shapes[e.name]) for e in group)
    align = 2 * dp
    part = -(-total // align) * align // dp
    lo, hi = d * part, (d + 1) * part
    mappings, at = {}, 0
    for e in group:
        n = shape_numel(shapes[e.name])
        a, b = max(at, lo), min(at + n, hi)
        if b > a:
            mappings[e.name] = (a - lo, b - a)
        at += n
    return GroupMeta(part, {C.EXP_AVG_KEY: part, C.EXP_AVG_SQ_KEY: part}, _step(), True, mappings)
