"""Every test under tests/integration runs real DeepSpeed jobs or conversions: marked ``slow``, so
``pytest tests/unit`` (or ``-m "not slow"``) is the inner loop."""
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items):
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.slow)
