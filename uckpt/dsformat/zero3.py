"""DeepSpeed's ZeRO-3 partitioning of one flat parameter, shared by the converter's index (which
elements each saved partition holds) and the loader (which elements a target rank keeps)."""
from typing import Tuple


def zero3_span(numel: int, rank: int, world: int) -> Tuple[int, int, int]:
    """Partition ``rank`` of ``world`` of a flat tensor of ``numel`` elements: (start, elements held,
    partition size). Every partition has ``q = ceil(numel / world)`` slots; the last ones are
    zero-padded past ``numel`` (DeepSpeed's ``_get_param_partition`` / ``_partition_param``)."""
    q = -(-numel // world) if numel else 0
    start = min(rank * q, numel)
    return start, max(0, min(q, numel - start)), q
