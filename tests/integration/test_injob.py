"""uckpt.save_universal in live DeepSpeed jobs: the folder a training run writes from memory equals
``engine.save_checkpoint`` of the same state followed by DeepSpeed's ``ds_to_universal.py`` (the
store's training runs do both at the same step), in blocking and background mode; resumption from it;
refusals; the preemption pattern."""
import json
import os

import pytest

from uckpt.tools.compare import checkpoint_files, compare_universal
from examples import runner

from helpers.checks import assert_same_state, partial_folders
from helpers.store import CKPTS

TIED_ALIAS = os.path.join("zero", "head.weight", "fp32.pt")  # the documented difference (test_matches_deepspeed)
INJOB = sorted(name for name, c in CKPTS.items() if c.injob)


def _deepspeed_universal(store, name):
    return store.ds_universal(name) if store.injects(name) else store.universal_pair(name, 1)[1]


def _injob_report(store, name):
    with open(os.path.join(store.root, name, "reference.json.injob.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", INJOB)
def test_equals_save_checkpoint_then_ds_to_universal(store, name):
    ours, theirs = store.injob_universal(name), _deepspeed_universal(store, name)
    assert checkpoint_files(ours) == checkpoint_files(theirs) and len(checkpoint_files(ours)) > 10
    assert compare_universal(ours, theirs, skip=lambda rel: rel == TIED_ALIAS) == []
    report = _injob_report(store, name)
    assert report["in_job"]["blocking"] == (CKPTS[name].injob == "blocking")
    assert report["input_folder"].startswith("in-job save")
    assert os.path.basename(ours) == f"global_step{CKPTS[name].save_at}_universal"
    assert partial_folders(ours) == []
    # nothing native was written next to it: the save folder holds the Universal folder only
    assert sorted(os.listdir(os.path.dirname(ours))) == sorted([os.path.basename(ours), "latest_universal"])


def test_background_save_holds_the_state_of_the_call(store):
    """The run overwrote every master weight, moment and model weight with NaN right after the call
    returned and before the conversion began (its conversion was held until then): the folder still
    equals DeepSpeed's conversion of the native save of that step (the test above), and holds no NaN."""
    import torch

    name = "z2-bf16-dp4"
    report = _injob_report(store, name)
    assert report["in_job"]["blocking"] is False and report["in_job"]["snapshot_bytes"] > 0
    ours = store.injob_universal(name)
    for rel in checkpoint_files(ours):
        if rel.endswith(("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")):
            value = torch.load(os.path.join(ours, rel), weights_only=False)
            value = value["param"] if isinstance(value, dict) else value
            assert not torch.isnan(value).any(), rel


@pytest.mark.parametrize("loader", ["deepspeed", "uckpt"])
def test_resume_at_another_dp_size(store, loader):
    """Saved in-job at DP=4 (ZeRO-2), resumed at DP=3: the state and next losses equal a resume from
    DeepSpeed's conversion of the native save, which continue the uninterrupted run's losses."""
    name = "z2-bf16-dp4"
    runs = store.resumes(name, 3, (), store.injob_universal(name), store.ds_universal(name))
    ours, theirs = (runs["ds@ours"], runs["ds@theirs"]) if loader == "deepspeed" else (runs["uckpt@ours"], runs["uckpt@theirs"])
    assert_same_state(ours.state, theirs.state)
    assert ours.losses == theirs.losses
    assert ours.losses == pytest.approx(store.reference_losses(name)[3:5], rel=2e-2)


def test_resume_autotp_at_tp1(store):
    name = "tp2-dp2-z2-bf16"
    args = ("--tp", "1", "--zero-stage", "2", "--dtype", "bf16")
    runs = store.resumes(name, 2, args, store.injob_universal(name), store.universal_pair(name, 1)[1])
    for ours, theirs in (("ds@ours", "ds@theirs"), ("uckpt@ours", "uckpt@theirs")):
        assert_same_state(runs[ours].state, runs[theirs].state)
        assert runs[ours].losses == runs[theirs].losses


def test_refusals_and_cpu_offload(tmp_path):
    """One 2-rank job (tests/integration/jobs/injob_errors.py): an existing output is refused on every
    rank unless overwrite; a non-Adam optimizer is named; CPU optimizer offload saves what DeepSpeed's
    converter makes of its native save; a second background save waits for the first; a background
    save that fails raises in wait() on every rank and publishes nothing; a call on one rank only fails
    there within the timeout naming the rank that did not call, and the job ends."""
    out = tmp_path / "out.json"
    runner.run(runner.torchrun_cmd(2, [os.path.join(runner.REPO, "tests", "integration", "jobs", "injob_errors.py"),
                                       str(tmp_path / "ckpts"), str(out)]), timeout=300)
    result = json.loads(out.read_text())
    assert result["exists"] == ["OutputError"] * 2 and "already exists" in result["exists_message"]
    assert result["overwrite"] == "ok"
    assert result["sgd"] == ["UnsupportedEngineError"] * 2 and "SGD" in result["sgd_message"]
    assert result["offload"] == "ok" and result["offload_params"] > 0
    theirs = str(tmp_path / "ds-offload")
    runner.ds_to_universal(str(tmp_path / "ckpts" / "native" / "offload"), theirs, "--inject_missing_state")
    ours = str(tmp_path / "ckpts" / "offload")
    assert compare_universal(ours, theirs, skip=lambda rel: rel == TIED_ALIAS) == []
    assert sorted(result["unpicklable"]) == ["OutputError", "RemoteError"] and result["unpicklable_seconds"] < 30
    assert "cannot write mp_rank_00_model_states.pt" in result["unpicklable_message"]
    assert not os.path.exists(tmp_path / "ckpts" / "bad")
    assert result["first_done_when_second_returned"] is True and result["background_pair"] == [True, True]
    assert result["background_failure"] == ["OutputError", "RemoteError"]  # raised by wait() on both ranks
    assert "cannot create the output's folder" in result["background_failure_message"]
    assert not os.path.exists(tmp_path / "ckpts" / "a-file" / "x")
    assert result["one_rank"][0] == "UckptError" and "rank(s) [1]" in result["one_rank_message"]
    assert result["one_rank_seconds"] < 60


def test_preemption_signal_saves_and_resumes(store, tmp_path):
    """The documented pattern: SIGUSR1 (here rank 0 signals itself after step 2, as SLURM's --signal
    would all ranks) makes every rank save a Universal checkpoint at the next step boundary and leave.
    The run resumes from it at another DP size and continues the uninterrupted run's losses."""
    name = "z2-bf16-dp4"
    save = tmp_path / "ckpts"
    proc = runner.train(4, *CKPTS[name].args, "--steps", "5", "--save-universal-on-signal", "USR1",
                        "--save-universal", str(save), "--signal-self-at", "2",
                        "--report", str(tmp_path / "report.json"))
    assert "saved a Universal checkpoint on SIGUSR1" in proc.stdout
    with open(save / "latest_universal") as f:
        tag = f.read().strip()
    assert tag == "global_step3_universal"
    with open(tmp_path / "report.json") as f:
        assert len(json.load(f)["losses"]) == 3  # left after the step it was signalled in
    state, report = store.resume(name, str(save / tag), 3, *CKPTS[name].args)
    assert state["global_steps"] == 3
    assert report["losses"] == pytest.approx(store.reference_losses(name)[3:5], rel=2e-2)


def test_called_in_a_job_without_process_group_is_refused():
    import uckpt

    with pytest.raises(uckpt.UckptError, match="inside a distributed DeepSpeed job"):
        uckpt.save_universal(object(), "/nonexistent/ckpts")
    assert not os.path.exists("/nonexistent")
