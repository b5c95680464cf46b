"""Public Python entry points."""
from typing import Any, Dict

from .conversion import comm as commmod
from . import options as optmod
from .conversion.run import run


def run_with_config(cfg) -> Dict[str, Any]:
    """Run a conversion on this process's ranks: the current process group, one made under torchrun, or none."""
    comm = commmod.setup(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        return run(cfg, comm)
    finally:
        comm.close()


def convert(input_folder: str, output_folder: str, **options: Any) -> Dict[str, Any]:
    """Convert a DeepSpeed ZeRO checkpoint folder into a Universal checkpoint; returns the report.

    ``options`` are the config keys (``inject_missing_state=True``, ``overwrite=True``,
    ``memory={"budget_mb": 512}``, ``io={"threads": 8}``...). Called on every rank of an existing
    process group, the ranks convert together; otherwise it converts in this process alone.
    """
    values = dict(options, input_folder=input_folder, output_folder=output_folder)
    return run_with_config(optmod.build(values=values))
