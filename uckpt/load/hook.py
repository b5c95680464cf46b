"""Opt-in routing of ``engine.load_checkpoint`` to uckpt's loader, for code that only calls DeepSpeed
(Hugging Face Trainer, Accelerate, Megatron-DeepSpeed scripts): after
:func:`use_for_universal_loads`, an engine whose DeepSpeed config sets ``checkpoint.load_universal``
loads with :func:`uckpt.load_into_engine` (rank-aware reads, the same flags), and every other load
goes to DeepSpeed's own method unchanged. Nothing is patched unless it is called."""
import functools
import logging
from typing import Callable, Optional

from ..errors import UnsupportedEngineError

logger = logging.getLogger("uckpt")
_original: Optional[Callable] = None


def _engine_class():
    from deepspeed.runtime.engine import DeepSpeedEngine

    return DeepSpeedEngine


def _routed(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        args = (load_dir, tag, load_module_strict, load_optimizer_states, load_lr_scheduler_states, load_module_only,
                custom_load_fn)
        if not self.load_universal_checkpoint():
            return original(self, *args)
        from .engine import load_into_engine

        try:
            # custom_load_fn is not consulted: DeepSpeed's universal path does not call it either
            result = load_into_engine(self, load_dir, tag, load_module_strict=load_module_strict,
                                      load_optimizer_states=load_optimizer_states,
                                      load_lr_scheduler_states=load_lr_scheduler_states,
                                      load_module_only=load_module_only)
        except UnsupportedEngineError as exc:
            logger.warning("uckpt: %s; loading with DeepSpeed's own engine.load_checkpoint", exc)
            return original(self, *args)
        self.uckpt_load_report = result.report
        return result.load_path, result.client_state

    load_checkpoint.uckpt_routed = True
    return load_checkpoint


def use_for_universal_loads(enable: bool = True) -> bool:
    """Route (``enable=True``) or stop routing (``False``) universal ``engine.load_checkpoint`` calls of
    every DeepSpeed engine in this process to uckpt's loader. Call it on every rank, once after import;
    it is idempotent. Returns whether routing was on before. The loaded engine keeps uckpt's report in
    ``engine.uckpt_load_report``."""
    global _original
    cls = _engine_class()
    was_on = _original is not None
    if enable and not was_on:
        _original = cls.load_checkpoint
        cls.load_checkpoint = _routed(_original)
    elif not enable and was_on:
        cls.load_checkpoint = _original
        _original = None
    return was_on
