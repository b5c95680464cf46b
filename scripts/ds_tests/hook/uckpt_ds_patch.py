"""Swap uckpt into DeepSpeed's own universal-checkpoint tests, in every process they start.

Imported by this folder's ``sitecustomize`` when ``UCKPT_DS_PATCH`` is set, so it runs at the start of
every interpreter: the pytest process, DeepSpeed's ``forkserver`` and the test ranks forked from it.
It imports neither torch nor DeepSpeed itself; it installs post-import hooks that patch modules as
soon as the tests import them:

- ``deepspeed.checkpoint.ds_to_universal``: ``main(args)`` becomes :func:`uckpt_main` (the tests import
  ``main`` by name, after the module has run, so they get the replacement); with
  ``UCKPT_DS_CONVERTER=deepspeed`` DeepSpeed's own ``main`` stays, only traced (a baseline run);
- ``deepspeed`` (once the whole package has run): with ``UCKPT_DS_LOADER=uckpt``,
  ``uckpt.use_for_universal_loads()`` routes universal ``engine.load_checkpoint`` calls to uckpt's
  loader; in both loader modes ``load_checkpoint`` is wrapped by a tracer;
- ``unit.util`` (DeepSpeed's test helpers), only with ``UCKPT_DS_CPU_BF16=1``: the bf16 gate
  ``bf16_required_version_check`` also answers yes on the CPU accelerator (it asks for CUDA and NCCL
  versions, which a gloo/CPU run does not have; DeepSpeed's CPU accelerator supports bf16).

Every call of the replacements is appended to ``$UCKPT_DS_STATE/trace.jsonl`` with the test running
at the time (the runner's pytest plugin writes it to ``$UCKPT_DS_STATE/current``), so the results
table can tell tests that exercised uckpt from tests that never reached it.

Environment:
    UCKPT_DS_PATCH=1          enable (set by run.py)
    UCKPT_DS_CONVERTER        uckpt (default) | deepspeed (DeepSpeed's converter, traced: a baseline)
    UCKPT_DS_LOADER           uckpt | deepspeed (default deepspeed: only the converter is replaced)
    UCKPT_DS_CONVERT          inprocess (default) | cli
    UCKPT_DS_CONVERT_NPROC    ranks for ``cli`` (default 1: ``python -m uckpt convert``; >1: torchrun)
    UCKPT_DS_CPU_BF16         1: open the bf16 gate on the CPU accelerator
    UCKPT_DS_STATE            folder for trace.jsonl / current
"""
import json
import os
import subprocess
import sys
import time

_HOOKS = {}
_INSTALLED = False


# ----------------------------------------------------------------------------------------- trace

def _state_dir():
    return os.environ.get("UCKPT_DS_STATE")


def current_test():
    d = _state_dir()
    if not d:
        return None
    try:
        with open(os.path.join(d, "current")) as f:
            return json.load(f).get("nodeid")
    except (OSError, ValueError):
        return None


def record(kind, **fields):
    """Append one event (a line of JSON, one write: atomic for lines this short with O_APPEND)."""
    d = _state_dir()
    if not d:
        return
    event = {"kind": kind, "test": current_test(), "pid": os.getpid(), "rank": os.environ.get("RANK"),
             "time": time.time(), **fields}
    line = (json.dumps(event, default=str) + "\n").encode()
    try:
        fd = os.open(os.path.join(d, "trace.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass


def _short(exc):
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 600 else text[:600] + "..."


# ------------------------------------------------------------------------------- the converter

# ds_to_universal.py's argparse fields -> uckpt's ConvertConfig keys (the same names: uckpt's top-level
# options are ds_to_universal.py's flags; keep_temp_folder / num_*_workers are accepted and ignored)
_ARG_FIELDS = ("input_folder", "output_folder", "inject_missing_state", "strict", "keep_temp_folder",
               "num_extract_workers", "num_merge_workers")


def _convert_values(args):
    values = {}
    for key in _ARG_FIELDS:
        if hasattr(args, key) and getattr(args, key) is not None:
            values[key] = getattr(args, key)
    extra = sorted(k for k in vars(args) if k not in _ARG_FIELDS)
    return values, extra


def _convert_inprocess(values):
    import uckpt
    dist_active = False
    if "torch" in sys.modules:
        import torch.distributed as dist
        dist_active = dist.is_available() and dist.is_initialized()
    if not dist_active and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return uckpt.convert(**values), "uckpt.convert"
    # DeepSpeed's tests call the converter on rank 0 only, inside their process group. uckpt.convert
    # would join that group (all ranks convert together) and wait for ranks that never call it, so
    # run the same conversion as uckpt.convert does in a lone process: the one-process Comm.
    from uckpt import options as optmod
    from uckpt.conversion.comm import Comm
    from uckpt.conversion.run import run
    return run(optmod.build(values=values), Comm()), "uckpt run(cfg, Comm()) (one process inside a test rank)"


_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _convert_cli(values):
    nproc = int(os.environ.get("UCKPT_DS_CONVERT_NPROC", "1"))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "uckpt", "convert"]
    else:
        cmd = [sys.executable, "-m", "uckpt", "convert"]
    cmd += ["--input_folder", str(values["input_folder"]), "--output_folder", str(values["output_folder"])]
    if values.get("inject_missing_state"):
        cmd.append("--inject_missing_state")
    if values.get("strict", True) is False:
        cmd.append("--no_strict")
    if values.get("keep_temp_folder"):
        cmd.append("--keep_temp_folder")
    for key in ("num_extract_workers", "num_merge_workers"):
        if key in values:
            cmd += [f"--{key}", str(values[key])]
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV and not k.startswith("UCKPT_DS_")}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return None, (f"torchrun --nproc_per_node {nproc} -m uckpt convert" if nproc > 1 else "python -m uckpt convert")


def uckpt_main(args):
    """Drop-in for ``deepspeed.checkpoint.ds_to_universal.main(args)``: convert with uckpt."""
    values, extra = _convert_values(args)
    mode = os.environ.get("UCKPT_DS_CONVERT", "inprocess")
    t0 = time.monotonic()
    try:
        if mode == "cli":
            _, how = _convert_cli(values)
        else:
            _, how = _convert_inprocess(values)
    except BaseException as exc:
        record("convert", ok=False, seconds=round(time.monotonic() - t0, 3), converter="uckpt", mode=mode,
               error=_short(exc),
               input=str(values.get("input_folder")), ignored_fields=extra)
        raise
    record("convert", ok=True, seconds=round(time.monotonic() - t0, 3), converter="uckpt", mode=mode, how=how,
           input=str(values.get("input_folder")), ignored_fields=extra)
    return None


def _traced_deepspeed_main(original):
    """DeepSpeed's own converter, traced (UCKPT_DS_CONVERTER=deepspeed: a baseline run)."""
    def main(args):
        t0 = time.monotonic()
        try:
            out = original(args)
        except BaseException as exc:
            record("convert", ok=False, seconds=round(time.monotonic() - t0, 3), converter="deepspeed",
                   error=_short(exc), input=str(getattr(args, "input_folder", None)))
            raise
        record("convert", ok=True, seconds=round(time.monotonic() - t0, 3), converter="deepspeed",
               how="deepspeed ds_to_universal.main", input=str(getattr(args, "input_folder", None)))
        return out
    return main


def _patch_ds_to_universal(mod):
    if getattr(mod.main, "_uckpt_shim", False):
        return
    mod._deepspeed_main = mod.main
    if os.environ.get("UCKPT_DS_CONVERTER", "uckpt") == "deepspeed":
        shim = _traced_deepspeed_main(mod.main)
    else:
        shim = uckpt_main
    shim._uckpt_shim = True
    mod.main = shim


# ---------------------------------------------------------------------------------- the loader

def _patch_deepspeed(mod):
    from deepspeed.runtime.engine import DeepSpeedEngine
    if getattr(DeepSpeedEngine.load_checkpoint, "_uckpt_trace", False):
        return
    loader = os.environ.get("UCKPT_DS_LOADER", "deepspeed")
    if loader == "uckpt":
        import uckpt
        import uckpt.load.engine as uckpt_engine
        if not hasattr(uckpt, "use_for_universal_loads"):
            record("patch_error", error="uckpt.use_for_universal_loads does not exist")
            raise ImportError("UCKPT_DS_LOADER=uckpt but uckpt.use_for_universal_loads does not exist")
        # trace uckpt's loader (wrapped before use_for_universal_loads runs, so a reference it takes
        # by name is the traced one)
        inner = uckpt_engine.load_into_engine
        if not getattr(inner, "_uckpt_trace", False):
            def load_into_engine(*a, **kw):
                t0 = time.monotonic()
                try:
                    out = inner(*a, **kw)
                except BaseException as exc:
                    record("uckpt_load", ok=False, seconds=round(time.monotonic() - t0, 3), error=_short(exc))
                    raise
                record("uckpt_load", ok=True, seconds=round(time.monotonic() - t0, 3))
                return out
            load_into_engine._uckpt_trace = True
            load_into_engine.__wrapped__ = inner
            uckpt_engine.load_into_engine = load_into_engine
        uckpt.use_for_universal_loads()

    patched = DeepSpeedEngine.load_checkpoint

    def load_checkpoint(self, load_dir, *a, **kw):
        universal = False
        try:
            universal = bool(self.load_universal_checkpoint())
        except Exception:
            pass
        t0 = time.monotonic()
        try:
            out = patched(self, load_dir, *a, **kw)
        except BaseException as exc:
            record("load_checkpoint", universal=universal, loader=loader, ok=False,
                   seconds=round(time.monotonic() - t0, 3), error=_short(exc))
            raise
        record("load_checkpoint", universal=universal, loader=loader, ok=True, seconds=round(time.monotonic() - t0, 3))
        return out

    load_checkpoint._uckpt_trace = True
    load_checkpoint.__wrapped__ = patched
    load_checkpoint.__doc__ = patched.__doc__
    DeepSpeedEngine.load_checkpoint = load_checkpoint


# ------------------------------------------------------------------- DeepSpeed's test bf16 gate

def _patch_unit_util(mod):
    original = mod.bf16_required_version_check
    if getattr(original, "_uckpt_cpu_bf16", False):
        return

    def bf16_required_version_check(*a, **kw):
        if original(*a, **kw):
            return True
        from deepspeed.accelerator import get_accelerator
        acc = get_accelerator()
        return acc.device_name() == "cpu" and acc.is_bf16_supported()

    bf16_required_version_check._uckpt_cpu_bf16 = True
    mod.bf16_required_version_check = bf16_required_version_check


# ----------------------------------------------------------------------------- post-import hooks

class _PostImportFinder:
    """A meta path finder that lets the next finder find a module, then runs a hook after it executes."""

    def __init__(self):
        self._busy = set()

    def find_spec(self, name, path=None, target=None):
        hook = _HOOKS.get(name)
        if hook is None or name in self._busy:
            return None
        self._busy.add(name)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            try:
                hook(module)
            except Exception as exc:
                record("patch_error", module=name, error=_short(exc))
                raise

        spec.loader.exec_module = exec_then_patch  # loaders of source files are per module
        return spec


def install():
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    _HOOKS["deepspeed.checkpoint.ds_to_universal"] = _patch_ds_to_universal
    _HOOKS["deepspeed"] = _patch_deepspeed
    if os.environ.get("UCKPT_DS_CPU_BF16") == "1":
        _HOOKS["unit.util"] = _patch_unit_util
    for name, hook in _HOOKS.items():  # already imported (not expected at interpreter start)
        if name in sys.modules:
            hook(sys.modules[name])
    sys.meta_path.insert(0, _PostImportFinder())
