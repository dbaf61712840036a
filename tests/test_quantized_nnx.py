"""QLoRA on NNX: Flax's layers and a Tunix model (its own Einsum modules), base stored quantized."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from tests.support import tunix_zoo as zoo

pytestmark = pytest.mark.filterwarnings(zoo.PYTEST_WARNINGS)
X = jax.random.normal(jax.random.key(1), (4, 64))


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 128, rngs=rngs)
        self.down = nnx.Linear(128, 64, rngs=rngs)
        self.head = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.down(nnx.relu(self.up(x)))))


def _stored(module):
    """Every frozen array, codes and scales included, as numpy."""
    state = nnx.state(module, nnx.All(nnx.Param, nnx.Not(jaxlora.TrainableParam)))
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _train(module, loss, steps):
    opt = nnx.Optimizer(module, optax.adam(1e-2), wrt=jaxlora.TrainableParam)

    @nnx.jit
    def step(module, opt):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, jaxlora.TrainableParam))(
            module
        )
        opt.update(module, grads)
        return value

    return [float(step(module, opt)) for _ in range(steps)]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_flax_layers_adapted_or_not_read_a_quantized_base(fmt):
    cfg = jaxlora.LoraConfig(rank=4, targets=["up"], quantize=fmt, quantize_exclude=["head"])
    module = jaxlora.lorafy(_Mlp(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    assert isinstance(module.up.base.kernel.get_value(), jaxlora.QuantizedArray)
    assert isinstance(module.down, jaxlora.LoraModule)  # quantized, not adapted
    assert not isinstance(module.head.kernel.get_value(), jaxlora.QuantizedArray)
    assert f"base: 2 weights stored {fmt}" in str(jaxlora.summary(module))
    # identity at init: the adapted model is its dequantized base
    base = jaxlora.merge(module, dtype=jnp.float32)
    chex.assert_trees_all_close(module(X), base(X), atol=1e-6)
    stored = _stored(module)
    losses = _train(module, lambda m: jnp.mean((m(X) - 1.0) ** 2), 5)
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(_stored(module), stored)
    merged = jaxlora.merge(module)  # bfloat16 by default
    assert merged.up.kernel.dtype == jnp.bfloat16 and merged.down.kernel.dtype == jnp.bfloat16
    chex.assert_trees_all_close(
        merged(X.astype(jnp.bfloat16)).astype(jnp.float32), module(X), rtol=3e-2, atol=3e-2
    )
    with pytest.raises(ValueError, match="stored quantized"):
        jaxlora.unmerge(merged, module)


def test_tunix_llama3_on_an_nf4_base():
    z = zoo.build("llama3", embed_dim=64, hidden_dim=128, head_dim=64)
    cfg = jaxlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"], quantize="nf4")
    model = jaxlora.lorafy(z.module, cfg, *z.inputs, rngs=nnx.Rngs(1))
    report = str(jaxlora.summary(model))
    assert "stored nf4" in report, report
    chex.assert_trees_all_close(
        z.logits(model), z.logits(jaxlora.merge(model, dtype=jnp.float32)), atol=1e-5
    )
    stored = _stored(model)
    losses = _train(model, lambda m: zoo.next_token_loss(m, z.tokens), 4)
    assert losses[-1] < losses[0], losses
    chex.assert_trees_all_equal(_stored(model), stored)
