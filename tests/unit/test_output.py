"""The output folder: one writer per output (a lock), a partial folder unique to the run, publication
that cannot clobber a folder published meanwhile, and files made durable before the rename."""
import fcntl
import glob
import json
import os
import threading

import pytest

from uckpt.conversion import durable, output
from uckpt.errors import OutputError
from uckpt.torchsave.format import TensorData


def _states():
    return {"fp32": {"param": TensorData("float32", (2,), bytearray(8))}}


def test_a_second_writer_is_refused_while_the_lock_is_held(tmp_path):
    final = tmp_path / "u"
    holder = os.open(str(final) + output.LOCK_SUFFIX, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another conversion of the same output
    out = output.OutputFolder(str(final), run_id="b")
    try:
        with pytest.raises(OutputError, match="another conversion is writing this output"):
            out.prepare()
        assert not os.path.exists(out.partial)
        waiting = output.OutputFolder(str(final), run_id="c", wait_for_lock=True)
        threading.Timer(0.5, lambda: os.close(holder)).start()
        waiting.prepare()  # returns once the other run let go
        assert os.path.isdir(waiting.zero)
        waiting.abort()
        waiting.close()
    finally:
        out.close()


def test_partial_folders_are_unique_per_run(tmp_path):
    a, b = output.OutputFolder(str(tmp_path / "u")), output.OutputFolder(str(tmp_path / "u"))
    assert a.partial != b.partial and a.partial.startswith(str(tmp_path / "u") + ".uckpt-partial-")
    a.close()
    b.close()


def test_a_folder_published_meanwhile_is_not_clobbered(tmp_path):
    final = tmp_path / "u"
    out = output.OutputFolder(str(final), run_id="a")
    final.mkdir()  # another run published here after this one checked the location
    (final / "theirs.txt").write_text("x")
    with pytest.raises(OutputError, match="published by another run"):
        out.prepare()
    out.close()
    assert (final / "theirs.txt").read_text() == "x"


def test_files_are_synced_and_the_rename_made_durable(tmp_path, monkeypatch):
    synced, fsynced = [], []
    monkeypatch.setattr(durable, "syncfs", lambda path: synced.append(path))
    real_fsync = os.fsync
    monkeypatch.setattr(output.os, "fsync", lambda fd: (fsynced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd)))
    final = tmp_path / "ckpts" / "u"
    final.parent.mkdir()
    out = output.OutputFolder(str(final), run_id="r1")
    out.prepare()
    out.write_param("w", _states())
    out.flush()
    out.sync()
    latest = out.finish()
    out.close()
    assert synced == [out.partial]
    # the partial folder before its rename, the parent after it, latest_universal's bytes, the parent again
    assert fsynced == [out.partial, str(final.parent), str(final.parent / "latest_universal.uckpt-tmp-r1"),
                       str(final.parent)]
    assert open(latest).read() == "u" and sorted(os.listdir(final.parent)) == ["latest_universal", "u"]  # the lock file goes with the lock
    assert (final / "zero" / "w" / "fp32.pt").exists()


def _crashed_run(final, key):
    """A run that wrote parameter ``w`` and then died (no abort: its partial folder and manifest stay)."""
    out = output.OutputFolder(str(final), run_id="dead")
    out.prepare(key)
    out.write_param("w", _states())
    out.flush()
    out._pool.shutdown()
    out._manifest.close()
    os.close(out._lock_fd)  # the process is gone: its lock with it
    return out.partial


def test_a_rerun_adopts_the_dead_runs_partial_folder_and_trusts_only_intact_files(tmp_path):
    key = {"input": "x", "files": [["a", 1, 2]]}
    dead = _crashed_run(tmp_path / "u", key)
    out = output.OutputFolder(str(tmp_path / "u"), run_id="next")
    assert out.prepare(key) == dead and not os.path.exists(dead)
    assert out.reusable(["w", "v"]) == {"w"}
    with open(os.path.join(out.zero, "w", "fp32.pt"), "r+b") as f:  # a byte of it damaged since
        f.seek(os.path.getsize(f.name) - 30)
        f.write(b"\xff")
    assert out.reusable(["w"]) == set()
    out.abort()
    out.close()


def test_a_parameter_written_a_state_at_a_time_is_recorded_once_complete(tmp_path):
    """A parameter too large for the memory budget is written one state per wave: a run that died
    between its parts left files of it, but the manifest names it only with all its files."""
    key = {"input": "x"}
    states = dict(_states(), exp_avg=_states()["fp32"])
    first, rest = dict(list(states.items())[:1]), dict(list(states.items())[1:])
    out = output.OutputFolder(str(tmp_path / "u"), run_id="dead")
    out.prepare(key)
    out.write_param("w", first, complete=False)
    out.flush()
    assert out.reusable(["w"]) == set()  # its first file is written, the parameter is not complete
    out.write_param("w", rest)
    out.flush()
    assert out.reusable(["w"]) == {"w"}
    manifest = [json.loads(line) for path in glob.glob(os.path.join(out.resume, "manifest-*.jsonl"))
                for line in open(path)]
    assert [sorted(os.path.basename(f) for f in e["files"]) for e in manifest] == \
        [sorted(name + ".pt" for name in states)]
    out.abort()
    out.close()


@pytest.mark.parametrize("restart,other_input", [(True, False), (False, True)])
def test_restart_or_another_input_starts_afresh(tmp_path, restart, other_input):
    key = {"input": "x"}
    dead = _crashed_run(tmp_path / "u", key)
    out = output.OutputFolder(str(tmp_path / "u"), run_id="next")
    assert out.prepare({"input": "y"} if other_input else key, restart=restart) is None
    assert not os.path.exists(dead) and out.reusable(["w"]) == set()
    out.abort()
    out.close()


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("keep me")
    final = tmp_path / "u"
    os.symlink(victim, str(final) + output.LOCK_SUFFIX)
    out = output.OutputFolder(str(final), run_id="a")
    with pytest.raises(OutputError, match="lock file"):
        out.prepare()
    out.close()
    assert victim.read_text() == "keep me"


def test_a_folder_made_during_the_run_is_not_replaced_at_publication(tmp_path):
    final = tmp_path / "u"
    out = output.OutputFolder(str(final), run_id="a", overwrite=True)
    out.prepare()
    out.write_param("w", _states())
    out.flush()
    final.mkdir()  # written meanwhile by a tool that takes no lock; not a Universal checkpoint
    (final / "theirs.txt").write_text("x")
    with pytest.raises(OutputError, match="appeared while this run wrote"):
        out.finish()
    out.abort()
    out.close()
    assert (final / "theirs.txt").read_text() == "x"


def test_a_partial_folder_holding_links_is_not_resumed(tmp_path):
    key = {"input": "x"}
    dead = _crashed_run(tmp_path / "u", key)
    os.symlink(tmp_path, os.path.join(dead, "zero", "elsewhere"))
    out = output.OutputFolder(str(tmp_path / "u"), run_id="next")
    assert out.prepare(key) is None and not os.path.exists(dead) and tmp_path.exists()
    out.abort()
    out.close()


def test_only_a_folder_export_published_counts_as_an_export(tmp_path):
    """--overwrite of an export replaces only what uckpt export wrote: a Trainer checkpoint or a model
    folder that happens to hold a model.safetensors is never taken for one."""
    from uckpt.conversion.output import OutputKind

    ours = tmp_path / "ours"
    ours.mkdir()
    for name in ("model.safetensors", "config.json", "uckpt_export.json"):
        (ours / name).write_text("x")
    assert OutputKind.HF_EXPORT.looks_like(str(ours))
    trainer = tmp_path / "checkpoint-500"
    (trainer / "global_step500").mkdir(parents=True)
    for name in ("model.safetensors", "trainer_state.json", "uckpt_export.json"):
        (trainer / name).write_text("x")
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.safetensors", "README.md"):
        (model / name).write_text("x")
    assert not OutputKind.HF_EXPORT.looks_like(str(trainer)) and not OutputKind.HF_EXPORT.looks_like(str(model))
    assert not OutputKind.UNIVERSAL.looks_like(str(ours))
