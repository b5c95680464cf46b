"""The O_DIRECT write path on a real DeepSpeed checkpoint, against ds_to_universal.py."""
import os

import pytest

from uckpt.torchsave import direct as directio
from helpers.checks import direct_supported


def test_direct_path_on_a_real_checkpoint_matches_deepspeed(store, tmp_path, monkeypatch, stats):
    """The test checkpoints' tensors are far below 1 MiB, so the thresholds are lowered to one block:
    every tensor of the real DeepSpeed ZeRO-2 bf16 checkpoint then streams through the direct path
    (4 KiB-aligned records, aligned buffers), and the output must still equal ds_to_universal's."""
    from uckpt import convert
    from uckpt.conversion import output as write
    from uckpt.tools.compare import compare_universal
    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT")
    monkeypatch.setattr(directio, "MIN_DIRECT", directio.DIRECT_ALIGN)
    monkeypatch.setattr(directio.Sink, "FLUSH_AT", directio.DIRECT_ALIGN)
    monkeypatch.setattr(write, "THREADED_WRITE_BYTES", 0)  # every file streams through tsave.save
    out = str(tmp_path / "u" / "universal")
    convert(store.tag("z2-bf16-dp4"), out, inject_missing_state=True, log={"quiet": True})
    assert stats["direct_bytes"] > 0
    skip = lambda rel: rel == os.path.join("zero", "head.weight", "fp32.pt")  # noqa: E731  (README: tied alias)
    assert compare_universal(out, store.ds_universal("z2-bf16-dp4"), skip=skip) == []
