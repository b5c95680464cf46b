"""Which elements of a Universal tensor one rank of the target run holds: the load-side slicing rules.

The rules are DeepSpeed 0.19.8's (``checkpoint/universal_checkpoint.py: load_hp_checkpoint_state``
and ``runtime/zero/stage3.py: load_hp_checkpoint_state``, spec section 4), in the same order: expert
slice by ``ep_rank`` / ``ep_size`` (or the target's AutoEP placement), the replica shortcut, vocabulary
re-padding, the target's AutoTP restore metadata (affine map, replicated, sub-parameters with shard
widths, partition sizes, even split), then the legacy ``cat_dim`` / sub-parameter rules.

Instead of slicing a loaded tensor, :func:`shard_map` describes the rank's shard as *pieces*: blocks
that sit at one strided position in the full tensor and another in the shard (DeepSpeed's own affine
map vocabulary). :func:`read_flat` then reads only the pieces' rows that overlap the flat range the
rank keeps (its ZeRO fragment or partition), so a rank reads about the bytes it keeps. Elements no
piece covers are zero (vocabulary padding, ZeRO-3 tail padding), as in DeepSpeed.

Pure functions: no process group, no engine. :mod:`uckpt.load` supplies the target description.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..dsformat import constants as C
from ..errors import InvalidCheckpointError
from ..regions import Piece, ShardMap, chunk_span, narrows_cat, whole
from ..torchsave.format import row_major_strides
from ..torchsave.reader import FileTensor


@dataclass(frozen=True)
class Target:
    """What the target rank holds of one parameter.

    ``local_shape`` is the shape of the rank's (TP/EP-local) parameter; ``None`` when there is no
    engine to ask (then the replica shortcut and vocabulary re-padding cannot apply, and the
    checkpoint's own rules split evenly). ``autotp_meta`` / ``autoep_meta`` are the target
    parameter's ``ds_autotp_universal_meta`` / ``ds_autoep_uc_meta`` when it has them.
    """

    local_shape: Optional[Tuple[int, ...]] = None
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    autotp_meta: Optional[dict] = None
    autoep_meta: Optional[dict] = None
    name: str = "?"


def _clip_rows(smap: ShardMap, real_rows: int, row_stride: int) -> ShardMap:
    """Drop the rows at or past ``real_rows`` (vocabulary padding reads as zeros)."""
    pieces = []
    for p in smap.pieces:
        first = p.src_offset // row_stride
        keep = max(0, min(p.shape[0], real_rows - first))
        if keep:
            pieces.append(Piece((keep,) + p.shape[1:], p.src_offset, p.src_strides, p.dst_offset, p.dst_strides,
                                p.scale))
    return ShardMap(smap.shard_shape, pieces, smap.scale_power)


def _affine_map(meta_map: dict, rank: int, numel: int, base: int, scale_power: int) -> Optional[ShardMap]:
    from deepspeed.checkpoint.affine import ParamAffineMap

    restored = ParamAffineMap.from_dict(meta_map) if isinstance(meta_map, dict) else meta_map
    if rank not in restored.pieces_by_rank or restored.numel != numel:
        return None
    restored._reject_scaled_optimizer_state(scale_power)  # DeepSpeed's own refusal of scaled moments
    pieces = [Piece(p.shape, base + p.source_offset, p.source_strides, p.dest_offset, p.dest_strides, p.scale)
              for p in restored.pieces_by_rank[rank]]
    return ShardMap(tuple(restored.shard_shapes[rank]), pieces, scale_power)


def _autotp(meta: dict, shape: Tuple[int, ...], base: int, rank: int, size: int, state: str,
            name: str) -> Optional[ShardMap]:
    """DeepSpeed's ``_resolve_autotp_partition`` as pieces (``None``: fall through to the generic rules)."""
    from deepspeed.checkpoint.affine import SCALE_POWER_BY_STATE

    if not meta:
        return None
    conversion = meta.get("conversion", {}) or {}
    if conversion.get("unsupported_reason"):
        raise InvalidCheckpointError(f"cannot restore a Universal checkpoint into AutoTP parameter {name}: "
                              f"{conversion['unsupported_reason']}",
                              fix="this layer's split is not describable; keep its TP size or change the layer")
    numel = math.prod(shape)
    if conversion.get("affine_map") is not None:
        smap = _affine_map(conversion["affine_map"], rank, numel, base, SCALE_POWER_BY_STATE.get(state, 1))
        if smap is not None:
            return smap
    pdim = meta.get("partition_dim")
    if meta.get("replicated", False):
        return whole(shape, base)
    logical = meta.get("logical_shape")
    if pdim is None or logical is None:
        return None
    logical = tuple(int(d) for d in logical)
    if math.prod(logical) != numel:
        raise InvalidCheckpointError(f"{name}: the target's logical shape {list(logical)} does not hold the saved "
                              f"{list(shape)}", fix="load into a model of the same architecture")
    sizes = meta.get("sub_param_sizes")
    sub_shape = meta.get("sub_param_shape")
    if sizes is None and sub_shape is not None:
        if hasattr(sub_shape, "shape") and hasattr(sub_shape, "partition_dim"):
            spec, pdim = sub_shape.shape, sub_shape.partition_dim
        else:
            spec = sub_shape
        sizes = spec[pdim]
    if sizes is not None:
        sizes = tuple(sizes) if isinstance(sizes, (tuple, list)) else (sizes,)
        if sum(sizes) != logical[pdim]:
            raise InvalidCheckpointError(f"{name}: sub-parameter sizes {list(sizes)} do not add up to dimension {pdim} "
                                  f"({logical[pdim]}) of the parameter")
        widths = meta.get("sub_param_shard_widths")
        if meta.get(C.UNIVERSAL_CHECKPOINT_VERSION_KEY, 0.0) < 0.4:
            uneven = [s for s in sizes if s % size]
            if uneven:
                raise InvalidCheckpointError(f"{name}: sub-parameter sizes {uneven} are not divisible by TP size {size} "
                                      "and the metadata records no shard widths")
            widths = [[s // size] * size for s in sizes]
        spans, offset = [], 0
        for s, w in zip(sizes, widths):
            if len(w) != size or sum(w) != s:
                raise InvalidCheckpointError(f"{name}: shard widths {list(w)} do not split sub-parameter {s} over {size} ranks")
            spans.append((offset + sum(w[:rank]), w[rank]))
            offset += s
        return narrows_cat(logical, pdim, spans, base)
    parts = meta.get("partition_sizes")
    if parts is not None:
        return narrows_cat(logical, pdim, [(sum(parts[:rank]), parts[rank])], base)
    if logical[pdim] % size:
        raise InvalidCheckpointError(f"{name}: dimension {pdim} ({logical[pdim]}) is not divisible by TP size {size} and "
                              "the target records no partition sizes")
    return narrows_cat(logical, pdim, [chunk_span(logical[pdim], size, rank)], base)


def shard_map(full_shape: Sequence[int], info: Dict[str, Any], target: Target, state: str) -> ShardMap:
    """The target rank's shard of a Universal tensor of ``full_shape`` whose file carries ``info``
    (the state file's dict without ``param``; ``{}`` for a bare ZeRO-3 tensor)."""
    shape = tuple(int(d) for d in full_shape)
    name = target.name
    base = 0
    is_expert = bool(info.get(C.EP_IS_EXPERT_PARAM, False))
    if is_expert and target.autoep_meta is not None:
        return _autoep_placement(shape, info, target, state)
    if is_expert and target.ep_size > 1:
        experts = info.get(C.EP_NUM_EXPERTS)
        if experts is None or not shape or shape[0] != experts:
            raise InvalidCheckpointError(f"expert parameter {name} has dimension 0 of {shape[:1]} but ep_num_experts "
                                  f"{experts}", fix="the file is not a consolidated AutoEP expert tensor")
        if experts % target.ep_size:
            raise InvalidCheckpointError(f"expert parameter {name} has {experts} experts, which do not divide over "
                                  f"expert-parallel size {target.ep_size}",
                                  fix=f"use an autoep_size that divides {experts}")
        local = experts // target.ep_size
        if target.local_shape and int(target.local_shape[0]) != local:
            raise InvalidCheckpointError(f"expert parameter {name}: AutoEP expert shape mismatch: target_local_experts="
                                         f"{int(target.local_shape[0])}, checkpoint_local_experts={local}",
                                         fix="load into a model with the checkpoint's expert count")
        base = target.ep_rank * local * row_major_strides(shape)[0]
        shape = (local,) + shape[1:]
    rank, size = target.tp_rank, target.tp_size
    if target.local_shape is not None and shape == tuple(target.local_shape) and target.autotp_meta is None:
        rank, size = 0, 1
    real_rows = None
    if info.get(C.VOCAB_TENSOR, False) and not is_expert and target.autotp_meta is None and target.local_shape:
        padded = target.local_shape[0] * size
        if padded < shape[0]:
            raise InvalidCheckpointError(f"vocabulary parameter {name}: the target holds {padded} rows over TP size "
                                  f"{size}, fewer than the {shape[0]} saved", fix="load into a larger vocabulary")
        real_rows, shape = shape[0], (padded,) + shape[1:]
    smap = _autotp(target.autotp_meta, shape, base, rank, size, state, name) if target.autotp_meta else None
    if smap is None:
        smap = _generic(shape, info, target, rank, size, base)
        if real_rows is not None and real_rows < shape[0]:
            smap = _clip_rows(smap, real_rows, row_major_strides(shape)[0])
    return smap


def _generic(shape, info, target: Target, rank: int, size: int, base: int) -> ShardMap:
    numel = math.prod(shape)
    if target.local_shape is not None and numel != size * math.prod(target.local_shape):
        raise InvalidCheckpointError(f"parameter {target.name}: the checkpoint holds {list(shape)} ({numel} elements), "
                              f"the target holds {list(target.local_shape)} on each of {size} TP ranks",
                              fix="load into a model of the same architecture and a TP size it can be split to")
    sub_shape = info.get(C.SUB_PARAM_SHAPE)
    dim = int(info.get(C.CAT_DIM, 0) or 0)
    n_sub = int(info.get(C.PARAM_N_SUB_PARAMS, 1) or 1)
    if sub_shape:
        pdim = sub_shape.partition_dim
        sizes = sub_shape.shape[pdim]
        sizes = sizes if isinstance(sizes, tuple) else (sizes,)
        view = [sum(d) if isinstance(d, tuple) else d for d in sub_shape.shape]
        spans, offset = [], 0
        for s in sizes:
            start, width = chunk_span(s, size, rank)
            spans.append((offset + start, width))
            offset += s
        return narrows_cat(view, pdim, spans, base)
    if not shape:
        return whole(shape, base)
    if n_sub > 1:
        spans = []
        for i in range(n_sub):
            s0, w0 = chunk_span(shape[dim], n_sub, i)
            start, width = chunk_span(w0, size, rank)
            spans.append((s0 + start, width))
        return narrows_cat(shape, dim, spans, base)
    return narrows_cat(shape, dim, [chunk_span(shape[dim], size, rank)], base)


def _autoep_placement(shape, info, target: Target, state: str) -> ShardMap:
    """Experts placed by the target's AutoEP placement descriptor (DeepSpeed's own checks, then its map)."""
    from deepspeed.checkpoint.autoep_affine import autoep_metadata_to_affine_map
    from deepspeed.checkpoint.universal_checkpoint import _resolve_autoep_partition

    class _Meta:  # the attribute DeepSpeed reads its placement from
        pass

    holder = _Meta()
    setattr(holder, C.DS_AUTOEP_UC_META, target.autoep_meta)
    try:  # DeepSpeed validates against the shape only: a meta tensor costs nothing
        _resolve_autoep_partition(holder, info, torch.empty(shape, device="meta"), target.ep_rank)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise InvalidCheckpointError(f"expert parameter {target.name}: {exc}") from exc
    amap = autoep_metadata_to_affine_map(target.autoep_meta, shape)
    smap = _affine_map(amap, target.ep_rank, math.prod(shape), 0, 1)
    if smap is None:
        raise InvalidCheckpointError(f"expert parameter {target.name}: the placement has no experts for EP rank "
                              f"{target.ep_rank}")
    return smap


def read_flat(tensor: FileTensor, smap: ShardMap, start: int, length: int, out: Optional[torch.Tensor] = None) \
        -> torch.Tensor:
    """Elements ``[start, start + length)`` of the flattened shard, reading only the rows of each
    piece that overlap them; into ``out`` (``length`` elements, any device) where given. Where those
    rows are exactly the range and ``out`` a contiguous CPU tensor, they are read straight into it:
    no buffer, no copy (most ZeRO fragments: whole parameters, row-aligned)."""
    end = start + length
    parts = []
    for p in smap.pieces:
        if not p.shape:
            parts.append((p, p.shape, p.src_offset, p.dst_offset))
            continue
        ext = 1 + sum((d - 1) * s for d, s in zip(p.shape[1:], p.dst_strides[1:]))
        s0 = p.dst_strides[0]
        lo = max(0, (start - p.dst_offset - ext) // s0 + 1) if s0 > 0 else 0
        hi = min(p.shape[0], -(-(end - p.dst_offset) // s0)) if s0 > 0 else p.shape[0]
        if hi <= lo:
            continue
        parts.append((p, (hi - lo,) + p.shape[1:], p.src_offset + lo * p.src_strides[0],
                      p.dst_offset + lo * s0))
    lo_all = min([start] + [d for _, _, _, d in parts])
    hi_all = max([end] + [d + 1 + sum((n - 1) * s for n, s in zip(shape, p.dst_strides))
                          for p, shape, _, d in parts])
    direct = (out is not None and out.device.type == "cpu" and out.is_contiguous() and out.dtype == tensor.torch_dtype
              and (lo_all, hi_all) == (start, end))
    if direct:
        buf = out.view(-1)
        one = parts[0] if len(parts) == 1 else None  # one piece filling the range densely leaves no gap
        exact = one is not None and one[3] == start and math.prod(one[1]) == length and \
            torch.as_strided(buf, one[1], one[0].dst_strides, 0).is_contiguous()
        if not exact:
            buf.zero_()  # what no piece covers is zero
    else:
        buf = torch.zeros(hi_all - lo_all, dtype=tensor.torch_dtype)
    for p, shape, src, dst in parts:
        # as_strided's offset counts from the start of the storage, and ``out`` may be a view into it
        target = torch.as_strided(buf, shape, p.dst_strides, buf.storage_offset() + dst - lo_all)
        if target.is_contiguous():
            tensor.read_strided(src, shape, p.src_strides, out=target)
        else:
            target.copy_(tensor.read_strided(src, shape, p.src_strides))
        factor = p.scale ** smap.scale_power
        if factor != 1.0:
            target.mul_(factor)
    if direct:
        return out
    got = buf[start - lo_all:end - lo_all]
    return out.copy_(got.view(out.shape)) if out is not None else got
