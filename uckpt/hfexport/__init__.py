"""Hugging Face safetensors from a Universal folder or straight from a native checkpoint
(``uckpt export``): :mod:`.names` maps Universal parameters to the model's own names, :mod:`.shards`
writes the sharded layout, :mod:`.run` drives it, :mod:`.native` feeds it from the converter's plan
and exchange. Imports :mod:`uckpt.conversion` and below."""
