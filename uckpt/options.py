"""Every option of uckpt, defined once: typed dataclasses with each flag's spelling and help.

The Python API takes and passes these dataclasses (:func:`build` returns one); omegaconf resolves
them only at the edges, from YAML files, dotted overrides and flags. The command line's flags are
generated from the same fields (:func:`flags`), so an option is written in one place.

Top-level keys are the flags of DeepSpeed's ``ds_to_universal.py`` (plus uckpt's own); groups hold
the rest. Resolution order: defaults < ``--config`` YAML < dotted overrides (``io.threads=8``) <
explicit flags. Unknown keys fail with the closest valid key.
"""
import dataclasses
import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from .errors import UckptError

MISSING = "???"  # omegaconf's marker of a required value


def opt(default: Any = dataclasses.MISSING, help: str = "", flag: Optional[str] = None, factory=None, **argparse_kw):
    """A field with its command-line spelling: ``flag`` (default: the key with dots as underscores),
    ``help``, and extra ``argparse`` keywords (``action``, ``choices``, ``metavar``, ``aliases``)."""
    meta = {"help": help, "flag": flag, "argparse": argparse_kw}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class IOConfig:
    threads: int = opt(4, "writer threads per rank (io.threads, default 4)", flag="io_threads")


@dataclass
class MemoryConfig:
    budget_mb: int = opt(4096, "per-rank memory for one wave of fragments and assembled tensors "
                               "(memory.budget_mb, default 4096)", flag="memory_budget_mb")


@dataclass
class DistConfig:
    backend: str = opt("auto", "fragment transport (dist.backend)", flag="backend", choices=["auto", "gloo", "nccl"])
    timeout_s: float = opt(600.0, "every collective fails after this many seconds instead of hanging "
                                  "(dist.timeout_s, default 600)", flag="timeout_s")


@dataclass
class LogConfig:
    quiet: bool = opt(False, "no progress output (log.quiet)", flag="quiet")
    json: Optional[str] = opt(None, "write the JSON report to FILE too (log.json)", flag="json", metavar="FILE")


def _verify_crc_opt():
    return opt(True, "skip the CRC-32 check of every input record (faster; damaged bytes then go unnoticed, as with "
                     "DeepSpeed's converter)", flag="no_verify_crc", action="store_false")


@dataclass
class ConvertConfig:
    input_folder: str = opt(MISSING, "DeepSpeed checkpoint tag folder (e.g. ckpts/global_step1000)")
    output_folder: str = opt(MISSING, "Universal checkpoint folder to create (a sibling of the input)")
    inject_missing_state: bool = opt(False, "add universal_checkpoint_info when the checkpoint lacks it "
                                            "(as ds_to_universal.py)")
    strict: bool = opt(True, "warn instead of failing on unused patterns", flag="no_strict", action="store_false")
    overwrite: bool = opt(False, "replace an existing output folder (a Universal checkpoint only)")
    wait_for_lock: bool = opt(False, "wait while another conversion writes the same output, instead of failing")
    restart: bool = opt(False, "start over: discard the partial output of a conversion that died, instead of "
                               "resuming it")
    verify_crc: bool = _verify_crc_opt()
    dry_run: bool = opt(False, "print the plan, write nothing", flag="dry-run", aliases=["--dry_run"])
    # Accepted for drop-in compatibility with ds_to_universal.py; uckpt has no temp folder and
    # no worker pools (the parallelism is the converter ranks), so they change nothing.
    keep_temp_folder: bool = opt(False, "accepted for compatibility; uckpt uses no temp folder")
    num_extract_workers: int = opt(4, "accepted for compatibility; parallelism comes from ranks")
    num_merge_workers: int = opt(2, "accepted for compatibility; parallelism comes from ranks")
    io: IOConfig = opt(factory=IOConfig)
    memory: MemoryConfig = opt(factory=MemoryConfig)
    dist: DistConfig = opt(factory=DistConfig)
    log: LogConfig = opt(factory=LogConfig)


@dataclass
class ExportConfig:
    """Options of ``uckpt export`` / ``uckpt.export``: Hugging Face safetensors from a Universal folder
    or from a native checkpoint (the converter's memory, transport and log options apply to the latter)."""

    input_folder: str = opt(MISSING, "a Universal folder, or a native ZeRO / AutoTP / AutoEP tag folder (exported "
                                     "without writing a Universal checkpoint)")
    output_folder: str = opt(MISSING, "folder to create: model.safetensors, or model-0000k-of-0000n.safetensors "
                                      "and model.safetensors.index.json")
    dtype: str = opt("auto", "dtype the fp32 master weights are cast to (auto: the dtype the job trained in)",
                     choices=["auto", "bf16", "fp16", "fp32"])
    max_shard_size: str = opt("5GB", "largest file (Hugging Face's sizes: 5GB = 5*10^9 bytes, 2GiB = 2*2^30)")
    hf_config: Optional[str] = opt(None, "folder holding the model's config.json (and generation / tokenizer "
                                         "files), copied in so from_pretrained loads the folder", metavar="DIR")
    overwrite: bool = opt(False, "replace an existing export folder (one this command wrote only)")
    verify_crc: bool = _verify_crc_opt()
    io: IOConfig = opt(factory=IOConfig)
    memory: MemoryConfig = opt(factory=MemoryConfig)
    dist: DistConfig = opt(factory=DistConfig)
    log: LogConfig = opt(factory=LogConfig)


@dataclass
class SimulateConfig:
    """Options of ``uckpt plan --simulate``: the plan of a synthetic checkpoint at many converter sizes,
    without any file (:mod:`uckpt.tools.simulate`)."""

    simulate: str = opt("llama-8b", "plan a synthetic checkpoint of this model layout instead of a folder",
                        choices=["llama-8b", "llama-70b", "llama-405b", "mixtral-8x7b", "mixtral-8x22b"])
    dp: int = opt(8, "data-parallel size of the job that saved it")
    tp: int = opt(1, "tensor-parallel (AutoTP) size of the job that saved it")
    pp: int = opt(1, "pipeline stages of the job that saved it (ZeRO-1 only, as DeepSpeed)")
    ep: int = opt(1, "expert-parallel (AutoEP autoep_size) size of the job that saved it (Mixtral layouts, "
                     "ZeRO-1/2)")
    data_before_ep: bool = opt(False, "the job set use_data_before_expert_parallelism")
    zero_stage: int = opt(2, "ZeRO stage of the job that saved it", choices=[1, 2, 3])
    dtype: str = opt("bf16", "training dtype of the job that saved it", choices=["bf16", "fp32"])
    ranks: str = opt("1,2,4,8,16,32,64,128,256,512,1024", "converter sizes to plan for (comma-separated)")
    read_gbps: float = opt(2.0, "per-rank read bandwidth in GB/s, for the predicted time")
    write_gbps: float = opt(1.0, "per-rank write bandwidth in GB/s, for the predicted time")
    net_gbps: float = opt(10.0, "per-rank network bandwidth in GB/s, for the predicted time")
    memory: MemoryConfig = opt(factory=MemoryConfig)
    log: LogConfig = opt(factory=LogConfig)


@dataclass
class LoadConfig:
    """Options of ``uckpt.load_into_engine`` (YAML: ``configs/load.yaml``)."""

    tag: Optional[str] = None  # None: the tag latest_universal names
    module_extras: bool = True  # restore frozen parameters and buffers from their fp32.pt
    threads: int = 4  # threads per rank reading state files (ZeRO-1/2 targets); 1: one after another
    # DeepSpeed's engine.load_checkpoint flags, with its names and defaults
    load_module_strict: bool = True  # refuse a checkpoint lacking a target parameter or holding one it lacks
    load_optimizer_states: bool = True  # restore moments, step and param-group hyperparameters
    load_lr_scheduler_states: bool = True  # restore the LR scheduler from the model-state file
    load_module_only: bool = False  # weights only: no optimizer state, LR scheduler or step counters
    # UNSAFE: unpickle the returned client state with torch.load(weights_only=False), which runs any code
    # the file names. Only for checkpoints you made yourself; everything else is always read safely.
    trust_checkpoint: bool = False


@dataclass
class VerifyConfig:
    """Options of ``uckpt verify``."""

    universal: str = MISSING
    against: Optional[str] = None  # the native tag folder it was converted from: re-slice and compare
    json: bool = False


def _leaves(cls, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every leaf option of the schema ``cls``."""
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            yield from _leaves(type(default), prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def valid_keys(cls=ConvertConfig) -> List[str]:
    return [key for key, _ in _leaves(cls)]


def flags(cls=ConvertConfig) -> List[Tuple[str, str, Dict[str, Any]]]:
    """``(key, flag, argparse keywords)`` of every option: what the command line offers."""
    out = []
    for key, f in _leaves(cls):
        meta = f.metadata
        flag = meta.get("flag") or key.replace(".", "_")
        kw = dict(meta.get("argparse", {}))
        kw.setdefault("help", meta.get("help", ""))
        if "action" not in kw:
            if f.type in (bool, "bool"):
                kw["action"] = "store_true"
            elif f.type in (int, "int"):
                kw["type"] = int
            elif f.type in (float, "float"):
                kw["type"] = float
        if kw.get("action") is None and "choices" not in kw:
            kw.setdefault("metavar", flag.upper())
        out.append((key, flag, kw))
    return out


def nest(flat: Dict[str, Any]) -> Dict[str, Any]:
    """``{"io.threads": 8}`` -> ``{"io": {"threads": 8}}``."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _closest(key: str, schema=ConvertConfig) -> str:
    keys = valid_keys(schema)
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(keys)}"


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def build(yaml_path: Optional[str] = None, overrides: Iterable[str] = (), values: Optional[Dict[str, Any]] = None,
          schema=ConvertConfig):
    """Resolve options of ``schema`` (convert by default) into an instance of it; raise UckptError
    naming a bad key and the closest valid one, or a required key that is missing."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cfg = OmegaConf.structured(schema)
    layers = []
    if yaml_path:
        try:
            layers.append((yaml_path, OmegaConf.load(yaml_path)))
        except (OSError, Exception) as exc:
            raise UckptError(f"cannot read config file ({exc})", yaml_path, "pass an omegaconf YAML file") from None
    for item in overrides:
        if "=" not in item:
            raise UckptError(f"override {item!r} is not key=value", fix="write overrides like io.threads=8")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    if values:
        layers.append(("arguments", OmegaConf.create(values)))
    known = set(valid_keys(schema))
    for where, layer in layers:
        for key in _flatten(OmegaConf.to_container(layer, resolve=False)):
            if key not in known:
                raise UckptError(f"unknown setting '{key}' in {where}", fix=_closest(key, schema))
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ValidationError, ConfigKeyError, ConfigAttributeError) as exc:
            raise UckptError(f"bad value in {where}: {str(exc).splitlines()[0]}") from None
    for key in known:
        if "." not in key and OmegaConf.is_missing(cfg, key):
            raise UckptError(f"{key} is required", fix=f"pass --{key} PATH")
    return OmegaConf.to_object(cfg)


def to_plain(options) -> Dict[str, Any]:
    return dataclasses.asdict(options)


def to_yaml(options) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(options))
