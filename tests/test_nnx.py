"""lorafy on NNX modules: wrapping, variable types for NNX filters, training, merge."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import jaxlora
from tests.support import models

IDS = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)


def _adapted(**overrides):
    model = models.NnxModel(nnx.Rngs(0))
    before = model(IDS)
    cfg = jaxlora.LoraConfig(
        **{"rank": 2, "alpha": 4, "targets": ["all-linear", "embed"], "exclude": ["head"]}
        | overrides
    )
    return jaxlora.lorafy(model, cfg, rngs=nnx.Rngs(1)), before


def test_every_nnx_layer_kind_is_wrapped_and_identity_holds():
    model, before = _adapted()
    paths = {layer.path for layer in jaxlora.summary(model).layers}
    assert paths == {
        "embed",
        "attn/query",
        "attn/key",
        "attn/value",
        "attn/out",
        "layers/0",
        "layers/1",
        "split_heads",
        "merge_heads",
    }
    assert isinstance(model.layers[0], jaxlora.LoraLayer)
    chex.assert_trees_all_equal(model(IDS), before)


def test_nnx_filters_select_adapters_and_training_moves_only_them():
    model, _ = _adapted(modules_to_save=["head"], bias="lora_only")
    lora_state = nnx.state(model, jaxlora.LoraParam)
    trainable_state = nnx.state(model, jaxlora.TrainableParam)
    n_lora = sum(x.size for x in jax.tree.leaves(lora_state))
    n_train = sum(x.size for x in jax.tree.leaves(trainable_state))
    # rank 2 on fan 16 + 16 (32 + 32) for attn q/k/v/out, layers/0-1, split_heads and
    # merge_heads, and 32 x 2 + 2 x 16 for the embedding
    assert n_lora == 8 * (16 * 2 + 2 * 16) + (32 * 2 + 2 * 16)
    biases = 4 * 16 + 2 * 16 + 16  # of the adapted attn, layers and split_heads (Einsum has none)
    head = 16 * 3 + 3
    assert n_train == n_lora + biases + head
    frozen = jax.tree.map(jnp.copy, nnx.state(model, nnx.Not(jaxlora.TrainableParam)))

    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=jaxlora.TrainableParam)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(opt.opt_state))) == 2 * n_train + 1

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return jnp.mean((m(IDS)[0] - 1.0) ** 2)

        diff = nnx.DiffState(0, jaxlora.TrainableParam)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(4)]
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(nnx.state(model, nnx.Not(jaxlora.TrainableParam)), frozen)
    assert model.layers[0].lora_b[...].any()


def test_nnx_merge_and_unmerge():
    model, _ = _adapted()
    nnx.update(model, jax.tree.map(lambda x: x + 0.05, nnx.state(model, jaxlora.LoraParam)))
    merged = jaxlora.merge(model)
    assert not jaxlora.summary(merged).layers
    assert type(merged.layers[0]) is nnx.Linear
    assert isinstance(model.layers[0], jaxlora.LoraLayer)  # merge is pure
    chex.assert_trees_all_close(merged(IDS), model(IDS), rtol=1e-5, atol=1e-5)
    restored = jaxlora.unmerge(merged, model)
    chex.assert_trees_all_close(
        nnx.state(restored, nnx.Param), nnx.state(model, nnx.Param), rtol=1e-5, atol=1e-6
    )


def test_nnx_dropout_follows_train_and_eval():
    model, _ = _adapted(dropout=0.5)
    nnx.update(model, jax.tree.map(lambda x: x + 0.5, nnx.state(model, jaxlora.LoraParam)))
    model.eval()
    chex.assert_trees_all_equal(model(IDS), model(IDS))
    model.train()
    assert not jnp.allclose(model(IDS)[0], model(IDS)[0])


def test_nnx_errors():
    model, _ = _adapted()
    with pytest.raises(ValueError, match=r"already holds LoRA layers"):
        jaxlora.lorafy(model, jaxlora.LoraConfig(), rngs=nnx.Rngs(0))
    fresh = models.NnxModel(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"(?s)matches no layer.*layers/0"):
        jaxlora.lorafy(fresh, jaxlora.LoraConfig(targets=["q_proj"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rank 9 for layer 'head' exceeds"):
        jaxlora.lorafy(fresh, jaxlora.LoraConfig(rank=9, targets=["head"]), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"rngs=nnx.Rngs"):
        jaxlora.lorafy(fresh, jaxlora.LoraConfig())
    with pytest.raises(ValueError, match=r"holds no LoRA layers"):
        jaxlora.merge(fresh)
