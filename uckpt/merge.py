"""Turn a parameter's assembled flat states into the payloads DeepSpeed's converter writes.

Spec section 2.4: dicts holding the merged logical tensor under ``param`` plus the keys of the
parameter's merge rule (``cat_dim``, ``sub_param_shape``, ``vocab_tensor``...); ZeRO-3 at TP=1
writes the bare flat fp32 tensor; ``step.pt`` holds the raw step value.
"""
from typing import Any, Dict, List

import torch

from . import constants as C
from .shard import ParamSpec, shape_numel
from .tp_rules import merge_slices


def tp_slices(spec: ParamSpec, flat: torch.Tensor) -> List[torch.Tensor]:
    """Split an assembled parameter (TP slices concatenated in TP order) into slices of each rank's shape."""
    out, pos = [], 0
    for shape in spec.tp_shapes:
        n = shape_numel(shape)
        out.append(flat.narrow(0, pos, n).view(shape))
        pos += n
    return out


def state_payload(spec: ParamSpec, flat: torch.Tensor, state: str) -> Any:
    """Payload of one state file. ``flat`` owns its storage; views of it are written only when they
    cover all of it (torch.save writes whole storages), otherwise the merge result is a fresh tensor."""
    if spec.flat_output:
        return flat
    return merge_slices(spec.name, spec.rule, tp_slices(spec, flat), state)


def alias_payload(spec: ParamSpec, fp32_flat: torch.Tensor) -> Dict[str, Any]:
    """fp32.pt of a tied alias: the canonical parameter's fp32 master (DeepSpeed's fallback layout: ``{param}``).

    The index makes an alias only where that master is exactly the alias's tensor (TP=1, no vocabulary cut)."""
    return {C.PARAM: fp32_flat.view(spec.shape)}


def fallback_payload(module_tensor: torch.Tensor) -> Dict[str, Any]:
    """fp32.pt of a module key without optimizer state (DeepSpeed 0.19.8: the lp value cast to fp32)."""
    return {C.PARAM: module_tensor.float().clone()}
