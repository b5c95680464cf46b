"""The ``torch.save`` file format, read and written without torch: the bottom layer.

``format`` (dtype table, in-memory tensors, stand-ins for classes read without their module),
``reader`` (pickle parsed, tensors left in the file, byte-range reads), ``writer`` (the same zip
records torch writes), ``direct`` (page-cache-bypassing writes). Imports nothing else of uckpt.
"""
