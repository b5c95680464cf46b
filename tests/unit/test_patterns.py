"""Pure rules of the index: plain-name TP patterns match literally, AutoEP rows follow the placement descriptor."""


def test_plain_name_patterns_match_literally():
    """DIFFERENCE from DeepSpeed's re.match: 'layers.1.' must not capture 'layers.10.'."""
    from uckpt.dsformat.tp_rules import RuleBook

    names = {"layers.1.w", "layers.10.w", "layers.1.w2", "norm"}
    book = RuleBook({"tp_replicated_parameter_patterns": ["layers.1."],
                     "parameter_with_row_parallelism_patterns": ["layers.1.w", r"^norm$"]}, 2, names)
    assert book.resolve("layers.1.w", [(4,), (4,)]).kind == "replicated"
    assert book.resolve("layers.10.w", [(4,), (4,)]).kind == "cat"  # DeepSpeed: replicated
    assert book.resolve("layers.1.w2", [(4,), (4,)]).kind == "replicated"
    rows = RuleBook({"parameter_with_row_parallelism_patterns": ["layers.1.w", r"^norm$"]}, 2, names)
    assert rows.resolve("layers.1.w2", [(4, 2)] * 2).cat_dim == 0  # an exact name matches itself only
    assert rows.resolve("layers.1.w", [(4, 2)] * 2).cat_dim == 1
    assert rows.resolve("norm", [(4, 2)] * 2).cat_dim == 1  # regex patterns as in DeepSpeed
    import re
    assert re.match("layers.1.", "layers.10.w")  # what DeepSpeed's matching does


def test_autoep_rows_follow_the_placement_descriptor():
    """DeepSpeed's converter assumes contiguous expert placement; uckpt follows a recorded descriptor.
    EP rank 1 holds experts [3, 0] in packed order; a run crossing its local rows lands at both."""
    from uckpt.dsformat import autoep

    entry = {"num_experts": 4, "num_local_experts": 2, "ep_size": 2,
             "expert_placement": {"version": 1, "num_experts": 4, "ep_size": 2,
                                  "ranks": [{"rank": 0, "experts": [1, 2]}, {"rank": 1, "experts": [3, 0]}]}}
    assert autoep.local_experts(entry, 1) == [3, 0]
    row = 6
    # local elements [4, 9) of EP rank 1: the tail of local row 0 (expert 3), the head of row 1 (expert 0)
    assert autoep.place_rows(4, 5, row, [3, 0], set()) == [(4, 2, 3 * row + 4), (6, 3, 0 * row + 0)]
    # an expert already read from another rank (a replica) is not read again
    assert autoep.place_rows(4, 5, row, [3, 0], {0}) == [(4, 2, 3 * row + 4)]
    assert autoep.local_experts({"num_local_experts": 2}, 1) == [2, 3]  # no descriptor: contiguous
