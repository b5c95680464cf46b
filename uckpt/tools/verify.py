"""``uckpt verify``: is a Universal checkpoint complete and well-formed, and (``--against``) does
re-slicing it to the source topology give back every fragment of the native checkpoint?

Checks (spec section 5): every parameter folder has fp32 and, when it has moments, both moments
of the same shape; values finite and ``exp_avg_sq >= 0``; one step value; ``optimizer_state.pt``
and the model files present. Against a native checkpoint: every optimizer-owned parameter is
present, and each state rebuilt from the source shards with the parameter's merge rule (TP
slices, vocabulary cut, ...) equals the Universal tensor bit for bit, and ``step`` equals the
source's.
"""
from typing import Any, Dict, List

import torch

from ..dsformat import constants as C
from ..errors import UckptError
from ..dsformat.index import _steps_equal, build_index
from ..dsformat.files import discover
from ..conversion.payloads import state_payload
from ..dsformat.shards import opened_checkpoint, read_fragment
from ..torchsave.format import TensorData
from ..dsformat.universal import is_universal, list_params, load_payload, model_files, optimizer_state, payload_tensor


def verify(universal: str, against: str = None) -> Dict[str, Any]:
    if not is_universal(universal):
        raise UckptError(f"is not a Universal checkpoint (no {C.UNIVERSAL_ZERO_FOLDER}/ folder)", universal,
                         "pass the folder written by uckpt convert or ds_to_universal.py")
    failures: List[str] = []
    params = list_params(universal)
    steps = set()
    checked = 0
    for p in params:
        if C.FP32_WEIGHT_KEY not in p.states:
            failures.append(f"{p.name}: no fp32.pt")
            continue
        fp32 = payload_tensor(load_payload(p.states[C.FP32_WEIGHT_KEY]))
        if fp32 is None:
            failures.append(f"{p.name}: fp32.pt holds no tensor")
            continue
        if fp32.is_floating_point() and not torch.isfinite(fp32).all():
            failures.append(f"{p.name}: fp32 has non-finite values")
        moments = [s for s in C.MOMENT_STATES if s in p.states]
        if moments and len(moments) != len(C.MOMENT_STATES):
            failures.append(f"{p.name}: has {', '.join(moments)} but not all of {', '.join(C.MOMENT_STATES)}")
        for s in moments:
            t = payload_tensor(load_payload(p.states[s]))
            if t is None or t.shape != fp32.shape:
                failures.append(f"{p.name}: {s} shape {None if t is None else tuple(t.shape)} != fp32 {tuple(fp32.shape)}")
                continue
            if not torch.isfinite(t).all():
                failures.append(f"{p.name}: {s} has non-finite values")
            if s == C.EXP_AVG_SQ_KEY and (t < 0).any():
                failures.append(f"{p.name}: exp_avg_sq has negative values")
        if C.STEP_KEY in p.states:
            step = load_payload(p.states[C.STEP_KEY])
            steps.add(float(step))
        checked += 1
    if len(steps) > 1:
        failures.append(f"step differs across parameters: {sorted(steps)}")
    if optimizer_state(universal) is None:
        failures.append(f"{C.UNIVERSAL_ZERO_FOLDER}/{C.UNIVERSAL_OPTIMIZER_STATE_FILE} is missing")
    if not model_files(universal):
        failures.append("no *_model_states.pt file (DeepSpeed's loader needs one for its global state)")
    compared = 0
    if against:
        compared = _against(universal, against, {p.name: p for p in params}, failures)
    return {"universal": universal, "against": against, "params": len(params), "checked_params": checked,
            "tensors_compared": compared, "steps": sorted(steps), "ok": not failures, "failures": failures}


def _against(universal: str, native: str, by_name, failures: List[str]) -> int:
    """Rebuild every state of every parameter from the native shards with its merge rule (TP slices,
    vocabulary cut, ...) and compare it bit for bit with the Universal tensor."""
    files = discover(native)
    with opened_checkpoint(files) as (shards, metas):
        index = build_index(files, metas, inject_missing_state=True, strict=False)
        compared = 0
        for spec in index.params:
            p = by_name.get(spec.name)
            if p is None:
                failures.append(f"{spec.name}: in the native checkpoint but has no Universal folder")
                continue
            for state in C.TENSOR_STATES:
                if state not in p.states:
                    failures.append(f"{spec.name}: no {state}.pt")
                    continue
                flat = bytearray(4 * spec.numel)
                for f in spec.fragments:
                    base = 4 * spec.flat_offset(f)
                    read_fragment(shards[f.source], index.family, f, state, memoryview(flat)[base:base + 4 * f.numel])
                expected = payload_tensor(state_payload(spec, flat, state), (TensorData, torch.Tensor))
                if isinstance(expected, TensorData):
                    expected = expected.to_torch()
                got = payload_tensor(load_payload(p.states[state]))
                compared += 1
                if got is None or got.shape != expected.shape or not torch.equal(got, expected):
                    detail = (f"shape {None if got is None else tuple(got.shape)} vs {tuple(expected.shape)}"
                              if got is None or got.shape != expected.shape else
                              f"max abs diff {(got.double() - expected.double()).abs().max().item():.3g}")
                    failures.append(f"{spec.name}: {state} differs from the native shards ({detail})")
            if spec.has_step:
                step = load_payload(p.states[C.STEP_KEY]) if C.STEP_KEY in p.states else None
                if step is None or not _steps_equal(step, spec.step):
                    failures.append(f"{spec.name}: step {step} != native {spec.step}")
        return compared


def format_report(r: Dict[str, Any]) -> str:
    lines = [f"{'OK' if r['ok'] else 'FAILED'}: {r['universal']}: {r['checked_params']}/{r['params']} parameter "
             f"folders checked, steps {r['steps']}" +
             (f", {r['tensors_compared']} tensors compared with {r['against']}" if r["against"] else "")]
    lines += [f"  - {f}" for f in r["failures"][:50]]
    if len(r["failures"]) > 50:
        lines.append(f"  ... and {len(r['failures']) - 50} more")
    return "\n".join(lines)
