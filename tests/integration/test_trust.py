"""Checkpoints from elsewhere: no code they name ever runs (convert, inspect, verify, both loaders), no
name read from them builds a path outside the output, and sizes they declare are checked against the
file before anything is allocated. Hostile and damaged inputs are edited copies of real checkpoints."""
import os

import pytest
import torch

import uckpt
from uckpt.dsformat.shards import load_shard
from uckpt.tools import cli
from uckpt.torchsave import format as F
from uckpt.torchsave import writer as tsave
from helpers.checks import partial_folders


class Payload:
    """Unpickling this object runs ``touch <marker>``: the hole DeepSpeed's converter leaves open."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, key, value):
    """Add ``key: value`` to the dict saved in ``path`` (a copy of a real checkpoint file)."""
    sd = torch.load(path, map_location="cpu", weights_only=False)
    sd[key] = value
    torch.save(sd, path)


def _rewrite(path, obj):
    """Save ``obj`` (read lazily from ``path``: its tensors still in that file) over ``path``."""
    tsave.save(obj, path + ".new")
    os.replace(path + ".new", path)


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_convert_and_inspect_run_no_code_from_shards(copy_tag, tmp_path, capsys):
    tag = copy_tag("z2-bf16-dp4")
    marker = tmp_path / "ran"
    _plant(os.path.join(tag, "mp_rank_00_model_states.pt"), "client_extra", Payload(marker))
    _plant(os.path.join(tag, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"), "extra", Payload(marker))
    out = tmp_path / "u"
    rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(out), "--inject_missing_state",
                      "--quiet")
    assert rc == 0, err
    assert not marker.exists()
    # the object stays in the copied model file, inert, and the report names its global
    report = uckpt_report(out)
    assert "posix.system" in report["unknown_globals"]
    assert load_shard(str(out / "mp_rank_00_model_states.pt"))["client_extra"].__class__.__name__ == "system"
    rc, printed, err = _run(capsys, "inspect", tag)
    assert rc == 0, err
    assert not marker.exists()


def uckpt_report(folder):
    import json

    with open(os.path.join(folder, "uckpt_report.json")) as f:
        return json.load(f)


def test_verify_and_loaders_run_no_code_from_a_universal_folder(store, tmp_path, capsys):
    import shutil

    src = store.uckpt_universal("z2-bf16-dp4", 1)
    folder = tmp_path / "ckpt" / "universal"
    shutil.copytree(src, folder)
    marker = tmp_path / "ran"
    _plant(str(folder / "zero" / "optimizer_state.pt"), "extra", Payload(marker))
    fp32 = folder / "zero" / "blocks.0.weight" / "fp32.pt"
    _plant(str(fp32), "extra", Payload(marker))
    rc, printed, err = _run(capsys, "verify", str(folder))
    assert rc != 0 and "cannot be loaded safely" in (printed + err)
    assert not marker.exists()
    weights = uckpt.load_state_dict(str(folder))  # the planted object stays an inert, unused stand-in
    assert weights["blocks.0.weight"].shape == (32, 32)
    assert not marker.exists()


def test_names_from_a_checkpoint_cannot_escape_the_output(copy_tag, tmp_path, capsys):
    """A module key such as ``../../x`` would become the folder zero/../../x: refused before any write."""
    tag = copy_tag("z2-bf16-dp4")
    model = os.path.join(tag, "mp_rank_00_model_states.pt")
    clean = torch.load(model, map_location="cpu", weights_only=False)
    out = tmp_path / "work" / "out" / "universal"
    for hostile in ("../../escaped", "/tmp/uckpt-escaped-abs", "a/../../b", ".."):
        sd = dict(clean, module=dict(clean["module"], **{hostile: torch.ones(3)}))
        torch.save(sd, model)
        rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(out),
                          "--inject_missing_state", "--quiet")
        assert rc == 2 and "cannot name a folder" in err and repr(hostile) in err, err
        assert not out.exists() and partial_folders(out) == []
        assert not (tmp_path / "work" / "escaped").exists() and not os.path.exists("/tmp/uckpt-escaped-abs")


def test_latest_universal_cannot_point_outside(store, tmp_path):
    import shutil

    root = tmp_path / "ckpts"
    shutil.copytree(store.uckpt_universal("z2-bf16-dp4", 1), root / "universal")
    (root / "latest_universal").write_text("../../elsewhere")
    with pytest.raises(uckpt.CheckpointError, match="cannot name a folder"):
        uckpt.load_state_dict(str(root))


def test_declared_sizes_are_checked_against_the_file(copy_tag, tmp_path, capsys):
    """A shard whose tensor declares 32M elements over a 16-byte storage: refused while reading the
    pickle, naming the file, before any buffer of the declared size exists."""
    tag = copy_tag("z2-bf16-dp4")
    shard = os.path.join(tag, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    sd = load_shard(shard)
    groups = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    groups[0] = F.TensorData("float32", (32_000_000,), bytearray(16))
    _rewrite(shard, sd)
    out = tmp_path / "u"
    rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(out), "--inject_missing_state",
                      "--quiet")
    assert rc == 2 and "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in err and "storage record" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_big_endian_files_are_refused(copy_tag, tmp_path, capsys, monkeypatch):
    tag = copy_tag("z2-bf16-dp4")
    model = os.path.join(tag, "mp_rank_00_model_states.pt")
    sd = load_shard(model)
    monkeypatch.setattr(F, "BYTEORDER", ("byteorder", b"big"))
    _rewrite(model, sd)
    monkeypatch.undo()
    rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(tmp_path / "u"),
                      "--inject_missing_state", "--quiet")
    assert rc == 2 and "big-endian" in err and "mp_rank_00_model_states.pt" in err, err
