"""Read-side view of a Universal checkpoint folder: its parameter folders, state files and metadata.

Shared by ``inspect``, ``verify`` and the loader; payloads are loaded memory-mapped, one at a time,
and only safely (``weights_only=True``). Also the one check of names read from a checkpoint before
a path is built from them (:func:`check_name`).
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import CheckpointError
from . import constants as C


def is_universal(path: str) -> bool:
    return os.path.isdir(os.path.join(path, C.UNIVERSAL_ZERO_FOLDER))


def looks_converted(path: str) -> bool:
    """A Universal checkpoint folder as DeepSpeed's converter or uckpt writes it: ``zero/`` holding
    ``optimizer_state.pt`` (or uckpt's report), and no native shard files beside it."""
    zero = os.path.join(path, C.UNIVERSAL_ZERO_FOLDER)
    if not os.path.isdir(zero) or os.path.islink(path):
        return False
    if not (os.path.isfile(os.path.join(zero, C.UNIVERSAL_OPTIMIZER_STATE_FILE)) or
            os.path.isfile(os.path.join(path, C.REPORT_FILE))):
        return False
    return not any(name.endswith(C.OPTIM_FILE_SUFFIX) for name in os.listdir(path))


def check_name(name: Any, what: str, path: Optional[str] = None) -> str:
    """``name`` if it can name one folder or file inside another: a non-empty string without path
    separators, NUL, ``.`` or ``..``, at most 255 bytes. Names read from a checkpoint (parameter names,
    the tag in ``latest_universal``) pass here before any path is built from them, so a crafted name
    cannot write or read outside its folder."""
    bad = not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name \
        or (os.altsep is not None and os.altsep in name) or len(name.encode("utf-8", "surrogatepass")) > 255
    if bad:
        raise CheckpointError(f"{what} {name!r} cannot name a folder (it is empty, too long, or holds a path "
                              "separator, '..' or NUL)", path,
                              "the checkpoint is damaged or crafted; uckpt never builds a path outside its folder from it")
    return name


@dataclass
class UniversalParam:
    name: str
    states: Dict[str, str] = field(default_factory=dict)  # state -> file path

    @property
    def fp32_only(self) -> bool:
        return set(self.states) == {C.FP32_WEIGHT_KEY}


def list_params(folder: str) -> List[UniversalParam]:
    zero = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER)
    out = []
    for name in sorted(os.listdir(zero)):
        d = os.path.join(zero, name)
        if not os.path.isdir(d):
            continue
        out.append(UniversalParam(name, state_files(d)))
    return out


def state_files(param_dir: str) -> Dict[str, str]:
    """A parameter folder's state files, ``step`` included: {state: path}. DeepSpeed's loader, too, takes
    every ``*.pt`` in the folder as a state."""
    return {f[:-len(C.STATE_FILE_SUFFIX)]: os.path.join(param_dir, f) for f in sorted(os.listdir(param_dir))
            if f.endswith(C.STATE_FILE_SUFFIX)}


# The DeepSpeed classes its checkpoints hold, allowed to be rebuilt (as data: no code of theirs runs
# while loading) by torch.load(weights_only=True) and by uckpt.torchsave.format.materialize.
DEEPSPEED_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.checkpoint.universal_checkpoint", "SubparamShape"),
)


def deepspeed_classes() -> Dict[str, type]:
    """``"module.name"`` -> class of :data:`DEEPSPEED_CLASSES` (imports DeepSpeed)."""
    import importlib

    return {f"{m}.{n}": getattr(importlib.import_module(m), n) for m, n in DEEPSPEED_CLASSES}


def load_payload(path: str) -> Any:
    """A Universal state file's object, loaded safely: ``weights_only=True`` with DeepSpeed's checkpoint
    classes allowed, memory-mapped (tensor bytes are read when used)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(deepspeed_classes().values())):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"holds objects that cannot be loaded safely ({str(exc).splitlines()[0][:200]})",
                              path, "the file is not one DeepSpeed or uckpt writes; convert the checkpoint again") \
            from None


def payload_tensor(payload: Any, kind: Optional[type] = None) -> Optional[Any]:
    """The tensor of a state file: DeepSpeed writes dicts with ``param`` (ZeRO-1/2) or bare tensors (ZeRO-3).
    ``kind`` is the tensor type (``ranged.FileTensor`` for a lazily opened file)."""
    if kind is None:
        import torch
        kind = torch.Tensor
    if isinstance(payload, kind):
        return payload
    if isinstance(payload, dict) and isinstance(payload.get(C.PARAM), kind):
        return payload[C.PARAM]
    return None


def optimizer_state(folder: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER, C.UNIVERSAL_OPTIMIZER_STATE_FILE)
    return load_payload(path) if os.path.isfile(path) else None


def model_files(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(C.MODEL_FILE_SUFFIX))
