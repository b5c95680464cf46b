"""Apply a resolved :class:`~uckpt.tp_rules.MergeRule` to a parameter's per-TP-rank slices (torch).

Imported only where a merge needs arithmetic on tensors: several TP ranks, sub-parameters,
affine maps. The one-TP-rank rules that only rename or cut a tensor are applied without torch by
:mod:`uckpt.merge`.
"""
from typing import Any, Dict, List

import torch
from deepspeed.checkpoint import SubparamShape
from deepspeed.checkpoint.affine import SCALE_POWER_BY_STATE, ParamAffineMap

from ..dsformat import constants as C
from ..errors import CheckpointError
from ..dsformat.tp_rules import MergeKind, MergeRule, resolve_shape


def _check_replicas(name: str, state: str, slices: List[torch.Tensor]):
    """TP-replicated slices must be equal: otherwise name the parameter, the ranks and the difference."""
    for t, s in enumerate(slices[1:], 1):
        if s.shape == slices[0].shape and not torch.equal(slices[0], s):
            diff = (slices[0].double() - s.double()).abs().max().item()
            raise CheckpointError(f"{state} of TP-replicated parameter {name!r} differs between TP rank 0 and "
                                  f"{t} (max abs difference {diff:.3g})",
                                  fix="the replicas diverged in training; check the tp_replicated patterns")


def merge_slices(name: str, rule: MergeRule, slices: List[torch.Tensor], state: str) -> Dict[str, Any]:
    """The payload DeepSpeed writes for ``state`` of ``name`` from its per-TP slices (shaped per rank)."""
    out: Dict[str, Any] = {}
    if rule.kind is MergeKind.AFFINE:
        try:
            param = ParamAffineMap.from_dict(rule.affine).rebuild(dict(enumerate(slices)), SCALE_POWER_BY_STATE[state])
        except ValueError as exc:  # DeepSpeed's map found replicas that disagree; say which and by how much
            if "replicated" in str(exc):
                _check_replicas(name, state, slices)
            raise CheckpointError(f"{state} of {name!r}: {exc}", fix="the TP slices do not fit the affine map") \
                from None
    elif rule.kind is MergeKind.REPLICATED:
        _check_replicas(name, state, slices)
        param = slices[0]
    elif rule.kind is MergeKind.AVERAGE:
        param = sum(slices) / len(slices)
    elif rule.kind is MergeKind.TWO_SUB_PARAMS:
        halves = [torch.chunk(s, 2, dim=0) for s in slices]
        param = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        out[C.CAT_DIM], out[C.PARAM_N_SUB_PARAMS] = 0, 2
    elif rule.kind is MergeKind.SUB_PARAMS:
        pd = rule.sub_shape["partition_dim"]
        logical = [sum(d) if isinstance(d, tuple) else d for d in rule.sub_shape["shape"]]
        logical[pd] = sum(rule.sub_sizes)
        logical = resolve_shape(logical, sum(s.numel() for s in slices), name)
        views = []
        for t, s in enumerate(slices):
            rank_shape = list(logical)
            rank_shape[pd] = sum(w[t] for w in rule.shard_widths)
            if s.numel() != torch.Size(rank_shape).numel():
                raise CheckpointError(f"TP rank {t} of {name!r} holds {s.numel()} elements, its shard widths "
                                      f"describe {tuple(rank_shape)}")
            views.append(s.view(rank_shape))
        offsets = [0] * len(views)
        chunks = []
        for widths in rule.shard_widths:
            pieces = []
            for t, v in enumerate(views):
                pieces.append(v.narrow(pd, offsets[t], widths[t]))
                offsets[t] += widths[t]
            chunks.append(torch.cat(pieces, dim=pd))
        param = torch.cat(chunks, dim=pd)
        out[C.SUB_PARAM_SHAPE] = SubparamShape(patterns=rule.sub_shape["patterns"], shape=rule.sub_shape["shape"],
                                                partition_dim=pd)
    else:
        param = slices[0] if len(slices) == 1 else torch.cat(slices, dim=rule.cat_dim)
        out[C.CAT_DIM] = rule.cat_dim
    if rule.experts is not None:  # DeepSpeed's AutoEP payload, in its key order (spec 3.2)
        out = {C.PARAM: param, C.CAT_DIM: 0, C.EP_IS_EXPERT_PARAM: True, C.EP_NUM_EXPERTS: rule.experts}
    if rule.vocab_rows is not None:
        param = param[:rule.vocab_rows, :]
        out[C.VOCAB_TENSOR] = True
    out[C.PARAM] = param if param.is_contiguous() and param.untyped_storage().nbytes() == param.numel() * \
        param.element_size() else param.clone()
    return out
