"""uckpt: distributed DeepSpeed ZeRO -> Universal checkpoint conversion.

The loader's names are imported on first use: ``python -m uckpt convert`` of a dense checkpoint
in one process never imports torch (see :mod:`uckpt.torchsave`), while the loader needs it.
"""
__version__ = "0.1.0"

from .api import convert, export  # noqa: E402,F401
from .errors import (CheckpointError, InvalidCheckpointError, OutputError, UckptError,  # noqa: E402,F401
                     UnsupportedCheckpointError)

_LAZY = {"Topology": "load.state_dict", "load_into_engine": "load.engine", "LoadResult": "load.engine",
         "load_state_dict": "load.state_dict", "use_for_universal_loads": "load.hook",
         "save_universal": "injob.save", "SaveHandle": "injob.save"}
__all__ = ["convert", "export", "CheckpointError", "InvalidCheckpointError", "OutputError", "UckptError",
           "UnsupportedCheckpointError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'uckpt' has no attribute {name!r}")
