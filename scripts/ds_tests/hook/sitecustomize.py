"""Put on PYTHONPATH by scripts/ds_tests/run.py: with UCKPT_DS_PATCH=1 every interpreter (pytest, DeepSpeed's
forkserver and its test ranks) installs uckpt's post-import patches; see uckpt_ds_patch.py.

Another ``sitecustomize`` later on sys.path (a distribution's) still runs: this one would shadow it.
"""
import os
import sys


def _chain():
    import importlib.machinery
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.origin and os.path.dirname(os.path.abspath(spec.origin)) != here:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("UCKPT_DS_PATCH") == "1":
    import uckpt_ds_patch

    uckpt_ds_patch.install()
_chain()
