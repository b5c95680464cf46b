"""Where fragments come from: the seam between the exchange and the storage of the native state.

The exchange asks a :class:`FragmentSource` for one fragment's elements of one state, read straight
into the buffer that sends or assembles them. :class:`ShardFiles` serves them from the native ZeRO
shard files a rank opened (today's converter); an in-job save serves them from the live engine's
optimizer partitions behind the same call, so the plan, exchange and output code stay the same.
"""
from typing import Any, Dict

from ..dsformat.files import Family
from ..dsformat.shards import read_fragment
from ..regions import Fragment
from ..torchsave.reader import FileDescriptors


class FragmentSource:
    """A rank's share of the native optimizer state."""

    def read_into(self, fragment: Fragment, state: str, out: memoryview):
        """Copy ``fragment``'s fp32 elements of ``state`` (fp32 / exp_avg / exp_avg_sq) into ``out``
        (``fragment.numel * 4`` bytes)."""
        raise NotImplementedError

    def close(self):
        pass


class ShardFiles(FragmentSource):
    """Fragments read by byte range from the shard files this rank opened (``shards``: source index ->
    the lazily opened pickle); each file is opened once and kept open until :meth:`close`."""

    def __init__(self, shards: Dict[int, Any], family: Family):
        self.shards, self.family = shards, family
        self._fds = FileDescriptors()

    def read_into(self, fragment: Fragment, state: str, out: memoryview):
        read_fragment(self.shards[fragment.source], self.family, fragment, state, out, self._fds)

    def close(self):
        self._fds.close()
