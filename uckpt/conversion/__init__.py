"""ZeRO -> Universal conversion on the ranks of a process group: the plan (pure), the collectives,
the exchange of fragments per wave, the payloads DeepSpeed's converter writes, the output folder,
and ``run`` that drives the phases.

Imports the layers below (:mod:`uckpt.dsformat`, :mod:`uckpt.torchsave`, :mod:`uckpt.regions`).
"""
