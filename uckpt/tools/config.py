"""The one settings schema (omegaconf structured config) shared by the CLI, YAML files and the API.

Top-level keys are the flags of DeepSpeed's ``ds_to_universal.py`` (plus uckpt's own); groups hold
the rest. Resolution order: defaults < ``--config`` YAML < dotted overrides (``io.threads=8``) <
explicit flags. Unknown keys fail with the closest valid key.
"""
import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, Iterable, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from ..errors import UckptError


@dataclass
class IOConfig:
    threads: int = 4  # writer threads per rank


@dataclass
class MemoryConfig:
    budget_mb: int = 4096  # per-rank memory for one wave of fragments and assembled tensors


@dataclass
class DistConfig:
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 600.0  # every collective fails after this long instead of hanging


@dataclass
class LogConfig:
    quiet: bool = False
    json: Optional[str] = None  # also write the JSON report to this path


@dataclass
class ConvertConfig:
    input_folder: str = MISSING
    output_folder: str = MISSING
    inject_missing_state: bool = False
    strict: bool = True
    overwrite: bool = False
    dry_run: bool = False
    # Accepted for drop-in compatibility with ds_to_universal.py; uckpt has no temp folder and
    # no worker pools (the parallelism is the converter ranks), so they change nothing.
    keep_temp_folder: bool = False
    num_extract_workers: int = 4
    num_merge_workers: int = 2
    io: IOConfig = field(default_factory=IOConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class LoadConfig:
    """Options of ``uckpt.load_into_engine`` (YAML: ``configs/load.yaml``)."""

    tag: Optional[str] = None  # None: the tag latest_universal names
    module_extras: bool = True  # restore frozen parameters and buffers from their fp32.pt
    lr_scheduler_states: bool = True  # restore the LR scheduler from the model-state file


@dataclass
class VerifyConfig:
    """Options of ``uckpt verify``."""

    universal: str = MISSING
    against: Optional[str] = None  # the native tag folder it was converted from: re-slice and compare
    json: bool = False


def valid_keys(cls=ConvertConfig, prefix: str = "") -> List[str]:
    keys = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not __import__("dataclasses").MISSING else f.default
        if is_dataclass(default):
            keys += valid_keys(type(default), prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


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
    """Resolve a config of ``schema`` (convert by default); raise UckptError naming a bad key and the
    closest valid one, or a required key that is missing."""
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
    return cfg


def to_plain(cfg) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)
