"""Which DeepSpeed the Universal format here was verified against, and what to say about another.

uckpt reads and writes the files of DeepSpeed 0.19.8 (``shared/docs/universal-checkpoint-format.md``,
taken from its source): another DeepSpeed may write or expect other keys. The installed version is
read from the package metadata, without importing DeepSpeed (a dense conversion never imports it).
"""
import warnings
from typing import Optional, Tuple

from ..errors import UckptError

VERIFIED = ((0, 19, 8), (0, 20, 0))  # [low, high): the releases the format was checked against
# DeepSpeed before 0.10 writes ZeRO files without param_slice_mappings, which conversion needs
REFUSED_BELOW = (0, 10, 0)
_warned = set()


def _parse(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def installed() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None


def check_deepspeed(version: Optional[str] = None) -> Optional[str]:
    """A warning (issued once per version) when the installed DeepSpeed lies outside the verified
    range; an error where a format difference is known. Returns the warning's text, if any."""
    version = version if version is not None else installed()
    if version is None:
        return None
    v = _parse(version)
    low, high = VERIFIED
    if v < REFUSED_BELOW:
        raise UckptError(f"DeepSpeed {version} is installed; its ZeRO files carry no param_slice_mappings, which "
                         "Universal checkpoints are built from (uckpt's format is verified against DeepSpeed 0.19.8)",
                         fix="install deepspeed>=0.19.8,<0.20")
    if low <= v < high:
        return None
    text = (f"uckpt: DeepSpeed {version} is installed, but uckpt's Universal checkpoint format was verified against "
            f"DeepSpeed 0.19.8 (>=0.19.8,<0.20); files may differ from what this DeepSpeed writes or expects")
    if version not in _warned:
        _warned.add(version)
        warnings.warn(text, RuntimeWarning, stacklevel=2)
    return text
