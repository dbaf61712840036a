"""DoRA (``LoraConfig(use_dora=True)``) against real PEFT (torch CPU) and its own definition."""

import copy
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import safetensors.numpy
import torch
from flax import nnx

import jaxlora
from tests.support import conv_twins, models, peft_models
from tests.support.steps import compiled_dot_shapes, full_finetune_step
from tests.test_custom_layers import Block as CustomBlock

KEY = jax.random.key(0)
IDS = peft_models.ids()
TOLERANCE = 1e-5
TARGETS = ["q_proj", "v_proj", "embed"]
CFG = jaxlora.LoraConfig(rank=4, alpha=8, targets=TARGETS, use_dora=True)
LOSS_WEIGHTS = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
MODULE_MAP = jaxlora.peft_module_map()
LINEAR = [f"layers_{i}/{n}" for i in range(peft_models.LAYERS) for n in ("q_proj", "v_proj")]


def _layer(params, path):
    for key in path.split("/"):
        params = params[key]
    return params


def _nnx_keys(path):
    """``"layers_1/q_proj"`` -> ``("layers", 1, "q_proj")``: where `nnx_net` holds a layer."""
    keys = []
    for part in path.split("/"):
        keys += ["layers", int(part[len("layers_") :])] if part.startswith("layers_") else [part]
    return keys


def _nnx_layer(module, path):
    for key in _nnx_keys(path):
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def _torch_name(path):
    return "base_model.model." + path.replace("layers_", "layers.").replace("/", ".")


def _peft_copy(torch_base, lora_params, **config):
    """A PEFT DoRA model on a copy of ``torch_base`` holding ``lora_params``' adapters."""
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, **config)
    model = peft.get_peft_model(copy.deepcopy(torch_base), pc)
    state = {}
    for path in LINEAR:
        adapter = _layer(lora_params, path)["lora"]
        name = _torch_name(path)
        state[f"{name}.lora_A.default.weight"] = adapter.a.T
        state[f"{name}.lora_B.default.weight"] = adapter.b.T
        state[f"{name}.lora_magnitude_vector.default.weight"] = adapter.magnitude
    embed = lora_params["embed"]["lora"]
    state["base_model.model.embed.lora_embedding_A.default"] = embed.a.T
    state["base_model.model.embed.lora_embedding_B.default"] = embed.b.T
    state["base_model.model.embed.lora_magnitude_vector.default.weight"] = embed.magnitude
    state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    assert not model.load_state_dict(state, strict=False).unexpected_keys
    return model


def _torch_grads(model, ids=IDS):
    """Gradients of ``sum(logits * LOSS_WEIGHTS)`` by PEFT parameter name."""
    model.zero_grad()
    (model(torch.from_numpy(ids)) * torch.from_numpy(LOSS_WEIGHTS)).sum().backward()
    return {n: p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_match(grads_of, torch_grads):
    """``grads_of(path)`` gives jaxlora's ``(dA, dB, dm)`` of one adapted layer."""
    for path in [*LINEAR, "embed"]:
        da, db, dm = (np.asarray(g) for g in grads_of(path))
        name = _torch_name(path)
        if path == "embed":
            want_a = torch_grads[f"{name}.lora_embedding_A.default"]
            want_b = torch_grads[f"{name}.lora_embedding_B.default"]
        else:
            want_a = torch_grads[f"{name}.lora_A.default.weight"]
            want_b = torch_grads[f"{name}.lora_B.default.weight"]
        want_m = torch_grads[f"{name}.lora_magnitude_vector.default.weight"]
        np.testing.assert_allclose(da.T, want_a, rtol=0, atol=TOLERANCE, err_msg=path)
        np.testing.assert_allclose(db.T, want_b, rtol=0, atol=TOLERANCE, err_msg=path)
        np.testing.assert_allclose(dm, want_m, rtol=0, atol=TOLERANCE, err_msg=path)
        assert np.abs(want_m).max() > 1e-3  # the magnitude's gradient is not trivially zero


@pytest.fixture(scope="module")
def trained(base_params):
    """``Net`` adapted with DoRA, every trainable leaf moved off its initial value."""
    return peft_models.lorafied_and_moved(base_params, CFG, KEY)


def test_at_init_the_magnitude_is_the_column_norm_and_the_model_is_the_base(base_params):
    _, lora_params = jaxlora.lorafy(peft_models.Net(), base_params, CFG, IDS, key=KEY)
    q = lora_params["layers_0"]["q_proj"]
    chex.assert_trees_all_close(q["lora"].magnitude, jnp.linalg.norm(q["kernel"], axis=0))
    embed = lora_params["embed"]
    chex.assert_trees_all_close(
        embed["lora"].magnitude, jnp.linalg.norm(embed["embedding"], axis=0)
    )
    base = peft_models.Net().apply({"params": base_params}, IDS)
    adapted = peft_models.jax_logits(CFG, lora_params, IDS)
    np.testing.assert_allclose(adapted, base, rtol=0, atol=1e-6)


def test_linen_outputs_and_gradients_match_peft(torch_base, trained):
    peft_model = _peft_copy(torch_base, trained).eval()
    peft_models.assert_same_logits(peft_model, CFG, trained, IDS, TOLERANCE)
    moved = peft_models.torch_logits(peft_model, IDS) - peft_models.torch_logits(torch_base, IDS)
    assert np.abs(moved).max() > 0.05  # DoRA moved the logits by far more than TOLERANCE
    lora_model = jaxlora.LoraModel(peft_models.Net(), CFG)

    def loss(trainable, frozen):
        logits = lora_model.apply({"params": jaxlora.combine(trainable, frozen)}, IDS)
        return jnp.sum(logits * LOSS_WEIGHTS)

    trainable, frozen = jaxlora.split(trained)
    grads = jax.grad(loss)(trainable, frozen)

    def grads_of(path):
        adapter = _layer(grads, path)["lora"]
        return adapter.a, adapter.b, adapter.magnitude

    _assert_grads_match(grads_of, _torch_grads(peft_model))


def test_nnx_outputs_and_gradients_match_peft(torch_base, base_params, trained):
    module = jaxlora.lorafy(peft_models.nnx_net(torch_base), CFG, rngs=nnx.Rngs(0))
    for path in [*LINEAR, "embed"]:
        layer, adapter = _nnx_layer(module, path), _layer(trained, path)["lora"]
        layer.lora_a[...], layer.lora_b[...] = adapter.a, adapter.b
        layer.lora_magnitude[...] = adapter.magnitude
    peft_model = _peft_copy(torch_base, trained).eval()
    got = np.asarray(module(IDS))
    np.testing.assert_allclose(
        got, peft_models.torch_logits(peft_model, IDS), rtol=0, atol=TOLERANCE
    )

    def loss(module):
        return jnp.sum(module(IDS) * LOSS_WEIGHTS)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, jaxlora.LoraParam))(module)

    def grads_of(path):
        node = grads
        for key in _nnx_keys(path):
            node = node[key]
        return node["lora_a"][...], node["lora_b"][...], node["lora_magnitude"][...]

    _assert_grads_match(grads_of, _torch_grads(peft_model))
