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
from uckpt.torchsave import direct as directio  # noqa: E402


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


@pytest.fixture
def stats():
    """uckpt.torchsave.direct's counters of bytes written directly and buffered, zeroed."""
    directio.STATS.update(direct_bytes=0, buffered_bytes=0)
    return directio.STATS
