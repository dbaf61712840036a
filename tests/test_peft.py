"""Hugging Face PEFT LoRA format, both ways, checked against real PEFT on a tiny torch model."""

import copy
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch

import jaxlora
from tests.support import peft_models

KEY = jax.random.key(0)
IDS = peft_models.ids()
MODULE_MAP = jaxlora.peft_module_map()
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def peft_saved(torch_base, tmp_path_factory):
    """A PEFT adapter with every supported feature, trained to non-zero values, saved by PEFT."""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed"],
        rank_pattern={"layers.1.q_proj": 2},
        alpha_pattern={"v_proj": 4},
        modules_to_save=["classifier"],
        bias="lora_only",
        lora_dropout=0.1,
    )
    model = peft.get_peft_model(copy.deepcopy(torch_base), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(directory)
    return directory, peft_models.torch_logits(model.eval(), IDS)


def _lorafied(base_params, **overrides):
    """A jaxlora adapter on the twin model with non-zero B and a changed head."""
    cfg = jaxlora.LoraConfig(
        **{
            "rank": 4,
            "alpha": 8,
            "targets": ["q_proj", "v_proj", "embed"],
            "rank_pattern": {"layers_1/q_proj": 2},
            "alpha_pattern": {"v_proj": 3},
            "modules_to_save": ["classifier"],
            **overrides,
        }
    )
    return cfg, peft_models.lorafied_and_moved(base_params, cfg, KEY)


def test_peft_adapter_imports_with_torch_parity(peft_saved, base_params):
    directory, want = peft_saved
    with jax.numpy_dtype_promotion("strict"):
        cfg, lora_params = jaxlora.import_peft(directory, base_params, module_map=MODULE_MAP)
        got = peft_models.jax_logits(cfg, lora_params, IDS)
    assert np.abs(got - want).max() <= TOLERANCE
    layers = {layer.path: layer for layer in jaxlora.summary(lora_params).layers}
    assert layers["layers_1/q_proj"].rank == 2 and layers["layers_0/q_proj"].scale == 2.0
    assert layers["layers_1/v_proj"].scale == 1.0 and layers["embed"].rank == 4
    assert (cfg.rank, cfg.alpha, cfg.bias, cfg.dropout) == (4, 8, "lora_only", 0.1)
    assert isinstance(lora_params["classifier"]["kernel"], jaxlora.Trainable)
    assert isinstance(lora_params["layers_0"]["q_proj"]["bias"], jaxlora.Trainable)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_exported_adapter_loads_in_peft_with_parity(tmp_path, torch_base, base_params, rslora):
    cfg, lora_params = _lorafied(base_params, rslora=rslora, bias="lora_only")
    jaxlora.export_peft(tmp_path / "out", lora_params, cfg, module_map=MODULE_MAP)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), tmp_path / "out").eval()
    peft_models.assert_same_logits(model, cfg, lora_params, IDS, TOLERANCE)


def test_exported_files_are_what_peft_writes(tmp_path, peft_saved, base_params):
    cfg, lora_params = _lorafied(base_params)
    jaxlora.export_peft(
        tmp_path / "out", lora_params, cfg, module_map=MODULE_MAP, task_type="SEQ_CLS"
    )
    ours = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    theirs = json.loads((peft_saved[0] / "adapter_config.json").read_text())
    assert ours.keys() == theirs.keys()
    assert ours["rank_pattern"] == {"layers.1.q_proj": 2}
    assert ours["alpha_pattern"] == {"layers.0.v_proj": 3, "layers.1.v_proj": 3}
    assert ours["modules_to_save"] == ["classifier"] and ours["task_type"] == "SEQ_CLS"
    parsed = peft.PeftConfig.from_pretrained(tmp_path / "out")
    assert (parsed.r, parsed.lora_alpha, parsed.peft_type) == (4, 8, peft.PeftType.LORA)
    with safetensors.safe_open(tmp_path / "out" / "adapter_model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    assert shapes["base_model.model.layers.1.q_proj.lora_A.weight"] == [2, 8]
    assert shapes["base_model.model.layers.1.q_proj.lora_B.weight"] == [8, 2]
    assert shapes["base_model.model.embed.lora_embedding_A"] == [4, peft_models.VOCAB]
    assert shapes["base_model.model.classifier.weight"] == [peft_models.CLASSES, 8]


def test_export_then_import_is_bitwise_exact(tmp_path, base_params):
    cfg, lora_params = _lorafied(base_params, bias="lora_only")
    jaxlora.export_peft(tmp_path / "out", lora_params, cfg, module_map=MODULE_MAP)
    imported_cfg, imported = jaxlora.import_peft(
        tmp_path / "out", base_params, module_map=MODULE_MAP
    )
    chex.assert_trees_all_equal(imported, lora_params)
    assert jax.tree.structure(imported) == jax.tree.structure(lora_params)
    assert jaxlora.summary(imported).layers == jaxlora.summary(lora_params).layers
    _, again = jaxlora.lorafy(peft_models.Net(), base_params, imported_cfg, IDS, key=KEY)
    assert jax.tree.structure(again) == jax.tree.structure(lora_params)
    _, replaced = jaxlora.import_peft(tmp_path / "out", again, module_map=MODULE_MAP)
    chex.assert_trees_all_equal(replaced, lora_params)


def test_module_maps():
    bert = jaxlora.peft_module_maps["bert"]
    assert bert("encoder/layer_0/attention/self/query") == "encoder.layer.0.attention.self.query"
    seq_cls = jaxlora.peft_module_maps["bert-seq-cls"]
    assert seq_cls("encoder/layer_11/output/dense") == "bert.encoder.layer.11.output.dense"
    assert seq_cls("classifier") == "classifier"
    llama = jaxlora.peft_module_maps["llama"]
    assert llama("model/layers_0/self_attn/q_proj") == "model.layers.0.self_attn.q_proj"
    assert jaxlora.peft_module_maps["llama-body"]("layers_2/mlp/up_proj") == (
        "model.layers.2.mlp.up_proj"
    )
    tunix = jaxlora.peft_module_maps["tunix-llama3"]
    assert tunix("layers/3/attn/o_proj/w") == "model.layers.3.self_attn.o_proj"
    assert tunix("embedder/input_embedding") == "model.embed_tokens"
    assert tunix("layers/3/attn/o_proj") is None  # the module; its weight w is the adapter
    gemma = jaxlora.peft_module_maps["tunix-gemma"]
    attn = "model.layers.1.self_attn"
    assert gemma("layers/1/attn/qkv_einsum/w") == (
        f"{attn}.q_proj",
        f"{attn}.k_proj",
        f"{attn}.v_proj",
    )
    assert gemma("layers/1/moe/linear") == "model.layers.1.experts.down_proj"
    moe = jaxlora.peft_module_maps["tunix-qwen3-moe"]
    assert moe("layers/0/mlp/up_proj") == "model.layers.0.mlp.experts.gate_up_proj[1]"


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def exported(tmp_path, base_params):
    cfg, lora_params = _lorafied(base_params)
    jaxlora.export_peft(tmp_path / "adapter", lora_params, cfg, module_map=MODULE_MAP)
    return tmp_path / "adapter"


def _edit_tensors(directory, edit):
    file = directory / "adapter_model.safetensors"
    tensors = edit(safetensors.numpy.load_file(file))
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def _edit_config(directory, **changes):
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _import(directory, params, **kwargs):
    return jaxlora.import_peft(directory, params, module_map=MODULE_MAP, **kwargs)


def test_another_base_is_an_error(exported, base_params):
    wide = copy.deepcopy(base_params)
    wide["layers_0"]["q_proj"]["kernel"] = jnp.zeros((8, 16))
    with pytest.raises(ValueError, match=r"'layers_0/q_proj'.*lora_B.*\(16, 4\).*another base"):
        _import(exported, wide)


def test_missing_and_unknown_keys_are_errors_unless_allowed(exported, base_params):
    prefix = "base_model.model."
    _edit_tensors(exported, lambda t: {**t, prefix + "pooler.lora_A.weight": np.ones((4, 8))})
    with pytest.raises(ValueError, match=r"'pooler': no flax layer(.|\n)*allow_unmatched"):
        _import(exported, base_params)
    with pytest.warns(UserWarning, match="partially"):
        _, loaded = _import(exported, base_params, allow_unmatched=True)
    assert "lora" in loaded["layers_1"]["v_proj"]

    _edit_tensors(
        exported, lambda t: {k: v for k, v in t.items() if "layers.1.q_proj.lora" not in k}
    )
    with pytest.raises(ValueError, match=r"'layers_1/q_proj'.*targeted.*has no factors"):
        _import(exported, base_params, allow_unmatched=False)
    _edit_tensors(exported, lambda t: {k: v for k, v in t.items() if "classifier.bias" not in k})
    with pytest.raises(ValueError, match=r"classifier.bias \(modules_to_save\) is missing"):
        _import(exported, base_params)
    _edit_tensors(exported, lambda t: {k: v for k, v in t.items() if "v_proj.lora_B" not in k})
    with pytest.raises(ValueError, match=r"'layers_0/v_proj'.*lora_B is missing"):
        _import(exported, base_params)


def test_key_prefixes_are_checked_with_a_fix(exported, base_params):
    _edit_tensors(
        exported, lambda t: {k.replace(".model.", ".model.net.", 1): v for k, v in t.items()}
    )
    with pytest.raises(ValueError, match=r"extra prefix 'net.'.*peft_module_map\('net.'\)"):
        _import(exported, base_params)
    _edit_tensors(
        exported, lambda t: {k.removeprefix("base_model.model."): v for k, v in t.items()}
    )
    with pytest.raises(ValueError, match=r"lacks PEFT's 'base_model.model.' prefix"):
        _import(exported, base_params)


def test_transposed_factors_and_rank_disagreement_are_errors(exported, base_params):
    key = "base_model.model.layers.0.v_proj.lora_A.weight"
    _edit_tensors(exported, lambda t: {**t, key: np.ascontiguousarray(t[key].T)})
    with pytest.raises(ValueError, match=r"'layers_0/v_proj'.*lora_A.*looks transposed"):
        _import(exported, base_params)
    _edit_tensors(exported, lambda t: {**t, key: np.ascontiguousarray(t[key].T)})
    _edit_config(exported, r=3)
    with pytest.raises(ValueError, match=r"rank 4 disagrees with r=3"):
        _import(exported, base_params)
    _edit_config(exported, r=4, use_qalora=True)
    with pytest.raises(ValueError, match="use_qalora"):
        _import(exported, base_params)


def test_corrupt_or_pickle_files_are_never_read(exported, base_params):
    file = exported / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _import(exported, base_params)
    file.rename(exported / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="never reads pickle"):
        _import(exported, base_params)


class _ScannedLayer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.Dense(8, name="dense")(h), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            _ScannedLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return scan(name="layers")(x, None)[0]


def test_layers_peft_cannot_express_are_named(tmp_path):
    x = jnp.ones((2, 8))
    params = _Scanned().init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=2)
    _, lora_params = jaxlora.lorafy(_Scanned(), params, cfg, x, key=KEY)
    with pytest.raises(ValueError, match=r"'layers/dense'.*\(3, 8, 8\).*stacked axis"):
        jaxlora.export_peft(tmp_path / "out", lora_params, cfg, module_map=MODULE_MAP)
    assert not (tmp_path / "out").exists()


def test_export_replaces_only_adapter_directories(exported, base_params):
    (exported / "README.md").write_text("model card")
    cfg, lora_params = _lorafied(base_params, alpha=16)
    jaxlora.export_peft(exported, lora_params, cfg, module_map=MODULE_MAP)
    assert (exported / "README.md").read_text() == "model card"
    assert json.loads((exported / "adapter_config.json").read_text())["lora_alpha"] == 16
    (exported / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\['tokenizer.json'\].*refusing"):
        jaxlora.export_peft(exported, lora_params, cfg, module_map=MODULE_MAP)
