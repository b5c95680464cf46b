"""Turn a parameter's assembled flat states into the payloads DeepSpeed's converter writes.

Spec section 2.4: ZeRO-1/2 writes ``{cat_dim, param}`` dicts holding the full logical shape;
ZeRO-3 (TP=1) writes the bare flat fp32 tensor; ``step.pt`` holds the raw step value.
"""
from typing import Any, Dict

import torch

from . import constants as C
from .shard import ParamSpec


def state_payload(spec: ParamSpec, flat: torch.Tensor) -> Any:
    """Payload of one state file. ``flat`` must own its storage: torch.save writes whole storages."""
    if spec.flat_output:
        return flat
    payload: Dict[str, Any] = dict(spec.extra)
    payload[C.PARAM] = flat.view(spec.shape)
    return payload


def alias_payload(spec: ParamSpec, fp32_flat: torch.Tensor) -> Dict[str, Any]:
    """fp32.pt of a tied alias: the canonical parameter's fp32 master (DeepSpeed's fallback layout: ``{param}``)."""
    return {C.PARAM: fp32_flat.view(spec.shape)}


def fallback_payload(module_tensor: torch.Tensor) -> Dict[str, Any]:
    """fp32.pt of a module key without optimizer state (DeepSpeed 0.19.8: the lp value cast to fp32)."""
    return {C.PARAM: module_tensor.float().clone()}
