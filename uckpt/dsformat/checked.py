"""Values read out of one file's unpickled object, each checked for the type uckpt needs.

A damaged or crafted file can hold anything where DeepSpeed writes a list of tensors or an int:
every access goes through :class:`Checked`, which names the file and the key path (``optimizer_state_dict
.single_partition_of_fp32_groups[0]``) in a one-line error instead of a traceback from deep inside
the converter. A value that became an inert stand-in (a class uckpt does not resolve) is named by its
global, so a user sees what the file holds where a tensor was expected.
"""
from typing import Any, Dict, List, Optional, Tuple

from ..errors import CheckpointError
from ..torchsave.format import Stub
from ..torchsave.reader import FileTensor

_FIX = "the file is damaged or was not written by DeepSpeed; copy it again from the training job's save directory"


def _kind(value: Any) -> str:
    if isinstance(value, Stub):
        return f"a stand-in for {type(value)._module}.{type(value)._qualname}"
    return f"a {type(value).__name__}"


class Checked:
    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, problem: str):
        raise CheckpointError(f"{where}: {problem}", self.path, _FIX)

    def dict(self, value: Any, where: str, optional: bool = False) -> Optional[Dict[Any, Any]]:
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            self.fail(where, f"is {_kind(value)}, not a dict")
        return value

    def list(self, value: Any, where: str, optional: bool = False) -> Optional[List[Any]]:
        if value is None and optional:
            return None
        if not isinstance(value, (list, tuple)):
            self.fail(where, f"is {_kind(value)}, not a list")
        return list(value)

    def tensor(self, value: Any, where: str, flat: bool = False) -> FileTensor:
        if not isinstance(value, FileTensor):
            self.fail(where, f"is {_kind(value)}, not a tensor")
        if flat and len(value.shape) != 1:
            self.fail(where, f"is a tensor of shape {tuple(value.shape)}, not a flat one")
        return value

    def int(self, value: Any, where: str, optional: bool = False) -> Optional[int]:
        if value is None and optional:
            return None
        try:
            if isinstance(value, bool) or isinstance(value, (float, str, bytes)):
                raise TypeError
            return int(value)  # ints, and DeepSpeed's int enums (ZeroStageEnum) read as stand-ins
        except (TypeError, ValueError):
            self.fail(where, f"is {_kind(value)}, not an int")

    def str(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, f"is {_kind(value)}, not a string")
        return value

    def shape(self, value: Any, where: str) -> Tuple[int, ...]:
        if not isinstance(value, (tuple, list)) or not all(type(d) is int and d >= 0 for d in value):
            self.fail(where, f"is {_kind(value)} {str(value)[:60]}, not a tensor shape")
        return tuple(value)

    def shapes(self, value: Any, where: str) -> Dict[str, Tuple[int, ...]]:
        """``{name: shape}``, as ``param_shapes`` groups and ``frozen_param_shapes`` hold them."""
        return {self.str(k, f"{where} key"): self.shape(v, f"{where}[{k!r}]")
                for k, v in (self.dict(value, where, optional=True) or {}).items()}

    def item(self, container: Any, index: int, where: str) -> Any:
        """``container[index]`` of a per-group state that DeepSpeed writes as a dict keyed by group index,
        or that other writers give as a list (DeepSpeed's converter indexes either); ``{}`` if absent."""
        if isinstance(container, dict):
            return self.dict(container.get(index, {}), f"{where}[{index}]")
        if isinstance(container, (list, tuple)):
            return self.dict(container[index], f"{where}[{index}]") if index < len(container) else {}
        if container is None:
            return {}
        self.fail(where, f"is {_kind(container)}, not a dict or list of per-group states")
