"""The frozen path: gradients, optimizer state and FLOPs of the adapters only."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from absl.testing import parameterized

import jaxlora
from tests.support import models
from tests.support.steps import compiled_dot_shapes, full_finetune_step

KEY = jax.random.key(0)


def _mlp_setup(targets="all-linear", width=256, batch=128):
    model = models.MLP(features=(width, width + 64, width // 2))
    x = jax.random.normal(KEY, (batch, width))
    y = jax.random.normal(jax.random.key(1), (batch, width // 2))
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=8, alpha=16, targets=targets)
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, x, key=KEY)
    return model, params, lora_model, lora_params, (x, y)


def _mse(apply):
    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((apply({"params": params}, x) - y) ** 2)

    return loss_fn


def _flops(jitted, *args):
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


def test_lora_step_flops_are_at_most_072_of_full_finetuning():
    model, params, lora_model, lora_params, batch = _mlp_setup()
    tx = jaxlora.optimizer(optax.adamw(1e-3), lora_params)
    lora_step = jaxlora.make_train_step(_mse(lora_model.apply), tx, donate=False)
    full_tx = optax.adamw(1e-3)
    full_step = full_finetune_step(_mse(model.apply), full_tx)
    lora = _flops(lora_step, lora_params, tx.init(lora_params), batch)
    full = _flops(full_step, params, full_tx.init(params), batch)
    assert lora / full <= 0.72, (lora, full)


def _lm_loss(apply):
    def loss_fn(p, ids):
        logits = apply({"params": p}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()

    return loss_fn


def _lm_setup(batch, seq, rank, **dims):
    model = models.TinyLM(**dims, heads=4, layers=2)
    ids = jnp.zeros((batch, seq), jnp.int32)
    params = model.init(KEY, ids)["params"]
    cfg = jaxlora.LoraConfig(rank=rank, alpha=16, targets="all-linear")
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, ids, key=KEY)
    return model, params, lora_model, lora_params, ids


def test_transformer_lora_step_flops_ratio():
    model, params, lora_model, lora_params, ids = _lm_setup(8, 64, 8, vocab=256, d_model=256)
    tx = jaxlora.optimizer(optax.adamw(1e-3), lora_params)
    lora_step = jaxlora.make_train_step(_lm_loss(lora_model.apply), tx, donate=False)
    full_tx = optax.adamw(1e-3)
    lora = _flops(lora_step, lora_params, tx.init(lora_params), ids)
    full_step = full_finetune_step(_lm_loss(model.apply), full_tx)
    full = _flops(full_step, params, full_tx.init(params), ids)
    assert lora / full <= 0.72, (lora, full)


def _frozen_weight_shapes(params):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {tuple(x.shape) for path, x in leaves if x.ndim == 2 and "lora" not in str(path)}


def _weight_gradient_dots(jitted, params, *args):
    return compiled_dot_shapes(jitted, *args) & _frozen_weight_shapes(params)


def _arch_setup(arch):
    if arch == "mlp":
        model, params, lora_model, lora_params, batch = _mlp_setup(width=96, batch=40)
        return model, params, lora_model, lora_params, batch, _mse
    return (*_lm_setup(2, 8, 4, vocab=80, d_model=48), _lm_loss)


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_no_weight_gradient_dot_in_the_compiled_step(arch):
    """A dot producing a frozen weight's shape would be dW = xᵀ·g: it must not exist."""
    model, params, lora_model, lora_params, batch, make_loss = _arch_setup(arch)
    tx = jaxlora.optimizer(optax.adam(1e-3), lora_params)
    step = jaxlora.make_train_step(make_loss(lora_model.apply), tx, donate=False)
    assert not _weight_gradient_dots(step, params, lora_params, tx.init(lora_params), batch)
    # the detector does see the weight gradients of full fine-tuning
    full_tx = optax.adam(1e-3)
    full_step = full_finetune_step(make_loss(model.apply), full_tx)
    assert _weight_gradient_dots(full_step, params, params, full_tx.init(params), batch)


def test_optimizer_state_is_two_floats_per_trainable_param():
    _, params, _, lora_params, _ = _mlp_setup()
    tx = jaxlora.optimizer(optax.adam(1e-3), lora_params)
    state = tx.init(lora_params)
    trainable = jaxlora.summary(lora_params).trainable_params
    floats = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    counts = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert floats == 2 * trainable
    assert [c.size for c in counts] == [1]
    # rank 8 on the three Dense layers 256 -> 256 -> 320 -> 128: r * (fan_in + fan_out) each
    assert trainable == 8 * ((256 + 256) + (256 + 320) + (320 + 128))
    assert sum(x.size for x in jax.tree.leaves(params)) == 256 * 257 + 257 * 320 + 321 * 128


class TrainStepTest(chex.TestCase):
    @parameterized.parameters(True, False)
    def test_frozen_leaves_untouched_and_loss_falls(self, jit):
        _, params, lora_model, lora_params, batch = _mlp_setup(width=64, batch=32)
        frozen_before = jax.tree.map(jnp.copy, jaxlora.split(lora_params)[1])
        tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
        step = jaxlora.make_train_step(_mse(lora_model.apply), tx)
        opt_state = tx.init(lora_params)
        losses = []
        with contextlib.nullcontext() if jit else jax.disable_jit():
            for _ in range(5):
                lora_params, opt_state, loss = step(lora_params, opt_state, batch)
                losses.append(float(loss))
        assert losses[-1] < losses[0]
        chex.assert_trees_all_equal(jaxlora.split(lora_params)[1], frozen_before)
        # the base arrays are neither donated nor copied: the caller's params stay usable
        assert params["dense_0"]["kernel"] is lora_params["dense_0"]["kernel"]
        assert not params["dense_0"]["kernel"].is_deleted()
        assert lora_params["dense_0"]["lora"].b.any()

    @chex.variants(with_jit=True, without_jit=True)
    def test_full_tree_gradients_never_move_frozen_leaves(self):
        """jaxlora.optimizer on whole-tree gradients zeroes the frozen updates."""
        _, _, lora_model, lora_params, batch = _mlp_setup(width=64, batch=32)
        tx = jaxlora.optimizer(optax.sgd(0.1), lora_params)
        grads = jax.grad(_mse(lora_model.apply))(lora_params, batch)
        updates, _ = self.variant(tx.update)(grads, tx.init(lora_params), lora_params)
        _, frozen_updates = jaxlora.split(updates)
        assert not any(u.any() for u in jax.tree.leaves(frozen_updates))


def test_donated_step_and_has_aux():
    _, _, lora_model, lora_params, batch = _mlp_setup(width=64, batch=32)

    def loss_fn(params, batch):
        loss = _mse(lora_model.apply)(params, batch)
        return loss, {"loss_x2": 2 * loss}

    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(loss_fn, tx, has_aux=True)
    params, opt_state, (loss, aux) = step(lora_params, tx.init(lora_params), batch)
    assert float(aux["loss_x2"]) == pytest.approx(2 * float(loss))
    _, _, (second, aux) = step(params, opt_state, batch)
    assert float(second) < float(loss)  # the first step trained the adapters
    assert float(aux["loss_x2"]) == pytest.approx(2 * float(second))


def test_one_step_serves_trees_with_different_trainable_leaves():
    """The step caches the trainable mask per tree structure, never across structures."""
    model, params, _, _, batch = _mlp_setup(width=64, batch=32)
    step = None
    for bias in ("none", "lora_only", "none"):
        cfg = jaxlora.LoraConfig(rank=4, targets="all-linear", bias=bias)
        lora_model, lora_params = jaxlora.lorafy(model, params, cfg, batch[0], key=KEY)
        tx = optax.sgd(0.1)  # acts on the trainable part only, whatever its structure
        step = step or jaxlora.make_train_step(_mse(lora_model.apply), tx, donate=False)
        new_params, _, _ = step(lora_params, tx.init(jaxlora.split(lora_params)[0]), batch)
        old_bias = jaxlora.split(lora_params)[bias == "none"]["dense_0"]["bias"]
        new_bias = jaxlora.split(new_params)[bias == "none"]["dense_0"]["bias"]
        moved = not jnp.array_equal(jax.tree.leaves(old_bias)[0], jax.tree.leaves(new_bias)[0])
        assert moved == (bias == "lora_only")
        assert jax.tree.structure(new_params) == jax.tree.structure(lora_params)


def test_traced_mask_is_a_clear_error():
    _, _, _, lora_params, _ = _mlp_setup(width=64, batch=8)
    mask = jax.tree.map(lambda m: jnp.asarray(m), jaxlora.trainable_mask(lora_params))
    with pytest.raises(TypeError, match=r"not a Python bool: masks must be static"):
        jaxlora.split(lora_params, mask)
    with pytest.raises(TypeError, match=r"masks must be static"):
        jaxlora.optimizer(optax.adam(1e-3), lora_params, mask)


def test_split_combine_round_trip():
    _, _, _, lora_params, _ = _mlp_setup(width=64, batch=8)
    trainable, frozen = jaxlora.split(lora_params)
    assert jax.tree.leaves(trainable) and jax.tree.leaves(frozen)
    chex.assert_trees_all_equal(jaxlora.combine(trainable, frozen), lora_params)
