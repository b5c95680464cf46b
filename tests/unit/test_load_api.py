"""The loader's DeepSpeed-shaped surface without an engine: the return value, the client-state keys
for each flag combination, and the routing of ``engine.load_checkpoint`` by use_for_universal_loads."""
from types import SimpleNamespace

import pytest
from deepspeed.runtime.engine import DeepSpeedEngine

import uckpt
from uckpt.errors import UnsupportedEngineError
from uckpt.load import engine as loader
from uckpt.load.engine import LoadResult, _client_state

SAVED = {k: k for k in ("module", "optimizer", "lr_scheduler", "global_steps", "skipped_steps", "dp_world_size",
                        "mp_world_size", "data_sampler", "random_ltd", "param_shapes", "ds_config", "my_key")}


def test_result_unpacks_as_deepspeeds_pair():
    result = LoadResult("/x/mp_rank_00_model_states.pt", {"a": 1}, {"bytes_read": 3})
    load_path, client = result
    assert (load_path, client) == (result.load_path, result.client_state) and result.report["bytes_read"] == 3
    assert len(result) == 2


@pytest.mark.parametrize("module_only,sched,optim,kept", [
    (False, True, True, {"param_shapes", "ds_config", "my_key"}),
    (False, False, True, {"param_shapes", "ds_config", "my_key", "lr_scheduler"}),
    (False, True, False, {"param_shapes", "ds_config", "my_key", "optimizer"}),
    (True, True, True, {"param_shapes", "ds_config", "my_key", "global_steps", "skipped_steps", "dp_world_size",
                        "mp_world_size", "data_sampler", "random_ltd"}),
])
def test_client_state_keeps_what_deepspeed_keeps(module_only, sched, optim, kept):
    """DeepSpeed 0.19.8's _load_checkpoint: ``module`` always consumed; the engine counters unless
    load_module_only; ``lr_scheduler`` / ``optimizer`` when their flag is set."""
    assert set(_client_state(SAVED, module_only, sched, optim)) == kept


def test_routing_is_opt_in_and_reversible(monkeypatch):
    calls = []

    def original(self, load_dir, tag=None, *rest):
        calls.append(("deepspeed", load_dir))
        return "ds-path", {}

    monkeypatch.setattr(DeepSpeedEngine, "load_checkpoint", original)
    seen = {}

    def fake_load(engine, load_dir, tag=None, **flags):
        if engine.unsupported:
            raise UnsupportedEngineError("NVMe optimizer offload is not supported")
        seen.update(flags)
        return LoadResult("uc-path", {"k": 1}, {"bytes_read": 5})

    monkeypatch.setattr(loader, "load_into_engine", fake_load)
    universal = SimpleNamespace(load_universal_checkpoint=lambda: True, unsupported=False)
    native = SimpleNamespace(load_universal_checkpoint=lambda: False, unsupported=False)
    assert uckpt.use_for_universal_loads() is False
    try:
        assert uckpt.use_for_universal_loads() is True  # idempotent
        assert DeepSpeedEngine.load_checkpoint(universal, "d", None, False, True, True, True) == ("uc-path", {"k": 1})
        assert seen == {"load_module_strict": False, "load_optimizer_states": True, "load_lr_scheduler_states": True,
                        "load_module_only": True}
        assert universal.uckpt_load_report == {"bytes_read": 5}
        assert DeepSpeedEngine.load_checkpoint(native, "d") == ("ds-path", {})
        universal.unsupported = True
        assert DeepSpeedEngine.load_checkpoint(universal, "e") == ("ds-path", {})
        assert calls == [("deepspeed", "d"), ("deepspeed", "e")]
    finally:
        assert uckpt.use_for_universal_loads(False) is True
    assert DeepSpeedEngine.load_checkpoint is original
