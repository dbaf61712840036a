"""jaxlora never relies on implicit dtype promotion (bf16 base, f32 adapters)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import jaxlora
from tests.support import models

KEY = jax.random.key(0)


class _Bf16Model(nn.Module):
    """Every adaptable linen layer kind, computing in bfloat16."""

    @nn.compact
    def __call__(self, ids, deterministic: bool = True):
        kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}
        embed = nn.Embed(16, 8, name="embed", **kw)
        x = nn.Dense(8, **kw)(embed(ids))
        x = nn.DenseGeneral((2, 4), **kw)(x)
        x = nn.Einsum((2, 4, 8), "btnh,nhd->btd", **kw)(x)
        return embed.attend(x)


def test_linen_path_is_strict_clean():
    model = _Bf16Model()
    ids = jnp.zeros((2, 8), jnp.int32)
    params = model.init(KEY, ids)["params"]
    with jax.numpy_dtype_promotion("strict"):
        cfg = jaxlora.LoraConfig(rank=2, targets=["all-linear", "embed"], dropout=0.1)
        lora_model, lp = jaxlora.lorafy(model, params, cfg, ids, key=KEY)
        trainable, frozen = jaxlora.split(lp)
        lp = jaxlora.combine(
            jax.tree.map(lambda x: x + jnp.asarray(0.1, x.dtype), trainable), frozen
        )
        out = lora_model.apply({"params": lp}, ids, deterministic=False, rngs={"dropout": KEY})
        merged = jax.jit(jaxlora.merge)(lp)
        unmerged = jaxlora.unmerge(merged, lp)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 16)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.tree.structure(unmerged) == jax.tree.structure(lp)


def test_nnx_path_is_strict_clean():
    with jax.numpy_dtype_promotion("strict"):
        model = models.NnxModel(nnx.Rngs(0))
        cfg = jaxlora.LoraConfig(rank=2, targets=["all-linear", "embed"], dropout=0.1)
        jaxlora.lorafy(model, cfg, rngs=nnx.Rngs(1))
        out = model(jnp.zeros((2, 4), jnp.int32))
        merged = jaxlora.merge(model)
        unmerged = jaxlora.unmerge(merged, model)
    assert all(jnp.isfinite(x).all() for x in jax.tree.leaves(out))
    assert not jaxlora.summary(merged).layers  # merged: plain layers, no adapter left
    assert len(jaxlora.summary(unmerged).layers) == len(jaxlora.summary(model).layers) > 0


def test_quantized_base_is_strict_clean():
    model = _Bf16Model()
    ids = jnp.zeros((2, 8), jnp.int32)
    params = model.init(KEY, ids)["params"]
    with jax.numpy_dtype_promotion("strict"):
        cfg = jaxlora.LoraConfig(rank=2, targets=["all-linear"], quantize="int8")
        lora_model, lp = jaxlora.lorafy(model, params, cfg, ids, key=KEY)
        out = jax.jit(lora_model.apply)({"params": lp}, ids)
        merged = jaxlora.merge(lp)
        nf4 = jaxlora.quantize(jnp.ones((64, 8), jnp.bfloat16), "nf4", (0,))
        dense = jaxlora.dequantize(nf4)
    assert out.dtype == jnp.bfloat16 and dense.dtype == jnp.bfloat16
    assert merged["Dense_0"]["kernel"].dtype == jnp.bfloat16
