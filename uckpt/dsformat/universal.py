"""Read-side view of a Universal checkpoint folder: its parameter folders, state files and metadata.

Shared by ``inspect`` and ``verify``; payloads are loaded memory-mapped, one at a time.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from . import constants as C


def is_universal(path: str) -> bool:
    return os.path.isdir(os.path.join(path, C.UNIVERSAL_ZERO_FOLDER))


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


def load_payload(path: str) -> Any:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def payload_tensor(payload: Any, kind: type = torch.Tensor) -> Optional[Any]:
    """The tensor of a state file: DeepSpeed writes dicts with ``param`` (ZeRO-1/2) or bare tensors (ZeRO-3).
    ``kind`` is the tensor type (``ranged.FileTensor`` for a lazily opened file)."""
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
