"""A short seeded subset of scripts/fuzz.py's campaign on the session's real checkpoints: each damaged
copy ends in a one-line error (nothing published, input unchanged) or in output equal to DeepSpeed's."""
import fuzz


def test_seeded_fuzz_subset(store, tmp_path):
    bases = [store.tag("z2-bf16-dp4"), store.tag("z3-bf16-dp2")]
    counts, others = fuzz.campaign(bases, cases=14, seed=7, work=str(tmp_path / "fuzz"), timeout=120,
                                   log=lambda line: None)
    assert others == []
    assert sum(counts.values()) == 14 and sum(v for k, v in counts.items() if k.startswith("error")) >= 1
