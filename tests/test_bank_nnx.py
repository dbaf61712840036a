"""Many adapters on one NNX module: `jaxlora.LoraBank`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from tests.support import models, tunix_zoo

IDS = jnp.arange(32).reshape(4, 8) % 32
CONFIGS = {
    "a": jaxlora.LoraConfig(rank=4, targets=["all-linear"], rank_pattern={"head": 2}),
    "b": jaxlora.LoraConfig(rank=2, alpha=5, targets=["head", "embed", "layers/0"]),
}


def _bank():
    bank = models.NnxModel(nnx.Rngs(0))
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        bank = jaxlora.lorafy(bank, cfg, IDS, rngs=nnx.Rngs(i + 1), name=name)
        for adapter in bank.adapters[name]:  # make each adapter do something
            adapter.lora_b[...] = adapter.lora_b[...] + 0.05 * (i + 1)
    return bank


def _alone(bank, name, x):
    return (bank.base if name is None else bank.merge(name))(x)


def test_add_list_remove_rename_and_errors():
    bank = _bank()
    assert bank.names == ("a", "b") and bank.index("b") == 2 and bank.index("__base__") == 0
    assert len(bank.adapters["b"]) == 3  # head, embed, layers/0
    with pytest.raises(ValueError, match="an adapter named 'a' is already in this bank"):
        bank.add("a", CONFIGS["a"], IDS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="leave modules_to_save, bias and dropout"):
        bank.add("c", jaxlora.LoraConfig(targets=["head"], dropout=0.1), IDS, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match=r"no adapter named 'z'; this bank holds \['a', 'b'\]"):
        bank.merge("z")
    bank.rename("a", "first")
    assert bank.names == ("first", "b")
    bank.remove("first")
    assert bank.names == ("b",) and bank.index("b") == 1
    chex.assert_trees_all_close(bank(IDS, adapter=1), _alone(bank, "b", IDS), atol=1e-5)


def test_switching_compiles_once_and_each_id_equals_its_merged_adapter():
    bank = _bank()
    graphdef, state = nnx.split(bank)
    forward = jax.jit(lambda state, x, i: nnx.merge(graphdef, state)(x, adapter=i))
    for i in [1, 0, 2, 2, 1, 0, 2, 0, 1, 1, 2]:
        name = None if i == 0 else bank.names[i - 1]
        chex.assert_trees_all_close(
            forward(state, IDS, i), _alone(bank, name, IDS), atol=1e-5, rtol=1e-5
        )
    assert forward._cache_size() == 1


def test_mixed_batch_rows_equal_each_adapter_alone_under_nnx_jit():
    bank = _bank()
    names = ["b", None, "a", "b"]
    got = nnx.jit(lambda bank, x, ids: bank(x, adapter=ids))(bank, IDS, bank.ids(names))
    for row, name in enumerate(names):
        want = _alone(bank, name, IDS)
        chex.assert_trees_all_close(
            jax.tree.map(lambda y, r=row: y[r], got),
            jax.tree.map(lambda y, r=row: y[r], want),
            atol=1e-5,
            rtol=1e-5,
        )


def _train(bank, names, rows, wrt):
    """One Adam step on ``rows`` of the batch, the loss summed over rows / the full batch."""
    target = jax.random.normal(jax.random.key(5), (IDS.shape[0], 8, 3))[rows]
    x, ids = IDS[rows], bank.ids(names[rows])

    def loss_fn(bank):
        return jnp.sum((bank(x, adapter=ids)[0] - target) ** 2) / len(names)

    @nnx.jit
    def step(bank, optimizer):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(bank)
        optimizer.update(bank, grads)

    step(bank, nnx.Optimizer(bank, optax.adam(1e-2), wrt=wrt))


def test_one_mixed_step_equals_the_per_adapter_steps():
    names = np.array(["a", "b", "b", "a"])
    mixed = _bank()
    _train(mixed, names, np.arange(len(names)), jaxlora.LoraParam)
    for name in ("a", "b"):
        alone = _bank()
        rows = np.flatnonzero(names == name)
        wrt = nnx.All(jaxlora.LoraParam, nnx.PathContains(name))
        _train(alone, names, rows, wrt)
        chex.assert_trees_all_close(
            nnx.state(alone.adapters[name]), nnx.state(mixed.adapters[name]), atol=1e-6
        )


@pytest.mark.filterwarnings(tunix_zoo.PYTEST_WARNINGS)
@pytest.mark.parametrize("family", ["llama3", "qwen3_moe", "gemma4_moe"])
def test_mixed_batches_on_tunix_models(family):
    built = tunix_zoo.build(family)
    bank = jaxlora.LoraBank(built.module)
    configs = {
        "a": jaxlora.LoraConfig(rank=2, targets=["all-linear"]),
        "b": jaxlora.LoraConfig(rank=4, targets=["re:.*(q_proj|v_proj|q_einsum).*"]),
    }
    for i, (name, cfg) in enumerate(configs.items()):
        bank.add(name, cfg, *built.inputs, rngs=nnx.Rngs(i), **built.kwargs)
        for adapter in bank.adapters[name]:
            adapter.lora_b[...] = adapter.lora_b[...] + 0.02
    names = ["b", "a"]
    if family == "gemma4_moe":  # its experts take tokens sorted over the whole batch
        with pytest.raises(ValueError, match=r"moe/.*sort runs along the batch rows"):
            bank(*built.inputs, adapter=bank.ids(names), **built.kwargs)
        return
    got = bank(*built.inputs, adapter=bank.ids(names), **built.kwargs)[0]
    for row, name in enumerate(names):
        want = bank.merge(name)(*built.inputs, **built.kwargs)[0]
        chex.assert_trees_all_close(got[row], want[row], atol=1e-5, rtol=1e-5)
