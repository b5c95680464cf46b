"""Session fixtures shared by the unit and integration tests. The real DeepSpeed checkpoints are built
lazily (:class:`helpers.store.Store`): a unit test never asks for one."""
import os
import shutil
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
# the example trainers and job runner (scripts/examples) and the test helpers (tests/helpers)
sys.path[:0] = [os.path.join(os.path.dirname(TESTS), "scripts"), TESTS]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from helpers.store import Store  # noqa: E402
from uckpt.torchsave.stats import IO  # noqa: E402


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Store:
    return Store(str(tmp_path_factory.mktemp("ckpts")))


@pytest.fixture
def copy_tag(store, tmp_path):
    """A private copy of a real checkpoint's tag folder, to damage in error tests."""
    def make(name: str) -> str:
        dst = tmp_path / "input" / os.path.basename(store.tag(name))
        shutil.copytree(store.tag(name), dst)
        return str(dst)
    return make


class _Since:
    """The codec's I/O counters counted from this object's creation: ``stats["direct_bytes"]``."""

    def __init__(self):
        self.start = IO.snapshot()

    def __getitem__(self, key: str) -> int:
        return IO.since(self.start)[key]


@pytest.fixture
def stats():
    """Bytes written directly and buffered (and read) during the test."""
    return _Since()
