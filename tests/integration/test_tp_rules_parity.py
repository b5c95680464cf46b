"""Merge rules of universal_checkpoint_info applied as DeepSpeed applies them (also at TP=1),
checked against ds_to_universal.py on real checkpoints whose model file carries the patterns."""
import os

import pytest
import torch

from uckpt.tools.compare import compare_universal
from examples import runner
from examples.runner import JobError

RULES = {
    "universal_checkpoint_version": 0.4,
    "vocabulary_parameter_patterns": [r"^embed\.weight$"],
    "original_vocab_size": 60,  # the real 64 rows include 4 "padding" rows, stripped as DeepSpeed does
    "tp_replicated_parameter_patterns": ["norm."],
    "parameter_with_row_parallelism_patterns": [r"^blocks\.0\.weight$"],
    "parameter_to_average_patterns": ["blocks.1.bias"],
}


def _with_rules(copy_tag, rules):
    tag = copy_tag("z2-fp32-dp3")
    path = os.path.join(tag, "mp_rank_00_model_states.pt")
    sd = torch.load(path, weights_only=False)
    sd["universal_checkpoint_info"] = rules
    torch.save(sd, path)
    return tag


@pytest.mark.parametrize("nproc", [1, 2])
def test_rules_at_tp1_match_deepspeed(copy_tag, tmp_path, nproc):
    tag = _with_rules(copy_tag, RULES)
    ours, theirs = str(tmp_path / "u" / "ours"), str(tmp_path / "d" / "theirs")
    runner.ds_to_universal(tag, theirs)
    runner.uckpt_convert(nproc, tag, ours, "--quiet")
    assert compare_universal(ours, theirs) == []
    emb = torch.load(os.path.join(ours, "zero", "embed.weight", "fp32.pt"), weights_only=False)
    assert emb["vocab_tensor"] is True and emb["param"].shape == (60, 32)
    assert "cat_dim" not in torch.load(os.path.join(ours, "zero", "norm.weight", "fp32.pt"), weights_only=False)


def test_unused_pattern_fails_strict_like_deepspeed(copy_tag, tmp_path):
    tag = _with_rules(copy_tag, dict(RULES, parameter_to_average_patterns=["^nothing_matches$"]))
    with pytest.raises(JobError, match="Unused patterns"):
        runner.ds_to_universal(tag, str(tmp_path / "d" / "strict"))
    proc = runner.uckpt_convert(1, tag, str(tmp_path / "u" / "strict"), check=False)
    assert proc.returncode == 2 and "match no parameter: ['^nothing_matches$']" in proc.stdout
    ours, theirs = str(tmp_path / "u" / "loose"), str(tmp_path / "d" / "loose")
    runner.ds_to_universal(tag, theirs, "--no_strict")
    runner.uckpt_convert(1, tag, ours, "--no_strict")
    assert compare_universal(ours, theirs) == []
