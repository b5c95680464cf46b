"""This rank's safetensors files of an export, and the Hugging Face sharded layout they end in.

Each rank packs the tensors it assembled into its own files of at most ``max_shard_size`` bytes
(a tensor larger than that gets a file of its own, as ``save_pretrained`` does), written with the
``safetensors`` package and fsync'd. Once every rank is done, the files are numbered across ranks
(rank order, then each rank's order) and renamed ``model-0000k-of-0000n.safetensors``, or
``model.safetensors`` when there is one, and rank 0 writes ``model.safetensors.index.json``.
"""
import json
import os
import re
from typing import Dict, List, Tuple

from ..conversion.durable import fsync_file
from ..errors import UckptError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(text) -> int:
    """``5GB`` (10**9 bytes, as Hugging Face reads it), ``500MiB``, or a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m:
        raise UckptError(f"max_shard_size {text!r} is not a size", fix="write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


class ShardWriter:
    """Tensors in, this rank's safetensors files out (under temporary names inside ``folder``)."""

    def __init__(self, folder: str, rank: int, max_bytes: int):
        self.folder, self.rank, self.max_bytes = folder, rank, max(1, max_bytes)
        self.files: List[Tuple[str, List[str], int]] = []  # (file name, tensor names, bytes)
        self._current: Dict[str, "object"] = {}
        self._names = set()
        self._bytes = 0
        self.bytes_written = 0

    def add(self, name: str, tensor):
        if name == "__metadata__" or name in self._names:  # the header's own key; one name, one tensor
            raise UckptError(f"the export would hold two tensors named {name!r}" if name in self._names else
                             "a parameter is named '__metadata__', which safetensors reserves",
                             fix="rename the parameter in the model")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self._bytes + nbytes > self.max_bytes:
            self._flush()
        self._current[name] = tensor.contiguous()
        self._bytes += nbytes

    def _flush(self):
        from safetensors.torch import save_file

        if not self._current:
            return
        name = f"rank{self.rank:05d}-{len(self.files):05d}.safetensors.tmp"
        path = os.path.join(self.folder, name)
        save_file(self._current, path, metadata={"format": "pt"})
        fsync_file(path)
        self.files.append((name, list(self._current), self._bytes))
        self.bytes_written += os.path.getsize(path)
        self._current, self._bytes = {}, 0

    def close(self) -> List[Tuple[str, List[str], int]]:
        self._flush()
        return self.files


def final_names(per_rank: List[List[Tuple[str, List[str], int]]]) -> Dict[str, str]:
    """Temporary file name -> its Hugging Face name, numbered across ranks in rank order."""
    ordered = [name for files in per_rank for name, _, _ in files]
    if len(ordered) == 1:
        return {ordered[0]: SINGLE}
    n = len(ordered)
    return {tmp: f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k, tmp in enumerate(ordered)}


def rename_own(folder: str, files: List[Tuple[str, List[str], int]], names: Dict[str, str]):
    for tmp, _, _ in files:
        os.rename(os.path.join(folder, tmp), os.path.join(folder, names[tmp]))


def write_index(folder: str, per_rank: List[List[Tuple[str, List[str], int]]], names: Dict[str, str],
                order: List[str]):
    """``model.safetensors.index.json`` (only for several files, as ``save_pretrained``), its weight map
    in ``order`` (the export's tensor order)."""
    if len(names) == 1:
        return
    where = {t: names[tmp] for files in per_rank for tmp, tensors, _ in files for t in tensors}
    total = sum(nbytes for files in per_rank for _, _, nbytes in files)
    index = {"metadata": {"total_size": total}, "weight_map": {t: where[t] for t in order if t in where}}
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
