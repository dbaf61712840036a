"""merge / unmerge: pure, jit-able, equal to the adapted model."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxlora
from tests.support import models

KEY = jax.random.key(0)
IDS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64


def _trained(params):
    trainable, frozen = jaxlora.split(params)
    keys = iter(jax.random.split(KEY, len(jax.tree.leaves(trainable))))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), trainable)
    return jaxlora.combine(trainable, frozen)


class MergeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_then_unmerge(self):
        model = models.TinyLM()
        params = model.init(KEY, IDS)["params"]
        cfg = jaxlora.LoraConfig(
            rank=4,
            targets=["all-linear", "embed"],
            rank_pattern={"up": 2},
            alpha_pattern={"down": 3},
        )
        lora_model, lora_params = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
        lora_params = _trained(lora_params)
        merged = self.variant(jaxlora.merge)(lora_params)
        assert not jaxlora._tree.has_adapters(merged)
        chex.assert_trees_all_equal_structs(merged, params)
        chex.assert_trees_all_close(
            model.apply({"params": merged}, IDS),
            lora_model.apply({"params": lora_params}, IDS),
            rtol=1e-5,
            atol=1e-5,
        )
        restored = self.variant(jaxlora.unmerge)(merged, lora_params)
        chex.assert_trees_all_close(restored, lora_params, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_merge_keeps_bfloat16_kernels(self):
        model = models.MLP(features=(16, 8))
        x = jnp.ones((2, 8))
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.init(KEY, x)["params"])
        _, lp = jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=2), x, key=KEY)
        merged = self.variant(jaxlora.merge)(_trained(lp))
        assert merged["dense_0"]["kernel"].dtype == jnp.bfloat16


def test_merge_of_base_params_is_an_error():
    params = models.MLP().init(KEY, jnp.ones((1, 4)))["params"]
    with pytest.raises(ValueError, match=r"hold no LoRA adapters"):
        jaxlora.merge(params)


def test_unmerge_of_unrelated_params_is_an_error():
    model = models.MLP(features=(16, 8))
    x = jnp.ones((2, 8))
    _, lp = jaxlora.lorafy(
        model, model.init(KEY, x)["params"], jaxlora.LoraConfig(rank=2), x, key=KEY
    )
    with pytest.raises(ValueError, match=r"merged params lack \['dense_1'\]"):
        jaxlora.unmerge({"dense_0": jaxlora.merge(lp)["dense_0"]}, lp)


def test_unmerge_of_params_that_were_never_merged_is_an_error():
    """Subtracting ΔW from weights that never had it added would be silently wrong."""
    model = models.MLP(features=(16, 8))
    x = jnp.ones((2, 8))
    base = model.init(KEY, x)["params"]
    _, lp = jaxlora.lorafy(model, base, jaxlora.LoraConfig(rank=2), x, key=KEY)
    lp = _trained(lp)
    with pytest.raises(ValueError, match=r"holds LoRA adapters, so it was never merged"):
        jaxlora.unmerge(lp, lp)
    with pytest.raises(ValueError, match=r"weight 'dense_\d' of the first .* never merged"):
        jaxlora.unmerge(base, lp)
    jaxlora.unmerge(jaxlora.merge(lp), lp)  # the real thing still works


def test_unmerge_with_other_adapters_is_an_error():
    """Params merged from one adapted tree, unmerged with another of the same shapes."""
    model = models.MLP(features=(16, 8))
    x = jnp.ones((2, 8))
    base = model.init(KEY, x)["params"]
    _, lp = jaxlora.lorafy(model, base, jaxlora.LoraConfig(rank=2), x, key=KEY)
    lp = _trained(lp)
    _, other = jaxlora.lorafy(model, base, jaxlora.LoraConfig(rank=2, alpha=4), x, key=KEY)
    other = _trained(_trained(other))
    with pytest.raises(ValueError, match=r"weight 'dense_\d' minus these adapters' ΔW is .* "):
        jaxlora.unmerge(jaxlora.merge(lp), other)
    restored = jaxlora.unmerge(jaxlora.merge(lp), lp)
    chex.assert_trees_all_close(jaxlora.split(restored)[1], jaxlora.split(lp)[1], atol=1e-6)


def test_nnx_unmerge_of_a_module_that_was_never_merged_is_an_error():
    model = jaxlora.lorafy(
        models.NnxModel(nnx.Rngs(0)), jaxlora.LoraConfig(rank=2), rngs=nnx.Rngs(1)
    )
    for _, var in nnx.iter_graph(model):
        if isinstance(var, jaxlora.LoraParam):
            var[...] = var[...] + 0.1
    with pytest.raises(ValueError, match=r"holds LoRA layers, so it was never merged"):
        jaxlora.unmerge(model, model)
    chex.assert_trees_all_close(
        nnx.state(jaxlora.unmerge(jaxlora.merge(model), model), nnx.Param),
        nnx.state(model, nnx.Param),
        atol=1e-5,
    )
