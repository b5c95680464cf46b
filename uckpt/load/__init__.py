"""Loading a Universal checkpoint at a new topology: the slicing rules (pure), the folder's files,
a live DeepSpeed engine's loader and the plain-PyTorch state-dict loader.

Imports :mod:`uckpt.dsformat` and :mod:`uckpt.torchsave`; never the conversion.
"""
