"""Which tensors a Hugging Face checkpoint holds, under which names, made from which Universal
parameters.

A Universal folder names parameters as the training module did. For plain and AutoTP models that
is the Hugging Face name already; tied parameters (``shared_params``: alias -> canonical) are
stored once, under the canonical name, as ``save_pretrained`` does. An AutoEP layer replaced the
model's MoE block: its router is ``<layer>.router.gate`` (the model's own router attribute is an
alias of it) and its experts are stacked ``<layer>.experts.w1 / w2 / w3``. DeepSpeed's AutoEP preset
of the model (``ds_config.expert_parallel.preset_model``) records the model's own names: the
router's attribute, the experts' attribute and their weights, and whether gate and up projections
are fused into one 3-D tensor (``expert_storage="fused_3d"``, ``expert_w3=None``: gate rows first,
then up rows, as the model splits them with ``chunk(2)``).
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import UnsupportedCheckpointError


@dataclass(frozen=True)
class Target:
    """One tensor of the export: ``name`` in the Hugging Face checkpoint, made of ``parts`` (Universal
    parameter names) concatenated on ``dim`` (a single part is taken as is)."""

    name: str
    parts: Tuple[str, ...]
    dim: int = 0


@dataclass(frozen=True)
class ExpertNames:
    """An AutoEP preset's record of the model's own names (DeepSpeed's ``MoEModelPreset`` fields)."""

    router: str
    experts: str
    w1: str
    w2: str
    w3: Optional[str]
    fused: bool


# Presets whose experts are always stacked 3-D tensors in the model (checked: a tiny Mixtral's export
# equals its own state dict, tests/integration/test_export.py). Others may pick a per-expert layout
# at run time from the model (DeepSpeed's deepseek adapters), which the checkpoint does not record.
VERIFIED_PRESETS = ("mixtral",)


def preset_names(preset_name: str) -> ExpertNames:
    from deepspeed.module_inject.auto_ep_presets.registry import get_preset

    if preset_name not in VERIFIED_PRESETS:
        raise UnsupportedCheckpointError(
            f"AutoEP preset {preset_name!r}: its experts' layout in the model is not recorded in the checkpoint "
            f"(it may be stacked or per expert), so their Hugging Face names are unknown; exported presets: "
            f"{', '.join(VERIFIED_PRESETS)}", fix="export a Mixtral-preset checkpoint, or load the Universal "
                                                   "folder with uckpt.load_state_dict and save it with the model")
    p = get_preset(preset_name)
    return ExpertNames(p.router_pattern, p.experts_pattern, p.expert_w1, p.expert_w2, p.expert_w3,
                       p.expert_storage == "fused_3d" and p.expert_w3 is None)


def targets(names: Sequence[str], shared: Dict[str, str], autoep_layers: Optional[List[Dict[str, Any]]],
            preset: Optional[str]) -> List[Target]:
    """The export's tensors, in ``names`` order (the module's), from the Universal parameter ``names``."""
    names = [n for n in names if n not in shared]  # tied aliases: stored once, under the canonical name
    layers = [entry["module_path"] for entry in autoep_layers or []]
    if not layers:
        return [Target(n, (n,)) for n in names]
    if not preset:
        experts = [n for n in names if any(n.startswith(f"{m}.experts.") for m in layers)]
        raise UnsupportedCheckpointError(
            f"AutoEP expert parameters ({', '.join(experts[:4])}{' ...' if len(experts) > 4 else ''}) have no "
            "Hugging Face names: the checkpoint's ds_config names no expert_parallel.preset_model",
            fix="export from a checkpoint trained with an AutoEP preset (e.g. preset_model: mixtral)")
    hf = preset_names(preset)
    out: List[Target] = []
    done = set()
    for n in names:
        if n in done:
            continue
        layer = next((m for m in layers if n.startswith(m + ".")), None)
        if layer is None:
            out.append(Target(n, (n,)))
            continue
        rest = n[len(layer) + 1:]
        if rest.startswith("router."):  # router.gate.weight -> <router attribute>.weight
            out.append(Target(f"{layer}.{hf.router}.{rest.split('.', 2)[-1]}", (n,)))
        elif rest.startswith(hf.router + "."):
            continue  # the model's router attribute is an alias of the AutoEP router
        elif rest in ("experts.w1", "experts.w3") and hf.fused:
            parts = (f"{layer}.experts.w1", f"{layer}.experts.w3")
            out.append(Target(f"{layer}.{hf.experts}.{hf.w1}", parts, dim=1))
            done.update(parts)
        elif rest.startswith("experts."):
            own = {"w1": hf.w1, "w2": hf.w2, "w3": hf.w3}.get(rest.split(".", 1)[1])
            if own is None:
                raise UnsupportedCheckpointError(f"AutoEP expert parameter {n} has no name in preset {preset!r}",
                                                 fix="export the other parameters with a custom mapping")
            out.append(Target(f"{layer}.{hf.experts}.{own}", (n,)))
        else:
            out.append(Target(n, (n,)))
        done.add(n)
    return out
