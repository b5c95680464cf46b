"""The Hugging Face Trainer with DeepSpeed ZeRO-2 (bf16, CPU, examples/hf_trainer.py): a Trainer checkpoint
saved at 2 processes, converted by uckpt, and resumed by ``trainer.train(resume_from_checkpoint=...)`` at
3 processes through DeepSpeed's load_universal continues at the saved step with the uninterrupted run's losses."""
import json

import pytest

from examples import runner

MODULE = "examples.hf_trainer"


def test_trainer_resumes_from_universal_at_3_processes(tmp_path):
    out, ref, res = tmp_path / "run", tmp_path / "ref.json", tmp_path / "resumed.json"
    # uninterrupted: 8 steps at 2 processes, a Trainer checkpoint (checkpoint-4/global_step4) at step 4
    runner.train(2, "--save-dir", str(out), "--steps", "8", "--save-steps", "4", "--report", str(ref),
                 module=MODULE)
    ckpt = out / "checkpoint-4"
    assert (ckpt / "latest").read_text().strip() == "global_step4"
    runner.uckpt_convert(1, str(ckpt / "global_step4"), str(ckpt / "global_step4_universal"),
                         "--inject_missing_state")
    assert (ckpt / "latest_universal").read_text().strip() == "global_step4_universal"
    # resumed at 3 processes (the same global batch of 6: 3x2 rows instead of 2x3)
    runner.train(3, "--save-dir", str(tmp_path / "resumed"), "--steps", "8", "--resume-from", str(ckpt),
                 "--report", str(res), module=MODULE)
    a, b = json.loads(ref.read_text()), json.loads(res.read_text())
    assert a["world"] == 2 and a["logged_steps"] == list(range(1, 9))
    assert a["end"] == {"global_step": 8, "engine_global_steps": 8}
    # the Trainer's step and DeepSpeed's both continue from 4, and so does the learning-rate schedule
    assert b["world"] == 3 and b["start"] == {"global_step": 4, "engine_global_steps": 4}
    assert b["end"] == {"global_step": 8, "engine_global_steps": 8}
    assert b["logged_steps"] == [5, 6, 7, 8]
    assert b["lrs"] == a["lrs"][4:]
    assert b["losses"] == pytest.approx(a["losses"][4:], rel=1e-3)  # seen: within 3e-5
    # the weights were loaded: a fresh model's first loss is far from the resumed one
    assert b["losses"][0] != pytest.approx(a["losses"][0], rel=1e-2)
