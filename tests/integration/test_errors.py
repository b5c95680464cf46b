"""Bad input: a one-line error naming the file and the fix, non-zero exit on every rank, no hang,
no output folder left behind that looks complete, input untouched. Damaged inputs are real
checkpoints with files deleted, truncated or swapped."""
import hashlib
import os
import shutil


from uckpt.tools import cli
from examples import runner
from helpers.checks import partial_folders


def _fingerprint(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def _convert(capsys, *args):
    rc = cli.main(["convert", "--quiet", *args])
    return rc, capsys.readouterr().err


def _assert_no_output(out):
    assert not os.path.exists(out)
    assert partial_folders(out) == []


def test_missing_optimizer_shard(copy_tag, tmp_path, capsys):
    tag = copy_tag("z2-bf16-dp4")
    os.remove(os.path.join(tag, "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"))
    before = _fingerprint(tag)
    out = str(tmp_path / "out" / "universal")
    rc, err = _convert(capsys, "--input_folder", tag, "--output_folder", out, "--inject_missing_state")
    assert rc == 2
    assert "uckpt: error:" in err and "dp rank 2, mp rank 00 is missing" in err and tag in err
    assert len(err.strip().splitlines()) == 1
    _assert_no_output(out)
    assert _fingerprint(tag) == before


def test_truncated_shard_fails_on_every_rank_without_hanging(copy_tag, tmp_path):
    tag = copy_tag("z2-bf16-dp4")
    bad = os.path.join(tag, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    before = _fingerprint(tag)
    out = str(tmp_path / "out" / "universal")
    proc = runner.uckpt_convert(2, tag, out, "--inject_missing_state", "--timeout_s", "60", check=False, timeout=120)
    assert proc.returncode != 0
    # both ranks report, with the same cause (their stderr lines may interleave)
    assert proc.stdout.count("uckpt: error:") == 2, proc.stdout
    assert proc.stdout.count("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: cannot be read, the file is "
                             "truncated or corrupt") == 2
    assert "converter rank 1 failed" in proc.stdout
    _assert_no_output(out)
    assert _fingerprint(tag) == before


def test_not_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    rc, err = _convert(capsys, "--input_folder", str(folder), "--output_folder", str(tmp_path / "o"))
    assert rc == 2 and "is not a DeepSpeed checkpoint folder" in err


def test_missing_folder(tmp_path, capsys):
    rc, err = _convert(capsys, "--input_folder", str(tmp_path / "nope"), "--output_folder", str(tmp_path / "o"))
    assert rc == 2 and "does not exist" in err


def test_save_directory_instead_of_tag(store, tmp_path, capsys):
    save = store.save_dir("z2-fp32-dp3")
    rc, err = _convert(capsys, "--input_folder", save, "--output_folder", str(tmp_path / "o"))
    assert rc == 2 and "is a save directory" in err and os.path.join(save, "global_step3") in err


def test_zero0_or_weights_only_save(copy_tag, tmp_path, capsys):
    tag = copy_tag("z2-fp32-dp3")
    for n in os.listdir(tag):
        if n.endswith("_optim_states.pt"):
            os.remove(os.path.join(tag, n))
    rc, err = _convert(capsys, "--input_folder", tag, "--output_folder", str(tmp_path / "o"))
    assert rc == 2 and "no optimizer shards" in err


def test_mixed_stages(store, copy_tag, tmp_path, capsys):
    tag = copy_tag("z1-bf16-dp2")
    # rank 1's shard replaced by the ZeRO-2 shard of another run
    shutil.copy(os.path.join(store.tag("z2-bf16-dp4"), "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"), tag)
    rc, err = _convert(capsys, "--input_folder", tag, "--output_folder", str(tmp_path / "o"), "--inject_missing_state")
    assert rc == 2 and "mixes stages" in err and "bf16_zero_pp_rank_1_mp_rank_00" in err


def test_mixed_zero3_and_zero12_files(store, copy_tag, tmp_path, capsys):
    tag = copy_tag("z2-bf16-dp4")
    shutil.copy(os.path.join(store.tag("z3-bf16-dp2"), "zero_pp_rank_0_mp_rank_00_model_states.pt"), tag)
    rc, err = _convert(capsys, "--input_folder", tag, "--output_folder", str(tmp_path / "o"))
    assert rc == 2 and "mixes ZeRO-1/2 model files" in err


def test_missing_universal_checkpoint_info(store, tmp_path, capsys):
    rc, err = _convert(capsys, "--input_folder", store.tag("z2-fp32-dp3"), "--output_folder", str(tmp_path / "o"))
    assert rc == 2 and "universal_checkpoint_info" in err and "--inject_missing_state" in err
    _assert_no_output(str(tmp_path / "o"))


def test_output_exists_needs_overwrite(store, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["--input_folder", store.tag("z2-fp32-dp3"), "--output_folder", str(out), "--inject_missing_state"]
    rc, err = _convert(capsys, *args)
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").exists()
    # --overwrite replaces only a Universal checkpoint: a plain folder stays as it is
    rc, err = _convert(capsys, *args, "--overwrite")
    assert rc == 2 and "is not a Universal checkpoint" in err
    assert (out / "keep.txt").read_text() == "x"
    universal = tmp_path / "u"
    assert _convert(capsys, *args[:3], str(universal), "--inject_missing_state")[0] == 0
    (universal / "zero" / "stale.txt").write_text("from an earlier run")
    rc, err = _convert(capsys, *args[:3], str(universal), "--inject_missing_state", "--overwrite")
    assert rc == 0, err
    assert not (universal / "zero" / "stale.txt").exists() and (universal / "zero" / "optimizer_state.pt").exists()


def test_overwrite_never_replaces_a_native_checkpoint(store, copy_tag, tmp_path, capsys):
    """Pointed at another native ZeRO tag folder, --overwrite refuses, and the folder is untouched."""
    other = copy_tag("z2-bf16-dp4")
    before = _fingerprint(other)
    rc, err = _convert(capsys, "--input_folder", store.tag("z2-fp32-dp3"), "--output_folder", other,
                       "--inject_missing_state", "--overwrite")
    assert rc == 2 and "is not a Universal checkpoint" in err and len(err.strip().splitlines()) == 1
    assert _fingerprint(other) == before


def test_output_inside_input(store, capsys):
    tag = store.tag("z2-fp32-dp3")
    rc, err = _convert(capsys, "--input_folder", tag, "--output_folder", os.path.join(tag, "universal"),
                       "--inject_missing_state")
    assert rc == 2 and "inside the input" in err
    assert not os.path.exists(os.path.join(tag, "universal"))


def test_failure_while_writing_leaves_no_output(store, tmp_path, monkeypatch, capsys):
    from uckpt.conversion import file_writers as write

    calls = {"n": 0}
    real = write._write_image  # every file of this small checkpoint is created through it

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(write, "_write_image", flaky)
    out = str(tmp_path / "o" / "universal")
    tag = store.tag("z2-fp32-dp3")
    before = _fingerprint(tag)
    rc, err = _convert(capsys, "--input_folder", tag, "--output_folder", out, "--inject_missing_state")
    assert rc == 2 and "writing the output failed: No space left on device" in err and out in err, err
    assert len(err.strip().splitlines()) == 1
    assert _fingerprint(tag) == before
    _assert_no_output(out)
    assert not os.path.exists(os.path.join(os.path.dirname(out), "latest_universal"))


def test_stale_partial_folder_from_an_interrupted_run_is_replaced(store, tmp_path, capsys):
    out = tmp_path / "o" / "universal"
    stale = tmp_path / "o" / "universal.uckpt-partial-0123456789abcdef"  # a dead run's, found under the lock
    (stale / "zero" / "junk").mkdir(parents=True)
    rc, err = _convert(capsys, "--input_folder", store.tag("z2-fp32-dp3"), "--output_folder", str(out),
                       "--inject_missing_state")
    assert rc == 0, err
    assert not stale.exists() and not (out / "zero" / "junk").exists()
