"""Compare two Universal checkpoint folders file by file: same files, same keys, equal tensors.

Used by the tests, the demo and the benchmark to hold uckpt's output against DeepSpeed's
``ds_to_universal.py`` output. Tensors must be ``torch.equal`` with the same dtype and shape.
"""
import os
from typing import Any, Callable, Dict, List, Optional

import torch

from ..dsformat import constants as C
from ..dsformat.universal import load_payload


def checkpoint_files(folder: str) -> List[str]:
    """Relative paths of the checkpoint files (``*.pt``) below ``folder``."""
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            if n.endswith(C.STATE_FILE_SUFFIX):
                out.append(os.path.relpath(os.path.join(root, n), folder))
    return sorted(out)


def _diff(a: Any, b: Any, where: str, out: List[str]):
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            out.append(f"{where}: tensor vs {type(b if torch.is_tensor(a) else a).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a, b):
            out.append(f"{where}: values differ (max abs diff {(a.double() - b.double()).abs().max().item():.3g})")
    elif isinstance(a, dict) and isinstance(b, dict):
        if list(a.keys()) != list(b.keys()):
            out.append(f"{where}: keys {list(a.keys())} vs {list(b.keys())}")
        for k in a.keys() & b.keys():
            _diff(a[k], b[k], f"{where}[{k!r}]", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b) or type(a) is not type(b):
            out.append(f"{where}: {type(a).__name__} of {len(a)} vs {type(b).__name__} of {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif hasattr(a, "__dict__") and type(a) is type(b) and not isinstance(a, type):
        _diff(vars(a), vars(b), where, out)
    elif a != b:
        out.append(f"{where}: {a!r} vs {b!r}")


def compare_universal(ours: str, theirs: str, skip: Optional[Callable[[str], bool]] = None) -> List[str]:
    """Differences between two Universal folders (empty list: identical). ``skip(relpath)`` excludes files."""
    skip = skip or (lambda rel: False)
    a = [f for f in checkpoint_files(ours) if not skip(f)]
    b = [f for f in checkpoint_files(theirs) if not skip(f)]
    out: List[str] = []
    for f in sorted(set(a) - set(b)):
        out.append(f"{f}: only in {ours}")
    for f in sorted(set(b) - set(a)):
        out.append(f"{f}: only in {theirs}")
    for f in sorted(set(a) & set(b)):
        x, y = load_payload(os.path.join(ours, f)), load_payload(os.path.join(theirs, f))
        _diff(x, y, f, out)
    return out


def load_state(folder: str, name: str, state: str) -> Dict[str, Any]:
    return load_payload(os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER, name, state + C.STATE_FILE_SUFFIX))
