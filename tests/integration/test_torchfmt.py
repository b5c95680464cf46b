"""The torch-free reader and writer of the ``torch.save`` format (uckpt.ranged, uckpt.tsave).

What the writer produces must load with ``torch.load`` (also memory-mapped) into the objects
``torch.save`` would have written, with valid zip CRCs and 64-byte aligned records; what the reader
gives with stand-ins must write back to the same objects, DeepSpeed's classes included.
"""
import os
import subprocess
import sys

import torch

from uckpt.torchsave import reader as ranged
from uckpt.torchsave import writer as tsave
from uckpt.torchsave import format as F
from examples import runner
from helpers.checks import same


def test_stand_ins_write_back_deepspeed_objects(store, tmp_path):
    """A real optimizer shard read without DeepSpeed's classes and written again equals the original."""
    tag = store.tag("z2-bf16-dp4")
    for name in ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        src = os.path.join(tag, name)
        lazy = ranged.open_lazy(src)
        if "optimizer_state_dict" in lazy:
            osd = lazy["optimizer_state_dict"]
            assert isinstance(osd["loss_scaler"], F.Stub) and int(osd["zero_stage"]) == 2
            mapping = next(iter(osd["param_slice_mappings"][0].values()))
            assert mapping.numel > 0 and mapping.start >= 0
        out = str(tmp_path / name)
        tsave.save(lazy, out)
        same(torch.load(out, weights_only=False), torch.load(src, weights_only=False))


def test_one_process_conversion_imports_no_torch(store, tmp_path):
    """The point of the torch-free path: a dense one-process conversion loads neither torch nor
    DeepSpeed's runtime (each costs seconds at start-up)."""
    out = str(tmp_path / "u" / "universal")
    code = ("import sys; from uckpt.tools.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('torch', 'deepspeed') if m in sys.modules]; "
            "print('IMPORTED', bad); sys.exit(rc or bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code, "convert", "--input_folder", store.tag("z2-bf16-dp4"),
                           "--output_folder", out, "--inject_missing_state", "--quiet"],
                          cwd=runner.REPO, env=runner.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IMPORTED []" in proc.stdout
    skip = lambda rel: rel == os.path.join("zero", "head.weight", "fp32.pt")  # noqa: E731  (README: tied alias)
    from uckpt.tools.compare import compare_universal
    assert compare_universal(out, store.ds_universal("z2-bf16-dp4"), skip=skip) == []
