"""A Universal checkpoint folder during a load: which folder, its state files (each pickle parsed
once), the step and optimizer state, and the model-state file a rank reads its scalars from."""
import glob
import os
import threading
from typing import Any, Dict, Optional, Tuple

from ..dsformat import constants as C
from ..dsformat.universal import check_name, deepspeed_classes, is_universal, load_payload, payload_tensor, \
    state_files
from ..errors import CheckpointError, InvalidCheckpointError
from ..torchsave import reader as ranged
from ..torchsave.format import materialize


def resolve_folder(load_dir: str, tag: Optional[str] = None) -> str:
    """``<load_dir>/<tag>``; with ``tag=None`` the tag named by ``latest_universal`` (as DeepSpeed).
    A path that already is a Universal folder is taken as is."""
    if tag is None and is_universal(load_dir):
        return load_dir
    if tag is None:
        latest = os.path.join(load_dir, C.LATEST_UNIVERSAL_FILE)
        if not os.path.isfile(latest):  # DeepSpeed raises ValueError here too
            raise InvalidCheckpointError(f"no {C.LATEST_UNIVERSAL_FILE} file and no tag given", path=load_dir,
                                  fix="pass tag=<folder name> or point at a folder holding latest_universal")
        with open(latest) as f:
            tag = check_name(f.read(4096).strip(), f"tag in {C.LATEST_UNIVERSAL_FILE}", latest)
    folder = os.path.join(load_dir, tag)
    if not is_universal(folder):
        raise CheckpointError(f"not a Universal checkpoint (no {C.UNIVERSAL_ZERO_FOLDER}/ folder)", path=folder,
                              fix="convert the native checkpoint first: python -m uckpt convert ...")
    return folder


def _state_path(folder: str, name: str, state: str) -> str:
    return os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER, check_name(name, "parameter name", folder),
                        check_name(state + C.STATE_FILE_SUFFIX, "state file name", folder))


def _param_folder(folder: str, name: str) -> str:
    path = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER, check_name(name, "parameter name", folder))
    if not os.path.isdir(path):
        raise CheckpointError(f"parameter {name} has no folder in the checkpoint", path=path,
                              fix="load into the model the checkpoint was saved from (same parameter names)")
    return path


def _state_keys(param_folder: str) -> Tuple[str, ...]:
    """Tensor states of a parameter folder (``step`` excluded)."""
    return tuple(k for k in state_files(param_folder) if k != C.STEP_KEY)


class StateFiles:
    """The state files of one Universal folder during one load: each file's pickle is parsed once (the
    pre-check and the load open the same files), then only the byte ranges a rank keeps are read."""

    def __init__(self, folder: str):
        self.folder = folder
        self._parsed: Dict[str, Tuple[ranged.FileTensor, Dict[str, Any]]] = {}
        self._lock = threading.Lock()  # the loader's reader threads share it

    def open(self, name: str, state: str) -> Tuple[ranged.FileTensor, Dict[str, Any]]:
        """The tensor of ``zero/<name>/<state>.pt`` (lazy) and the rest of its dict."""
        return self.open_path(_state_path(self.folder, name, state))

    def open_path(self, path: str) -> Tuple[ranged.FileTensor, Dict[str, Any]]:
        parsed = self._parsed.get(path)
        if parsed is None:
            parsed = _parse_state(path)  # outside the lock: another thread parsing the same file is harmless
            with self._lock:
                parsed = self._parsed.setdefault(path, parsed)
        return parsed


def _parse_state(path: str) -> Tuple[ranged.FileTensor, Dict[str, Any]]:
    payload = materialize(ranged.open_lazy(path), deepspeed_classes())
    tensor = payload_tensor(payload, ranged.FileTensor)
    if tensor is not None:
        return tensor, {k: v for k, v in payload.items() if k != C.PARAM} if isinstance(payload, dict) else {}
    raise CheckpointError("not a Universal state file (no tensor under 'param')", path=path)


def _read_step(param_folder: str):
    path = os.path.join(param_folder, C.STEP_KEY + C.STATE_FILE_SUFFIX)
    return load_payload(path) if os.path.isfile(path) else None


def _optimizer_state(folder: str) -> Dict[str, Any]:
    """``zero/optimizer_state.pt`` without its tensors' bytes (a ZeRO-3-made one holds a whole shard)."""
    path = os.path.join(folder, C.UNIVERSAL_ZERO_FOLDER, C.UNIVERSAL_OPTIMIZER_STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError("optimizer_state.pt is missing", path=path,
                              fix="the Universal folder is incomplete; convert again")
    return materialize(ranged.open_lazy(path), deepspeed_classes())


def _saved_groups_and_step(optim_sd: Dict[str, Any]):
    """Param groups and (ZeRO-3-made checkpoints only: no step.pt) step, whichever family wrote the file."""
    inner = optim_sd.get(C.OPTIMIZER_STATE_DICT) or {}
    state = inner.get(C.TORCH_STATE_KEY) or {}
    step = next((s[C.STEP_KEY] for s in state.values() if isinstance(s, dict) and C.STEP_KEY in s), None)
    if isinstance(step, ranged.FileTensor):
        step = step.load()
    groups = optim_sd.get(C.PARAM_GROUPS) or inner.get(C.PARAM_GROUPS) or []
    return groups, step


def _model_state_file(folder: str, mp_rank: int, mp_world: int) -> Optional[str]:
    """Either family's model-state files (DeepSpeed insists on the target's naming, spec 4.4)."""
    files = sorted(glob.glob(os.path.join(folder, f"{C.MODEL_FILE_PREFIX}*{C.MODEL_FILE_SUFFIX}")))
    if not files:
        files = sorted(glob.glob(os.path.join(folder, f"{C.ZERO_FILE_PREFIX}0_{C.MODEL_FILE_PREFIX}*"
                                                      f"{C.MODEL_FILE_SUFFIX}")))
    return files[mp_rank * len(files) // mp_world] if files else None
