"""Public Python entry points."""
from typing import Any, Dict

from .conversion import comm as commmod
from . import options as optmod
from .conversion.run import run


def _on_ranks(work, cfg) -> Dict[str, Any]:
    """``work(cfg, comm)`` on this process's ranks: the current process group, one made under torchrun,
    or none."""
    comm = commmod.setup(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        return work(cfg, comm)
    finally:
        comm.close()


def run_with_config(cfg) -> Dict[str, Any]:
    """Run a conversion on this process's ranks."""
    return _on_ranks(run, cfg)


def convert(input_folder: str, output_folder: str, **options: Any) -> Dict[str, Any]:
    """Convert a DeepSpeed ZeRO checkpoint folder into a Universal checkpoint; returns the report.

    ``options`` are the config keys (``inject_missing_state=True``, ``overwrite=True``,
    ``memory={"budget_mb": 512}``, ``io={"threads": 8}``...). Called on every rank of an existing
    process group, the ranks convert together; otherwise it converts in this process alone.
    """
    values = dict(options, input_folder=input_folder, output_folder=output_folder)
    return run_with_config(optmod.build(values=values))


def export_with_config(cfg) -> Dict[str, Any]:
    """Export on this process's ranks (as :func:`run_with_config`)."""
    from .hfexport.run import export as run_export

    return _on_ranks(run_export, cfg)


def export(input_folder: str, output_folder: str, **options: Any) -> Dict[str, Any]:
    """Write Hugging Face safetensors (``model.safetensors``, or shards and their index) of a Universal
    folder or of a native ZeRO / AutoTP / AutoEP checkpoint; returns the report. ``options`` are
    :class:`uckpt.options.ExportConfig` keys (``dtype="bf16"``, ``max_shard_size="2GB"``,
    ``hf_config="path/with/config.json"``...). Called on every rank of a process group, the ranks
    export together."""
    values = dict(options, input_folder=input_folder, output_folder=output_folder)
    return export_with_config(optmod.build(values=values, schema=optmod.ExportConfig))
