"""Where a conversion's native checkpoint comes from: the shard files of a saved tag folder, or the
state dicts a live job would save, held in its ranks' memory (an in-job save).

Both give the rest of the conversion the same things: the files by name (:class:`CheckpointFiles`),
which rank holds each one, each held file as a dict whose tensors are
:class:`~uckpt.torchsave.reader.FileTensor` (in the file, or in memory behind the same interface),
and a way to put a model-state file into the output. Plan, exchange and output code do not know
which one they read.
"""
import os
from typing import Any, Dict, List, Optional, Set

from ..dsformat.files import CheckpointFiles, classify, discover
from ..dsformat.shards import check_integrity, load_shard
from ..regions import Source
from ..torchsave.reader import FileTensor
from ..torchsave.writer import payload_bytes
from .comm import Comm
from .output import OutputSink, check_output, check_paths
from .plan import assign_readers


class NativeInput:
    """The native checkpoint a conversion reads."""

    label: str  # what the report names as the input
    resumable = False  # whether a rerun may adopt a dead run's partial output (resume_key)

    def files(self, comm: Comm) -> CheckpointFiles:
        raise NotImplementedError

    def readers(self, files: CheckpointFiles, comm: Comm) -> List[int]:
        """The rank that opens each source (``files.sources`` order)."""
        raise NotImplementedError

    def open(self, source: Source, stand_ins: Set[str]) -> Dict[str, Any]:
        """The dict of a source this rank opens, its tensors left where they are."""
        raise NotImplementedError

    def verify(self, paths: List[str]) -> int:
        """Check the bytes of ``paths`` against their CRC-32; the bytes checked."""
        return 0

    def check_output(self, output_folder: str, overwrite: bool):
        """Refuse an output this conversion must not write (existing, or clashing with the input)."""
        check_output(output_folder, overwrite)

    def resume_key(self) -> Optional[Dict[str, Any]]:
        """What must be unchanged for a rerun to trust an earlier run's files (``None``: never resumed)."""
        return None

    def model_file(self, source: Source, shard: Dict[str, Any], out: OutputSink, transform=None):
        """Put the model-state file ``source`` into the output: unchanged, or as ``transform`` of its dict."""
        raise NotImplementedError


class FolderInput(NativeInput):
    """A tag folder written by ``engine.save_checkpoint``: shards opened lazily (pickles only), read
    by byte range; the largest files spread over the ranks first."""

    resumable = True

    def __init__(self, folder: str):
        self.folder = folder
        self.label = os.path.abspath(folder)
        self._files: Optional[CheckpointFiles] = None

    def files(self, comm: Comm) -> CheckpointFiles:
        self._files = discover(self.folder)
        return self._files

    def readers(self, files: CheckpointFiles, comm: Comm) -> List[int]:
        return assign_readers([s.nbytes for s in files.sources], comm.world_size)

    def open(self, source: Source, stand_ins: Set[str]) -> Dict[str, Any]:
        return load_shard(source.path, stand_ins)

    def verify(self, paths: List[str]) -> int:
        return sum(check_integrity(path) for path in paths)

    def check_output(self, output_folder: str, overwrite: bool):
        check_paths(self.folder, output_folder, overwrite)  # and neither inside the other

    def resume_key(self) -> Dict[str, Any]:
        return {"input": self.label,
                "files": [[os.path.basename(s.path), s.nbytes, os.stat(s.path).st_mtime_ns] for s in self._files.sources]}

    def model_file(self, source: Source, shard: Dict[str, Any], out: OutputSink, transform=None):
        if transform is None:
            out.copy(source.path)
        else:
            out.write_file(transform(shard), os.path.basename(source.path))


class MemoryInput(NativeInput):
    """The files a live job would save, each held by the rank that would write it: ``held`` maps a file
    name to its state dict (tensors live or snapshotted). Nothing is read from or written to the
    input's folder, which is a name only (``folder``, as the files would lie there)."""

    def __init__(self, folder: str, held: Dict[str, Dict[str, Any]]):
        self.folder = folder
        self.label = f"in-job save ({folder})"
        self._raw = held
        self._held = {name: as_file_tensors(sd, os.path.join(folder, name)) for name, sd in held.items()}
        self._holders: Dict[str, int] = {}

    def files(self, comm: Comm) -> CheckpointFiles:
        sizes: Dict[str, int] = {}
        mine = {n: 1 + payload_bytes(sd) for n, sd in self._held.items()}
        for rank, part in enumerate(comm.all_gather_object(mine)):
            for name, nbytes in part.items():
                self._holders.setdefault(name, rank)
                sizes[name] = nbytes
        return classify(self.folder, sizes)

    def readers(self, files: CheckpointFiles, comm: Comm) -> List[int]:
        return [self._holders[os.path.basename(s.path)] for s in files.sources]

    def open(self, source: Source, stand_ins: Set[str]) -> Dict[str, Any]:
        return self._held[os.path.basename(source.path)]

    def model_file(self, source: Source, shard: Dict[str, Any], out: OutputSink, transform=None):
        """The job's own dict, written by ``torch.save`` as DeepSpeed's checkpoint engine would: its client
        state may hold objects of the job's classes that only their own pickling writes."""
        name = os.path.basename(source.path)
        raw = self._raw[name]
        out.write_torch(transform(raw) if transform else raw, name)


def as_file_tensors(obj: Any, path: str) -> Any:
    """``obj`` with every torch tensor behind :class:`FileTensor` (named ``path`` in messages); containers
    rebuilt with their own type, everything else unchanged."""
    from ..torchsave.format import is_torch_tensor, map_leaves

    return map_leaves(obj, lambda x: FileTensor.in_memory(x, path) if is_torch_tensor(x) else x)
