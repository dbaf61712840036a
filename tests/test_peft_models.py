"""PEFT interop on the weights PEFT's Linear-only view does not cover: einsum-shaped heads,
fused q/k/v, MoE experts (``target_parameters``) and convolutions, against real PEFT.

The tunix models (NNX, `tests.support.tunix_zoo`) have Hugging Face torch twins with their
weights copied (`tests.support.hf_twins`): llama3 and qwen3_moe give the same logits as the
twin, so adapters are compared on logits; for gemma/gemma3 only the projections are the
same, so adapters are compared on each projection's output.
"""

import copy
import json

import chex
import jax
import numpy as np
import peft
import pytest
import safetensors
import torch
from flax import nnx

import jaxlora
from tests.support import hf_twins
from tests.support import tunix_zoo as zoo

pytestmark = [
    # tunix's own code warns (deprecated JAX and flax APIs) on every call.
    pytest.mark.filterwarnings(zoo.PYTEST_WARNINGS),
    # PEFT says it saves the base embedding beside an adapted one; import_peft skips it.
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning:peft"),
]
TOLERANCE = 1e-5
# What LoRA moves the logits by in these tests, so that a parity within TOLERANCE means
# something: the adapters are trained to this size (measured 0.9 to 3.5).
MOVED = 0.1


def _noised(module, scale=0.1):
    """``module`` with every LoRA factor moved off its initial value (B no longer zero)."""
    state = nnx.state(module, jaxlora.LoraParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))
    return module


def _adapted(built, config):
    return _noised(jaxlora.lorafy(nnx.clone(built.module), config, *built.inputs, rngs=nnx.Rngs(0)))


def _peft_trained(model, config):
    """A PEFT model on a copy of ``model`` with every LoRA factor moved off its init."""
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return peft_model.eval()


def _save(peft_model, directory):
    peft_model.save_pretrained(directory)
    return directory


def _logits(built, module):
    return np.asarray(built.logits(module))


def _lora_state(module):
    return nnx.state(module, jaxlora.TrainableParam)


LLAMA_CONFIG = jaxlora.LoraConfig(
    rank=4,
    alpha=8,
    targets=["all-linear", "input_embedding"],
    rank_pattern={"o_proj": 2},
    alpha_pattern={"v_proj": 3},
)


@pytest.fixture(scope="module")
def llama():
    built = zoo.build("llama3")
    twin = hf_twins.llama(built)
    assert np.abs(hf_twins.logits(twin, built.tokens) - _logits(built, None)).max() <= TOLERANCE
    return built, twin


def test_tunix_llama3_exports_to_peft_with_parity(tmp_path, llama):
    built, twin = llama
    module = _adapted(built, LLAMA_CONFIG)
    module_map = jaxlora.peft_module_maps["tunix-llama3"]
    jaxlora.export_peft(tmp_path / "out", module, LLAMA_CONFIG, module_map=module_map)

    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "model.layers.1.self_attn.q_proj" in saved["target_modules"]
    assert {"lm_head", "model.embed_tokens"} <= set(saved["target_modules"])
    assert saved["rank_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 2 for i in (0, 1)}
    with _safe_open(tmp_path / "out") as f:  # (d, heads, head_dim) -> torch (heads·head_dim, d)
        assert f.get_slice(_key("model.layers.0.self_attn.q_proj", "B")).get_shape() == [32, 4]
        assert f.get_slice(_key("model.layers.0.self_attn.o_proj", "A")).get_shape() == [2, 32]

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "out").eval()
    want = _logits(built, module)
    assert np.abs(want - _logits(built, None)).max() > MOVED
    assert np.abs(hf_twins.logits(loaded, built.tokens) - want).max() <= TOLERANCE

    config, imported = jaxlora.import_peft(
        tmp_path / "out", built.module, *built.inputs, module_map=module_map
    )
    chex.assert_trees_all_equal(_lora_state(imported), _lora_state(module))
    assert jaxlora.summary(imported).layers == jaxlora.summary(module).layers
    assert config.rank_for("layers/0/attn/o_proj/w") == 2
    assert config.alpha_for("layers/1/attn/v_proj/w") == 3


def test_peft_adapter_imports_into_tunix_llama3_with_parity(tmp_path, llama):
    built, twin = llama
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    peft_model = _peft_trained(
        twin,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=[*targets, "embed_tokens", "lm_head"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"o_proj": 4},
        ),
    )
    directory = _save(peft_model, tmp_path / "peft")
    config, module = jaxlora.import_peft(
        directory,
        built.module,
        *built.inputs,
        module_map=jaxlora.peft_module_maps["tunix-llama3"],
    )
    want = hf_twins.logits(peft_model, built.tokens)
    assert np.abs(want - _logits(built, None)).max() > MOVED
    assert np.abs(_logits(built, module) - want).max() <= TOLERANCE
    layers = {layer.path: layer for layer in jaxlora.summary(module).layers}
    assert layers["layers/0/attn/q_proj/w"].a_shape == (32, 4)
    assert layers["layers/0/attn/q_proj/w"].b_shape == (4, 4, 8)
    assert layers["layers/1/attn/k_proj/w"].rank == 2
    assert layers["layers/0/attn/o_proj/w"].scale == 1.0
    assert "layers/0/mlp/up_proj" not in layers and config.targets[0].startswith("re:")


def _key(module, factor):
    return f"base_model.model.{module}.lora_{factor}.weight"


def _safe_open(directory):
    return safetensors.safe_open(directory / "adapter_model.safetensors", "np")
