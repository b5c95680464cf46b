"""DeepSpeed's checkpoint formats: the native ZeRO tag folder (which files, what each pickle holds,
one index of every parameter's fragments per checkpoint family), the tensor-parallel merge rules of
``universal_checkpoint_info``, AutoEP's expert layout, and the Universal folder's layout.

Imports :mod:`uckpt.torchsave`, :mod:`uckpt.regions` and :mod:`uckpt.errors` only.
"""
