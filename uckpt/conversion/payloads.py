"""Turn a parameter's assembled flat states into the payloads DeepSpeed's converter writes.

Spec section 2.4: dicts holding the merged logical tensor under ``param`` plus the keys of the
parameter's merge rule (``cat_dim``, ``sub_param_shape``, ``vocab_tensor``...); ZeRO-3 at TP=1
writes the bare flat fp32 tensor; ``step.pt`` holds the raw step value.

Rules that only move data (concatenation on any dimension, the legacy two-sub-parameter layout,
fused sub-parameters with their shard widths) are merged here from the assembled bytes, through the
same shard maps the loader slices with (:meth:`~uckpt.dsformat.tp_rules.MergeRule.slice_maps`) run
backwards, so no torch is needed; a vocabulary cut is a prefix of the bytes. Rules that change or
check values (affine maps, averaged and replicated parameters at several TP ranks) go through
:func:`uckpt.conversion.tp_merge.merge_slices` on torch tensors. Both give the same keys in the same
order.

The model files and ``zero/optimizer_state.pt`` are built here too, exactly as DeepSpeed's converter
writes them.
"""
from typing import Any, Dict, List

from ..dsformat import constants as C
from ..dsformat.files import Family
from ..dsformat.index import CheckpointIndex
from ..dsformat.tp_rules import MergeKind
from ..torchsave import direct as directio
from ..regions import ParamSpec
from ..torchsave.format import TensorData, as_fp32_tensor, shape_numel

def tp_slices(spec: ParamSpec, flat) -> List[Any]:
    """Split an assembled parameter (TP slices concatenated in TP order) into torch slices of each rank's shape."""
    out, pos = [], 0
    for shape in spec.tp_shapes:
        n = shape_numel(shape)
        out.append(flat.narrow(0, pos, n).view(shape))
        pos += n
    return out


def state_payload(spec: ParamSpec, flat: bytearray, state: str) -> Any:
    """Payload of one state file from the parameter's assembled fp32 bytes (TP slices concatenated in TP
    order; with one TP rank, or column-parallel slices, already the merged tensor, which the payload
    then keeps as its storage)."""
    if spec.flat_output:
        return TensorData("float32", (spec.numel,), flat)
    rule = spec.rule
    layout = rule.slice_maps(spec.name, spec.tp_shapes) if rule is not None else None
    if layout is None or (rule.vocab_rows is not None and len(layout[0]) != 2):
        from .tp_merge import merge_slices  # values change (affine, average) or are checked (replicas)
        return merge_slices(spec.name, rule, tp_slices(spec, as_fp32_tensor(flat)), state)
    shape, maps = layout
    return _moved_payload(rule, shape, _place(spec, maps, flat))


def _place(spec: ParamSpec, maps, flat):
    """The merged tensor's bytes: each TP slice copied to its place, run by run (the inverse of the
    load side's shard maps); ``flat`` itself where every slice already lies in place."""
    runs, base = [], 0
    for shape, smap in zip(spec.tp_shapes, maps):
        runs += [(src, base + dst, n) for piece in smap.pieces for src, dst, n in piece.runs()]
        base += shape_numel(shape)
    if all(src == dst for src, dst, _ in runs):
        return flat
    src_view = memoryview(flat)
    merged = directio.buffer(len(src_view))
    for to, at, n in runs:
        merged[4 * to:4 * (to + n)] = src_view[4 * at:4 * (at + n)]
    return merged


def _moved_payload(rule, shape, data) -> Dict[str, Any]:
    """What :func:`~uckpt.conversion.tp_merge.merge_slices` returns for a rule that only moves data, in
    its key order."""
    out: Dict[str, Any] = {}
    if rule.kind is MergeKind.TWO_SUB_PARAMS:
        out[C.CAT_DIM], out[C.PARAM_N_SUB_PARAMS] = 0, 2
    elif rule.kind is MergeKind.SUB_PARAMS:
        from deepspeed.checkpoint import SubparamShape  # DeepSpeed's class, as its converter pickles it

        out[C.SUB_PARAM_SHAPE] = SubparamShape(patterns=rule.sub_shape["patterns"], shape=rule.sub_shape["shape"],
                                               partition_dim=rule.sub_shape["partition_dim"])
    elif rule.kind is MergeKind.CAT:
        out[C.CAT_DIM] = rule.cat_dim
    if rule.experts is not None:  # DeepSpeed's AutoEP payload, in its key order (spec 3.2)
        out = {C.PARAM: None, C.CAT_DIM: 0, C.EP_IS_EXPERT_PARAM: True, C.EP_NUM_EXPERTS: rule.experts}
    if rule.vocab_rows is not None:  # param[:rows, :], the first rows of the row-major data
        shape = (min(rule.vocab_rows, shape[0]),) + tuple(shape[1:])
        data = memoryview(data)[:4 * shape_numel(shape)]
        out[C.VOCAB_TENSOR] = True
    out[C.PARAM] = TensorData("float32", tuple(shape), data)
    return out


def param_files(spec: ParamSpec, flats: Dict[str, bytearray]) -> Dict[str, Any]:
    """{state: payload} of a parameter's folder from its assembled flat fp32 states: ``step.pt`` where
    DeepSpeed writes one, then fp32, exp_avg, exp_avg_sq (less the states its shards lack); of a
    parameter moved one state per wave, the files of the states in ``flats`` (step.pt with fp32)."""
    files = {C.STEP_KEY: spec.step} if spec.has_step and C.FP32_WEIGHT_KEY in flats else {}
    for st in C.TENSOR_STATES:
        if st in flats and st not in spec.skip_states:
            files[st] = state_payload(spec, flats[st], st)
    return files


def alias_payload(spec: ParamSpec, fp32_flat: bytearray) -> Dict[str, Any]:
    """fp32.pt of a tied alias: the canonical parameter's fp32 master (DeepSpeed's fallback layout: ``{param}``).

    The index makes an alias only where that master is exactly the alias's tensor (TP=1, no vocabulary cut)."""
    return {C.PARAM: TensorData("float32", tuple(spec.shape), fp32_flat)}


def fallback_payload(module_tensor) -> Dict[str, Any]:
    """fp32.pt of a module key without optimizer state (DeepSpeed 0.19.8: the lp value cast to fp32)."""
    return {C.PARAM: to_fp32(module_tensor.to_data())}


def to_fp32(t: TensorData) -> TensorData:
    """``tensor.float()`` of a contiguous tensor: bf16 widens by shifting its bits into the high half,
    the rest as numpy's C casts do."""
    if t.dtype == "float32":
        return t
    import numpy as np  # about 0.1 s to import; widens bf16 ~20x faster than byte-slice assignment
    if t.dtype == "bfloat16":
        raw = memoryview(t.data).cast("B")
        out = directio.buffer(2 * len(raw))  # aligned when large: written directly
        # little-endian: fp32 = bf16 bits << 16
        np.left_shift(np.frombuffer(raw, dtype=np.uint16), 16, out=np.frombuffer(out, dtype=np.uint32),
                      dtype=np.uint32, casting="unsafe")
        return TensorData("float32", tuple(t.shape), out)
    values = np.frombuffer(t.data, dtype=np.dtype(t.dtype)).astype(np.float32)
    return TensorData("float32", tuple(t.shape), bytearray(values.tobytes()))


def with_autoep_info(model_state, pattern, layers):
    """A model-state file as DeepSpeed's converter rewrites it for AutoEP: its UC info names the expert
    pattern and the AutoEP layers (spec 3.2 step 6; ZeRO-3: the file's own layers, 3.3); all else unchanged."""
    out = dict(model_state)
    info = dict(out.get(C.UNIVERSAL_CHECKPOINT_INFO) or {})
    info[C.EXPERT_PARAMETER_PATTERNS] = [pattern]
    info[C.AUTOEP_LAYERS_KEY] = layers if layers is not None else out.get(
        C.AUTOEP_LAYERS_KEY, out.get(C.AUTOEP_LAYERS_KEY_LEGACY))
    out[C.UNIVERSAL_CHECKPOINT_INFO] = info
    return out


def optimizer_state(index: CheckpointIndex, sd: Dict[str, Any]) -> Dict[str, Any]:
    """zero/optimizer_state.pt exactly as DeepSpeed's ``_save_optimizer_state(_stage3)`` writes it."""
    osd = sd[C.OPTIMIZER_STATE_DICT]
    if index.family is Family.ZERO3:
        out = dict(osd)
        out[C.PARAM_GROUPS] = osd[C.OPTIMIZER_STATE_DICT][C.PARAM_GROUPS]
        return out
    sharded = (C.BASE_OPTIMIZER_STATE, C.PARAM_SLICE_MAPPINGS, C.SINGLE_PARTITION_OF_FP32_GROUPS)
    out = {k: v for k, v in osd.items() if k not in sharded}
    # DeepSpeed reads this shard through ZeROCheckpoint.get_state_for_rank, which zeroes the group
    # paddings (after stripping them) and sets partition_count to the checkpoint's DP degree.
    if out.get(C.GROUP_PADDINGS):
        out[C.GROUP_PADDINGS] = [0] * len(out[C.GROUP_PADDINGS])
    if out.get(C.PARTITION_COUNT):
        out[C.PARTITION_COUNT] = [index.dp_degree] * len(out[C.PARTITION_COUNT])
    out[C.PARAM_GROUPS] = osd[C.BASE_OPTIMIZER_STATE][C.PARAM_GROUPS]
    return out
