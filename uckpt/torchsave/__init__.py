"""The ``torch.save`` file format, read and written without torch: the bottom layer.

``format`` (dtype table, in-memory tensors, inert stand-ins for globals outside the allow-list),
``reader`` (the allow-list unpickler: tensors left in the file, byte-range reads), ``zipfmt``
(record spans inside the file, CRC-32 checks), ``writer`` (the same zip records torch writes),
``direct`` (page-cache-bypassing writes), ``stats`` (I/O counters). Imports nothing else of uckpt.
"""
