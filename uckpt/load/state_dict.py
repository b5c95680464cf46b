"""Plain-PyTorch loading: the TP / EP-local tensors of one rank, read by byte ranges, no engine."""
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch

from ..dsformat import constants as C
from ..torchsave import reader as ranged
from .folder import StateFiles, _model_state_file, _param_folder, _state_keys, resolve_folder
from .slicing import Target, read_flat, shard_map


@dataclass(frozen=True)
class Topology:
    """The target rank's place: tensor-parallel and expert-parallel rank and size."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1


def load_state_dict(path: str, topology: Topology = Topology(), states: Sequence[str] = (C.FP32_WEIGHT_KEY,),
                    dtype: Optional[torch.dtype] = None, shapes: Optional[Mapping[str, Sequence[int]]] = None,
                    names: Optional[Iterable[str]] = None, tag: Optional[str] = None) -> Dict[str, Any]:
    """This rank's TP / EP-local slice of every parameter, read by byte ranges.

    Returns ``{name: tensor}`` for one state, ``{name: {state: tensor}}`` for several. ``shapes``
    (e.g. ``{n: p.shape for n, p in model.named_parameters()}``) gives the rank's local shapes, which
    enables DeepSpeed's replica shortcut and vocabulary re-padding; without it, parameters split by
    the checkpoint's own rules (``cat_dim``, sub-parameters) evenly over ``tp_size``.
    """
    folder = resolve_folder(path, tag)
    files = StateFiles(folder)
    zero = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER)
    book = _checkpoint_rules(folder)
    wanted = list(names) if names is not None else sorted(
        n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n)))
    out: Dict[str, Any] = {}
    for name in wanted:
        pfolder = _param_folder(folder, name)
        available = _state_keys(pfolder)
        per_state = {}
        for state in states:
            if state not in available:
                continue
            tensor, info = files.open(name, state)
            local = tuple(shapes[name]) if shapes is not None and name in shapes else None
            info, meta = _hinted(book, name, info)
            target = Target(local, topology.tp_rank, topology.tp_size, topology.ep_rank, topology.ep_size,
                            autotp_meta=meta, name=name)
            smap = shard_map(tensor.shape, info, target, state)
            value = read_flat(tensor, smap, 0, smap.numel).view(smap.shard_shape)
            per_state[state] = value.to(dtype) if dtype is not None else value
        if per_state:
            out[name] = per_state[states[0]] if len(states) == 1 else per_state
    return out


def _checkpoint_rules(folder: str):
    """The checkpoint's own TP patterns (``universal_checkpoint_info`` of its model file), if any."""
    from ..dsformat.tp_rules import RuleBook

    model_file = _model_state_file(folder, 0, 1)
    uc = ranged.open_lazy(model_file).get(C.UNIVERSAL_CHECKPOINT_INFO) if model_file else None
    if not uc:
        return None
    return RuleBook(uc, 1, names=set(os.listdir(os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER))))


def _hinted(book, name: str, info: Dict[str, Any]):
    """Without an engine there is no target AutoTP metadata, and AutoTP's affine-map files carry no
    ``cat_dim``: the checkpoint's own patterns say how the parameter was split (replicated, row-parallel
    on dim 1, vocabulary rows)."""
    marks = (C.CAT_DIM, C.SUB_PARAM_SHAPE, C.PARAM_N_SUB_PARAMS, C.VOCAB_TENSOR, C.EP_IS_EXPERT_PARAM)
    if book is None or any(k in info for k in marks):
        return info, None
    if book.matches(book.replicated, name):
        return info, {"replicated": True, "partition_dim": None}
    info = dict(info)
    if book.matches(book.row, name):
        info[C.CAT_DIM] = 1
    if book.matches(book.vocab, name):
        info[C.VOCAB_TENSOR] = True
    return info, None
