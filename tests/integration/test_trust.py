"""Checkpoints from elsewhere: no code they name ever runs (convert, inspect, verify, both loaders), no
name read from them builds a path outside the output, and sizes they declare are checked against the
file before anything is allocated. Hostile and damaged inputs are edited copies of real checkpoints."""
import os

import pytest
import torch

import uckpt
from helpers.checks import partial_folders
from uckpt.dsformat.shards import load_shard
from uckpt.tools import cli
from uckpt.torchsave import format as F
from uckpt.torchsave import writer as tsave


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


def test_a_missing_last_dp_rank_is_named(copy_tag, tmp_path, capsys):
    """The file grid 0..1 looks complete without rank 2: the recorded dp_world_size=3 says otherwise."""
    tag = copy_tag("z2-fp32-dp3")
    os.remove(os.path.join(tag, "zero_pp_rank_2_mp_rank_00_optim_states.pt"))
    rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(tmp_path / "u"),
                      "--inject_missing_state", "--quiet")
    assert rc == 2 and "dp_world_size=3" in err and "zero_pp_rank_2_mp_rank_00_optim_states.pt" in err, err


WRONG_TYPES = [
    ("z2-bf16-dp4", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
     lambda sd: sd["optimizer_state_dict"].__setitem__("single_partition_of_fp32_groups", "oops"),
     "single_partition_of_fp32_groups: is a str, not a list"),
    ("z2-bf16-dp4", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
     lambda sd: sd["optimizer_state_dict"]["single_partition_of_fp32_groups"].__setitem__(0, 7),
     "single_partition_of_fp32_groups[0]: is a int, not a tensor"),
    ("z2-bf16-dp4", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
     lambda sd: sd["optimizer_state_dict"].__setitem__("zero_stage", "two"),
     "zero_stage: is a str, not an int"),
    ("z2-bf16-dp4", "mp_rank_00_model_states.pt",
     lambda sd: sd["module"].__setitem__("norm.weight", "not a tensor"),
     "'module'['norm.weight']: is a str, not a tensor"),
    ("z3-bf16-dp2", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
     lambda sd: sd["optimizer_state_dict"].__setitem__("fp32_flat_groups", ["x"]),
     "fp32_flat_groups[0]: is a str, not a tensor"),
    # DeepSpeed's converter reads both recorded degrees and fails without them (found by scripts/fuzz.py)
    ("z2-bf16-dp4", "mp_rank_00_model_states.pt",
     lambda sd: sd["checkpoint_parallel_dimensions"].pop("tp_degree"),
     "'checkpoint_parallel_dimensions'['tp_degree']: is a NoneType, not an int"),
    ("z2-bf16-dp4", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",  # found by scripts/fuzz.py too
     lambda sd: sd["optimizer_state_dict"]["base_optimizer_state"]["state"][0].__setitem__("step", torch.zeros(0)),
     "['step']: is a tensor of 0 elements, not one step value"),
    ("z2-bf16-dp4", "mp_rank_00_model_states.pt", lambda sd: sd.__setitem__("ds_config", 2.5),  # fuzz again
     "'ds_config': is a float, not a dict"),
    # where a value uckpt needs sits inside a stand-in, the error names its global
    ("z3-bf16-dp2", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
     lambda sd: sd["optimizer_state_dict"]["fp32_flat_groups"].__setitem__(0, Payload("/nonexistent/ran")),
     "fp32_flat_groups[0]: is a stand-in for posix.system, not a tensor"),
]


@pytest.mark.parametrize("name,file,edit,message", WRONG_TYPES, ids=[f"{i}-{m.split(':')[0]}" for i, (*_, m) in
                                                                      enumerate(WRONG_TYPES)])
def test_values_of_the_wrong_type_name_the_file_and_key(copy_tag, tmp_path, capsys, name, file, edit, message):
    tag = copy_tag(name)
    path = os.path.join(tag, file)
    sd = torch.load(path, map_location="cpu", weights_only=False)
    edit(sd)
    torch.save(sd, path)
    rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(tmp_path / "u"),
                      "--inject_missing_state", "--quiet")
    assert rc == 2 and file in err and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_optimizer_state_as_a_list_of_groups_is_accepted(store, copy_tag, tmp_path, capsys):
    """DeepSpeed's converter indexes the optimizer's per-group ``state`` as a list too (its AutoTP tests
    write it so): the conversion equals the one of the original dict form."""
    from uckpt.tools.compare import compare_universal

    tag = copy_tag("z3-bf16-dp2")
    for d in range(2):
        path = os.path.join(tag, f"bf16_zero_pp_rank_{d}_mp_rank_00_optim_states.pt")
        sd = torch.load(path, map_location="cpu", weights_only=False)
        inner = sd["optimizer_state_dict"]["optimizer_state_dict"]
        inner["state"] = [inner["state"][k] for k in sorted(inner["state"])]
        torch.save(sd, path)
    out = tmp_path / "u"
    rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(out), "--inject_missing_state",
                      "--quiet")
    assert rc == 0, err
    # every parameter equal; optimizer_state.pt carries the input's state as it was given (a list)
    skip = lambda rel: rel == os.path.join("zero", "optimizer_state.pt")  # noqa: E731
    assert compare_universal(str(out), store.uckpt_universal("z3-bf16-dp2", 1), skip=skip) == []


def test_a_conversion_holding_the_output_lock_stops_the_second(store, tmp_path, capsys):
    import fcntl

    out = tmp_path / "u"
    holder = os.open(str(out) + ".uckpt-lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a first conversion (e.g. the requeued job's twin) is writing
    try:
        rc, _, err = _run(capsys, "convert", "--input_folder", store.tag("z2-bf16-dp4"), "--output_folder", str(out),
                          "--inject_missing_state", "--quiet")
    finally:
        os.close(holder)
    assert rc == 2 and "another conversion is writing this output" in err and "--wait_for_lock" in err, err
    assert not out.exists() and partial_folders(out) == []


def _flip(path, at=0):
    """Flip one bit inside the largest tensor record of ``path``; returns the record's name."""
    from uckpt.torchsave.zipfmt import record_spans

    name, (start, _) = max(((n, s) for n, s in record_spans(path).items() if "/data/" in n), key=lambda x: x[1][1])
    with open(path, "r+b") as f:
        f.seek(start + at)
        byte = f.read(1)[0]
        f.seek(start + at)
        f.write(bytes([byte ^ 0x10]))
    return name


@pytest.mark.parametrize("name,file", [("z2-bf16-dp4", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                       ("z3-bf16-dp2", "zero_pp_rank_1_mp_rank_00_model_states.pt")])
def test_damaged_bytes_fail_their_crc(copy_tag, tmp_path, capsys, name, file):
    """One flipped bit in tensor data: DeepSpeed converts it silently (or copies the damaged model file
    into its output); uckpt names the file and record, and publishes nothing. --no_verify_crc skips the check."""
    tag = copy_tag(name)
    record = _flip(os.path.join(tag, file), at=5)
    out = tmp_path / "u"
    rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(out), "--inject_missing_state",
                      "--quiet")
    assert rc == 2 and file in err and f"record {record} fails its CRC-32 check" in err, err
    assert not out.exists() and partial_folders(out) == []
    rc, _, err = _run(capsys, "convert", "--input_folder", tag, "--output_folder", str(out), "--inject_missing_state",
                      "--quiet", "--no_verify_crc")
    assert rc == 0, err


def test_a_rank_killed_midway_publishes_nothing_and_the_rerun_resumes(store, tmp_path):
    """SIGKILL one rank of a 2-rank torchrun conversion after it wrote some parameters: the job ends
    non-zero well within the collective timeout, torchrun names the lost rank, nothing is published.
    The same command again resumes the partial folder, reuses what the dead run wrote intact, and its
    output equals an uninterrupted conversion."""
    import time

    from examples import runner
    from uckpt.tools.compare import compare_universal

    tag = store.tag("z2-bf16-dp4")
    out = str(tmp_path / "ckpts" / "universal")
    args = ["convert", "--input_folder", tag, "--output_folder", out, "--inject_missing_state", "--quiet",
            "--memory_budget_mb", "0", "--timeout_s", "60"]  # one state of one parameter per wave
    job = os.path.join(os.path.dirname(__file__), "jobs", "killed_convert.py")
    t0 = time.monotonic()
    proc = runner.run(runner.torchrun_cmd(2, [job, *args]), check=False, timeout=300,
                      extra_env={"KILL_RANK": "1", "KILL_AFTER": "4"})  # a parameter complete, the next one in part
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    assert "rank: 1" in proc.stdout and ("SIGKILL" in proc.stdout or "exitcode  : -9" in proc.stdout), proc.stdout
    assert not os.path.exists(out) and len(partial_folders(out)) == 1
    assert not os.path.exists(os.path.join(os.path.dirname(out), "latest_universal"))
    left = partial_folders(out)[0]
    runner.uckpt_convert(2, tag, out, "--inject_missing_state", "--quiet", "--memory_budget_mb", "0")
    report = uckpt_report(out)
    assert report["resumed"]["from"] == left
    assert 1 <= report["resumed"]["params_reused"] < report["checkpoint"]["params"]
    assert partial_folders(out) == [] and not os.path.exists(os.path.join(out, ".uckpt-resume"))
    assert compare_universal(out, store.uckpt_universal("z2-bf16-dp4", 2)) == []


def test_the_loader_returns_unknown_client_objects_inert_unless_trusted(store, tmp_path):
    """The client state of a model file (keys DeepSpeed does not consume) may hold any object: the
    loader returns it as an inert stand-in; ``trust_checkpoint=True`` unpickles it for real."""
    import datetime
    import json
    import shutil

    from examples import runner

    root = tmp_path / "ckpts"
    shutil.copytree(store.uckpt_universal("z2-bf16-dp4", 1), root / "universal")
    (root / "latest_universal").write_text("universal")
    _plant(str(root / "universal" / "mp_rank_00_model_states.pt"), "when", datetime.date(2026, 11, 29))
    for trust, expected in ((False, "uckpt.torchsave.format.date"), (True, "datetime.date")):
        report = str(tmp_path / f"r{trust}.json")
        runner.train(2, "--zero-stage", "2", "--dtype", "bf16", "--steps", "1", "--load-dir", str(root),
                     "--loader", "uckpt", "--report", report, *(["--trust-checkpoint"] if trust else []))
        with open(report + ".load0.json") as f:
            assert json.load(f)["client_types"]["when"] == expected
