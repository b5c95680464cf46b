"""An export straight from a native ZeRO / AutoTP / AutoEP checkpoint: the converter's plan and
exchange for the fp32 state only (a third of a conversion's bytes), each owner handing its assembled
parameters, and the frozen parameters and buffers it holds, to the export instead of writing
Universal files. The parts of one fused tensor (an AutoEP layer's gate and up experts) get one owner."""
from typing import List, Tuple

from ..conversion import run as convert_run
from ..conversion.comm import Comm, Phase
from ..conversion.payloads import fallback_payload, state_payload
from ..dsformat import constants as C
from ..options import ExportConfig
from ..torchsave.format import TensorData, torch_dtype
from . import names as hfnames
from .shards import ShardWriter


def _tensor(payload, shape):
    """A payload of the converter (a dict with ``param``, or a bare flat tensor) as a torch tensor of the
    parameter's logical shape."""
    import torch

    from .run import shaped

    value = payload.get(C.PARAM) if isinstance(payload, dict) else payload
    if isinstance(value, TensorData):
        data = memoryview(value.data).cast("B")
        value = (torch.frombuffer(data, dtype=torch_dtype(value.dtype)) if len(data) else
                 torch.empty(0, dtype=torch_dtype(value.dtype))).view(tuple(value.shape))
    return shaped(value, shape)


def fused_groups(index) -> List[List[int]]:
    """Each AutoEP layer's gate and up expert parameters (``.experts.w1`` / ``.experts.w3``), which an
    export may fuse into one tensor: they need one owner."""
    where = {p.name: i for i, p in enumerate(index.params)}
    return [[i, where[p.name[:-1] + "3"]] for i, p in enumerate(index.params)
            if p.name.endswith(".experts.w1") and p.name[:-1] + "3" in where]


def export_native(cfg: ExportConfig, comm: Comm, writer: ShardWriter, timings, log) -> Tuple[List[str], str, int]:
    from .run import ExportSink, _autoep_layers, _dtype, _model_state, _module_order, _preset

    opened = convert_run.open_native(cfg, comm, checks_output=False, states=(C.FP32_WEIGHT_KEY,),
                                     owner_groups=fused_groups, action="exporting")
    try:
        index, shards = opened.index, opened.shards
        with Phase(comm, timings, "plan"):
            model_state = _model_state(cfg.input_folder)  # its pickle only: every rank needs the names
            names = [p.name for p in index.params] + [fb.name for fb in index.fallbacks]
            module = _module_order(model_state)
            order = [n for n in module if n in set(names)] + [n for n in names if n not in set(module)]
            targets = hfnames.targets(order, dict(index.aliases), _autoep_layers(model_state), _preset(model_state))
            dtype, dtype_name = _dtype(cfg, model_state)
        sink = ExportSink(targets, writer, dtype)

        def put(spec, flats):
            if sink.wants(spec.name):
                payload = state_payload(spec, flats[C.FP32_WEIGHT_KEY], C.FP32_WEIGHT_KEY)
                sink.put(spec.name, _tensor(payload, spec.shape).clone())

        convert_run.each_assembled(opened, put)
        with Phase(comm, timings, "fallbacks"):
            for i, fb in enumerate(index.fallbacks):
                if opened.plan.fallback_writers[i] == comm.rank and sink.wants(fb.name):
                    tensor = shards[fb.source][C.MODULE_KEY][fb.name]
                    sink.put(fb.name, _tensor(fallback_payload(tensor), tensor.shape))
            sink.close()
        timings.update(opened.r.timings)
    finally:
        opened.close()
    return [t.name for t in targets], dtype_name, sink.count
