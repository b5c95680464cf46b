"""The metadata a DeepSpeed save of a model layout would hold, written from DeepSpeed's partition
rules without any file: what ``uckpt plan --simulate`` plans for (Llama-style 8B / 70B / 405B at
any DP x TP x PP, Mixtral saved with AutoEP, at any converter size) without a checkpoint of that
size. ``tests/integration/test_simulate.py`` checks the metadata equal to real shards of each kind.

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
  replicated on every TP rank.
* Pipeline stages hold their own layers: one model file per stage and TP rank (``mp = pp x tp +
  t``) with an empty ``module``, and the weights in one file per PipelineModule layer
  (``layer_NN[-model_TT]-model_states.pt``, ``PipelineModule.ckpt_layer_path``), which the
  conversion only checks against their CRC-32.
* AutoEP (ZeRO-1/2): routed experts ``[E, ...]`` are split over ``ep`` EP ranks (``E / ep`` rows
  each) and leave the module state_dict for per-expert files (``layer_L_expert_g_...``). Each
  optimizer group's experts become a group of their own, appended after the dense groups
  (``split_params_into_different_moe_groups_for_optimizer``), flattened and padded like a dense
  group but over the ``dp / ep`` expert-data-parallel ranks that share one EP rank
  (``autoep.owner_dp_ranks``). The model file records each layer's AutoEP entry as EP rank 0
  saves it.

File sizes are estimates (tensor bytes plus a fixed allowance for the pickle) unless given: they
only decide which rank reads which file (:func:`uckpt.conversion.plan.assign_readers`).
"""
import os
from dataclasses import dataclass, field, replace
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
    expert_layer: Optional[int] = None  # an AutoEP routed-expert weight [E, ...]: its MoE layer id
    layer: Optional[int] = None  # with pipeline stages: the PipelineModule layer whose file saves it


@dataclass(frozen=True)
class ModelLayout:
    name: str
    entries: Tuple[Entry, ...]
    groups: int = 2
    # universal_checkpoint_info AutoTP records for the model's parameters (its TP merge patterns)
    tp_patterns: Dict[str, List[str]] = field(default_factory=dict)
    # with pipeline stages: PipelineModule layers without weights (an activation), by layer id -> stage;
    # DeepSpeed saves a file for each of them too
    weightless_layers: Dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Parallel:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 2
    dtype: Dtype = Dtype.BF16
    sub_group_size: int = DEFAULT_SUB_GROUP_SIZE
    ep: int = 1  # AutoEP's autoep_size
    data_before_ep: bool = False  # DeepSpeed's use_data_before_expert_parallelism


LLAMA = {  # hidden, layers, heads, kv heads, intermediate, vocab (Llama 3.1 configurations)
    "llama-8b": (4096, 32, 32, 8, 14336, 128256),
    "llama-70b": (8192, 80, 64, 8, 28672, 128256),
    "llama-405b": (16384, 126, 128, 8, 53248, 128256),
}


def llama(dims: Tuple[int, ...], pp: int = 1, groups: int = 2) -> ModelLayout:
    """A Llama-style decoder's state_dict (Hugging Face names, untied head) with AutoTP's splits:
    q/k/v/gate/up by rows, o/down by columns, the head by vocabulary rows, embedding and norms
    replicated (what AutoTP records in a real save's UC info); the
    layers spread evenly over ``pp`` stages (embedding on the first, final norm and head on the last).
    ``dims``: a :data:`LLAMA` tuple; ``groups`` 2 puts the norms in a second optimizer group (no weight
    decay), 1 keeps every parameter in one."""
    h, layers, heads, kv, inter, vocab = dims
    kv_dim = h // heads * kv
    norm = groups - 1
    if pp > layers:
        raise UckptError(f"pp={pp} exceeds the {layers} layers", fix="use fewer pipeline stages")
    entries = [Entry("model.embed_tokens.weight", (vocab, h), group=0, layer=0)]  # PipelineModule layer 0
    for i in range(layers):
        stage = i * pp // layers
        p = f"model.layers.{i}."
        entries += [replace(e, layer=i + 1) for e in (
                    Entry(p + "self_attn.q_proj.weight", (h, h), 0, 0, stage),
                    Entry(p + "self_attn.k_proj.weight", (kv_dim, h), 0, 0, stage),
                    Entry(p + "self_attn.v_proj.weight", (kv_dim, h), 0, 0, stage),
                    Entry(p + "self_attn.o_proj.weight", (h, h), 0, 1, stage),
                    Entry(p + "mlp.gate_proj.weight", (inter, h), 0, 0, stage),
                    Entry(p + "mlp.up_proj.weight", (inter, h), 0, 0, stage),
                    Entry(p + "mlp.down_proj.weight", (h, inter), 0, 1, stage),
                    Entry(p + "input_layernorm.weight", (h,), norm, None, stage),
                    Entry(p + "post_attention_layernorm.weight", (h,), norm, None, stage))]
    entries += [Entry("model.norm.weight", (h,), norm, None, pp - 1, layer=layers + 1),
                Entry("lm_head.weight", (vocab, h), 0, 0, pp - 1, layer=layers + 2)]
    patterns = {C.TP_REPLICATED_PARAMETER_PATTERNS: [r"model\.embed_tokens\.weight", r".*norm\.weight$"],
                C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r".*\.(o_proj|down_proj)\.weight$"],
                C.VOCABULARY_PARAMETER_PATTERNS: [r"lm_head\.weight"], C.ORIGINAL_VOCAB_SIZE: vocab}
    return ModelLayout("llama", tuple(entries), groups, patterns)


MIXTRAL = {  # hidden, layers, heads, kv heads, expert intermediate, vocab, experts (Mixtral configurations)
    "mixtral-8x7b": (4096, 32, 32, 8, 14336, 32000, 8),
    "mixtral-8x22b": (6144, 56, 48, 8, 16384, 32768, 8),
}
EXPERT_WEIGHTS = ("w1", "w2", "w3")  # AutoEP's fused expert weights: gate [E, I, H], down [E, H, I], up [E, I, H]


def mixtral(dims: Tuple[int, ...]) -> ModelLayout:
    """A Mixtral decoder's state_dict as DeepSpeed's AutoEP ``mixtral`` preset leaves it (Hugging Face
    names, one optimizer group): per layer attention, the router ``mlp.router.gate`` (also saved as
    ``mlp.gate.gate``, which holds no optimizer state) and the fused experts ``mlp.experts.w1|w2|w3``
    (saved as AutoEP saves them with ``ep > 1``; as dense weights without expert parallelism).
    ``dims``: a :data:`MIXTRAL` tuple."""
    h, layers, heads, kv, inter, vocab, experts = dims
    kv_dim = h // heads * kv
    entries = [Entry("model.embed_tokens.weight", (vocab, h), group=0)]
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [Entry(p + "self_attn.q_proj.weight", (h, h), 0), Entry(p + "self_attn.k_proj.weight", (kv_dim, h), 0),
                    Entry(p + "self_attn.v_proj.weight", (kv_dim, h), 0), Entry(p + "self_attn.o_proj.weight", (h, h), 0),
                    Entry(p + "mlp.router.gate.weight", (experts, h), 0), Entry(p + "mlp.gate.gate.weight", (experts, h)),
                    Entry(p + "mlp.experts.w1", (experts, inter, h), 0, expert_layer=i),
                    Entry(p + "mlp.experts.w2", (experts, h, inter), 0, expert_layer=i),
                    Entry(p + "mlp.experts.w3", (experts, inter, h), 0, expert_layer=i),
                    Entry(p + "input_layernorm.weight", (h,), 0), Entry(p + "post_attention_layernorm.weight", (h,), 0)]
    entries += [Entry("model.norm.weight", (h,), 0), Entry("lm_head.weight", (vocab, h), 0)]
    return ModelLayout("mixtral", tuple(entries), groups=1)


def layout(model: str, pp: int = 1) -> ModelLayout:
    """The layout of a named model (:data:`LLAMA`, :data:`MIXTRAL`)."""
    if model in MIXTRAL:
        if pp > 1:
            raise UckptError(f"{model} with pp={pp}: AutoEP checkpoints with pipeline stages are not simulated",
                             fix="use --pp 1 with a Mixtral layout")
        return replace(mixtral(MIXTRAL[model]), name=model)
    return replace(llama(LLAMA[model], pp), name=model)


def ep_shape(e: Entry, shape: Shape, ep: int) -> Shape:
    """An expert weight's EP-local shape: its ``E / ep`` rows (contiguous placement)."""
    if e.expert_layer is None or ep == 1:
        return shape
    if shape[0] % ep:
        raise UckptError(f"{e.name} {shape}: {shape[0]} experts do not divide by ep={ep}",
                         fix="use an EP size that divides the number of experts")
    return (shape[0] // ep,) + tuple(shape[1:])


def _autoep_layers(layout: ModelLayout, ep: int) -> List[Dict[str, object]]:
    """The ``ds_autoep_layers`` entries EP rank 0 saves, one per MoE layer (contiguous placement)."""
    out = []
    for e in layout.entries:
        if e.expert_layer is not None and e.name.endswith("." + EXPERT_WEIGHTS[0]):
            prefix = e.name[:-len(EXPERT_WEIGHTS[0]) - 1]
            out.append({"moe_layer_id": e.expert_layer, "module_path": prefix[:-len(".experts")],
                        C.AUTOEP_NUM_EXPERTS: e.shape[0], C.AUTOEP_NUM_LOCAL_EXPERTS: e.shape[0] // ep,
                        C.AUTOEP_EP_SIZE: ep, C.AUTOEP_EXPERT_KEY_PREFIX: prefix, "ep_rank": 0})
    return out


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
    _check(layout, par)
    model_name, optim_name = _names(par)
    kind = OptimizerKind.ZERO3 if par.zero_stage == 3 else OptimizerKind.ZERO12
    metas_by_name: Dict[str, object] = {}
    estimate: Dict[str, int] = {}
    autoep_layers = _autoep_layers(layout, par.ep) if par.ep > 1 else None
    uc = None
    if par.tp > 1:
        uc = dict(layout.tp_patterns, **{C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    elif autoep_layers:
        uc = {C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
              C.EXPERT_PARAMETER_PATTERNS: [C.AUTOEP_ZERO3_EXPERT_PATTERN], C.AUTOEP_LAYERS_KEY: autoep_layers}
    for stage in range(par.pp):
        for t in range(par.tp):
            mp = stage * par.tp + t
            # without expert parallelism routed experts are ordinary weights of the module
            here = [e if par.ep > 1 else replace(e, expert_layer=None) for e in layout.entries if e.stage == stage]
            shapes = {e.name: ep_shape(e, tp_shape(e, par.tp), par.ep) for e in here}
            # zero-element parameters hold no optimizer state and DeepSpeed leaves them out of param_shapes;
            # each group's experts follow all dense groups, as a group of their own
            trained = [e for e in here if e.group is not None and e.alias_of is None and shape_numel(e.shape)]
            groups = [[e for e in trained if e.group == g and e.expert_layer is None] for g in range(layout.groups)]
            expert_groups = [g for g in ([e for e in trained if e.group == i and e.expert_layer is not None]
                                         for i in range(layout.groups)) if g]
            if par.zero_stage == 3:
                sub_groups = [s for g in groups for s in _sub_groups(g, par)]
                param_shapes = [{e.name: shapes[e.name] for e in s} for s in sub_groups]
            else:
                param_shapes = [{e.name: shapes[e.name] for e in g} for g in groups + expert_groups]
            saved = {e.name: shape_numel(shapes[e.name]) * (e.itemsize or par.dtype.itemsize) for e in here}
            if par.pp > 1:  # a PipelineModule saves its weights in one file per layer
                module = {}
                estimate.update(_layer_files(here, saved, t, par, [k for k, v in layout.weightless_layers.items()
                                                                   if v == stage]))
            else:
                module = {e.name: shapes[e.name] for e in here if e.expert_layer is None} if par.zero_stage < 3 else {}
            lp_bytes = sum(saved[e.name] for e in here if e.name in module and not e.alias_of)  # tied: saved once
            model_meta = ModelMeta(
                param_shapes=param_shapes, module_shapes=module,
                module_nbytes={k: saved[k] for k in module},
                frozen_param_shapes={},  # not read by the index
                shared_params={e.name: e.alias_of for e in here if e.alias_of},
                uc_info=uc, parallel_dims={C.CHECKPOINT_PP_DEGREE: par.pp, C.CHECKPOINT_TP_DEGREE: par.tp},
                ds_version=None, global_steps=1, skipped_steps=0, has_autoep=autoep_layers is not None,
                autoep_layers=autoep_layers, use_data_before_expert_parallelism=par.data_before_ep,
                dp_world_size=par.dp, mp_world_size=par.tp * par.pp,
                tensor_bytes=sum(saved[k] for k in module))
            for d in range(par.dp if par.zero_stage == 3 else 1):
                metas_by_name[model_name(d, mp)] = model_meta
                estimate[model_name(d, mp)] = FILE_ALLOWANCE + lp_bytes
            estimate.update(_expert_files(here, mp, par))
            for d in range(par.dp):
                if par.zero_stage == 3:
                    gms = [_zero3_group(s, shapes, par.dp) for s in sub_groups]
                else:
                    edp, at = _expert_data_rank(d, par)
                    gms = [_zero12_group(g, shapes, par.dp, d) for g in groups] + \
                          [_zero12_group(g, shapes, edp, at) for g in expert_groups]
                meta = metas_by_name[optim_name(d, mp)] = OptimMeta(par.zero_stage, gms, optimizer_kind=kind)
                estimate[optim_name(d, mp)] = FILE_ALLOWANCE + partition_bytes(meta)
    known = dict(estimate, **{k: v for k, v in (sizes or {}).items() if k in estimate})
    files = classify(folder, known)
    return files, {s.index: metas_by_name[os.path.basename(s.path)] for s in files.sources}


def _check(layout: ModelLayout, par: Parallel):
    if par.pp > 1 and par.zero_stage > 1:
        raise UckptError(f"pipeline parallelism with ZeRO-{par.zero_stage}: DeepSpeed's pipeline engine supports "
                         "ZeRO stage 0 and 1 only", fix="use --zero_stage 1 with --pp")
    if par.ep == 1:
        return
    if not any(e.expert_layer is not None for e in layout.entries):
        raise UckptError(f"ep={par.ep}: {layout.name} has no routed experts", fix="use a Mixtral layout with --ep")
    if par.zero_stage == 3 or par.tp > 1 or par.pp > 1:
        raise UckptError(f"ep={par.ep} with ZeRO-{par.zero_stage}, tp={par.tp}, pp={par.pp}: only AutoEP at "
                         "ZeRO-1/2 without TP or pipeline stages is simulated",
                         fix="use --zero_stage 1 or 2, --tp 1 and --pp 1 with --ep")
    if par.dp % par.ep:
        raise UckptError(f"dp={par.dp} is not a multiple of ep={par.ep} (AutoEP shares each EP rank's experts over "
                         "dp / ep ranks)", fix="use a DP size that is a multiple of the EP size")


def _expert_data_rank(d: int, par: Parallel) -> Tuple[int, int]:
    """(expert-data-parallel size, DP rank ``d``'s place among the ranks that share its EP rank's experts)."""
    if par.ep == 1:
        return par.dp, d
    from .autoep import owner_dp_ranks

    owners = next(o for o in (owner_dp_ranks(e, par.dp, par.ep, par.data_before_ep) for e in range(par.ep)) if d in o)
    return len(owners), owners.index(d)


def _expert_files(entries: List[Entry], mp: int, par: Parallel) -> Dict[str, int]:
    """The per-expert model files (``layer_L_expert_g_mp_rank_XX``: that expert's rows of the layer's
    weights) with their estimated sizes. The conversion reads none of them; it checks they exist."""
    rows: Dict[Tuple[int, int], int] = {}
    for e in entries:
        if e.expert_layer is not None:  # only with ep > 1: synthesize() clears it otherwise
            for g in range(e.shape[0]):
                key = (e.expert_layer, g)
                rows[key] = rows.get(key, FILE_ALLOWANCE) + shape_numel(e.shape[1:]) * par.dtype.itemsize
    return {f"layer_{layer}_expert_{g}_{C.MODEL_FILE_PREFIX}{mp:02d}{C.MODEL_FILE_SUFFIX}": n
            for (layer, g), n in rows.items()}


def _layer_files(entries: List[Entry], saved: Dict[str, int], t: int, par: Parallel, weightless: List[int]) \
        -> Dict[str, int]:
    """The PipelineModule layer files of one stage and TP rank with their estimated sizes: each layer's
    weights (a tied weight only in the file of the layer that owns it; ``weightless`` layers hold none)."""
    sizes = {layer: FILE_ALLOWANCE for layer in weightless}
    for e in entries:
        if e.layer is not None and e.alias_of is None:
            sizes[e.layer] = sizes.get(e.layer, FILE_ALLOWANCE) + saved[e.name]
    rank = f"-model_{t:02d}" if par.tp > 1 else ""
    return {f"layer_{layer:02d}{rank}-model_states.pt": n for layer, n in sizes.items()}


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
