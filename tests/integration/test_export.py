"""uckpt export: Hugging Face safetensors from a Universal folder and straight from native ZeRO / AutoTP /
AutoEP checkpoints (real ones from the store), loaded with transformers' from_pretrained and
safetensors, compared with the training model holding the fp32 masters."""
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import uckpt
from examples import runner
from examples.autoep_train import build_model as build_mixtral
from examples.autotp_train import VOCAB, build_model as build_llama


def _tensors(folder):
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(path))
    return out


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _reference_llama(universal):
    """The training model holding the fp32 masters: the HF Llama with every Universal fp32 tensor."""
    model = build_llama()
    masters = uckpt.load_state_dict(universal, names=list(model.state_dict()))
    model.load_state_dict({k: v.reshape(model.state_dict()[k].shape) for k, v in masters.items()}, strict=True)
    return model


def _config(tmp_path, model):
    folder = tmp_path / "hf-config"
    model.config.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("name", ["tp2-dp2-z2-bf16", "tp2-dp1-z1-fp32", "tp2-dp1-z3-bf16"])
def test_autotp_llama_from_both_sources_loads_with_from_pretrained(store, tmp_path, name):
    from transformers import AutoModelForCausalLM

    universal, _ = store.universal_pair(name, 1)
    reference = _reference_llama(universal)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(reference, tokens)
    config = _config(tmp_path, reference)
    for source in (universal, store.tag(name)):
        for dtype in ("fp32", "bf16"):
            out = str(tmp_path / f"{os.path.basename(source)}-{dtype}")
            report = uckpt.export(source, out, dtype=dtype, hf_config=config, log={"quiet": True})
            assert report["source"] == ("universal" if source == universal else "native")
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            got = _logits(model, tokens)
            if dtype == "fp32":
                assert torch.equal(got, expected), (source, dtype)
            else:  # the bf16 cast of every weight, nothing else
                cast = build_llama()
                cast.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()})
                assert torch.equal(got, _logits(cast, tokens)), (source, dtype)
                assert not torch.equal(got, expected)


def test_autoep_mixtral_names_and_values_are_the_models_own(store, tmp_path):
    """Mixtral trained at autoep_size 2 with lr 0 (fp32): its fp32 masters are the model's initial
    weights, so the export from either source holds exactly build_model()'s state dict under its own
    names (router, fused gate_up_proj in the model's gate-then-up order, down_proj), and
    from_pretrained gives its logits. The native export runs on 2 ranks, sharded."""
    from transformers import AutoModelForCausalLM

    save = str(tmp_path / "native")
    runner.train(2, "--ep", "2", "--zero-stage", "2", "--dtype", "fp32", "--steps", "1", "--lr", "0",
                 "--save-dir", save, module="examples.autoep_train")
    tag = os.path.join(save, open(os.path.join(save, "latest")).read().strip())
    universal = str(tmp_path / "universal")
    runner.uckpt_convert(1, tag, universal, "--quiet")
    model = build_mixtral()
    initial = model.state_dict()
    config = _config(tmp_path, model)
    out_u = str(tmp_path / "from-universal")
    uckpt.export(universal, out_u, dtype="fp32", hf_config=config, log={"quiet": True})
    out_n = str(tmp_path / "from-native")
    runner.run(runner.torchrun_cmd(2, ["-m", "uckpt", "export", "--input_folder", tag, "--output_folder", out_n,
                                       "--dtype", "fp32", "--max_shard_size", "100KB", "--hf_config", config,
                                       "--quiet"]))
    for out in (out_u, out_n):
        exported = _tensors(out)
        assert set(exported) == set(initial)
        for key, value in initial.items():
            assert torch.equal(exported[key], value), (out, key)
    index = json.load(open(os.path.join(out_n, "model.safetensors.index.json")))
    files = sorted(f for f in os.listdir(out_n) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(files) and set(index["weight_map"]) == set(initial)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = AutoModelForCausalLM.from_pretrained(out_n, dtype=torch.float32)
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))


def test_trained_mixtral_exports_the_same_from_both_sources(store, tmp_path):
    name = "ep2-dp2-z2-bf16"
    universal, _ = store.universal_pair(name, 1)
    a, b = str(tmp_path / "u"), str(tmp_path / "n")
    uckpt.export(universal, a, log={"quiet": True})
    uckpt.export(store.tag(name), b, log={"quiet": True})
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    assert all(torch.equal(ta[k], tb[k]) and ta[k].dtype == torch.bfloat16 for k in ta)


def test_custom_module_export_loads_into_its_state_dict(store, tmp_path):
    """tiny_train's module (tied head, frozen layer, buffer, two groups): the tied head is stored once,
    as save_pretrained does; everything else loads into the module's state dict."""
    from examples.tiny_train import TinyLM

    name = "z2-bf16-dp4"
    universal = store.uckpt_universal(name, 2)
    out = str(tmp_path / "export")
    uckpt.export(universal, out, dtype="fp32", max_shard_size="2KB", log={"quiet": True})
    tensors = _tensors(out)
    model = TinyLM(64, 32, 2)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert missing == ["head.weight"] and unexpected == []  # tied to embed.weight
    assert torch.equal(model.head.weight, model.embed.weight)
    masters = uckpt.load_state_dict(universal, names=list(tensors))
    for key, value in tensors.items():
        assert torch.equal(value, masters[key].reshape(value.shape)), key
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == \
        sum(v.numel() * v.element_size() for v in tensors.values())


def test_refuses_to_replace_a_folder_it_did_not_write(store, tmp_path):
    universal = store.uckpt_universal("z2-bf16-dp4", 2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(uckpt.UckptError, match="is not a Hugging Face export"):
        uckpt.export(universal, str(other), overwrite=True, log={"quiet": True})
    assert (other / "keep.txt").read_text() == "mine"
    out = str(tmp_path / "export")
    uckpt.export(universal, out, log={"quiet": True})
    with pytest.raises(uckpt.UckptError, match="already exists"):
        uckpt.export(universal, out, log={"quiet": True})
    uckpt.export(universal, out, overwrite=True, log={"quiet": True})
    assert not os.path.exists(os.path.join(os.path.dirname(out), "latest_universal"))

