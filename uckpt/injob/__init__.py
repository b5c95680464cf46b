"""In-job conversion: a live DeepSpeed job writes a Universal checkpoint from its own memory, with the
converter's plan, exchange and output (:mod:`uckpt.conversion`) fed from the engine's state instead
of shard files. :func:`uckpt.save_universal` is the entry point (:mod:`uckpt.injob.save`).

Imports :mod:`uckpt.conversion` and below; needs DeepSpeed and torch (it runs inside the job).
"""
