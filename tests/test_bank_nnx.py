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


WHOLE = {  # "saved" trains head whole (and layers/0's bias), "plain" puts LoRA on head
    "saved": jaxlora.LoraConfig(
        rank=2, targets=["layers/0"], modules_to_save=["head"], bias="lora_only"
    ),
    "plain": jaxlora.LoraConfig(rank=2, targets=["head"]),
}


def _whole_bank(model=None):
    bank = model or models.NnxModel(nnx.Rngs(0))
    for i, (name, cfg) in enumerate(WHOLE.items()):
        bank = jaxlora.lorafy(bank, cfg, IDS, rngs=nnx.Rngs(i + 1), name=name)
        for adapter in bank.adapters[name]:
            adapter.lora_b[...] = adapter.lora_b[...] + 0.05 * (i + 1)
        for leaf in bank.leaves[name]:
            leaf[...] = leaf[...] + 0.1
    return bank


def test_modules_to_save_and_biases_per_adapter_one_id_at_a_time():
    bank = _whole_bank()
    base = nnx.clone(bank.base)
    assert len(bank.leaves["saved"]) == 3 and len(bank.leaves["plain"]) == 0  # head/*, bias
    forward = nnx.jit(lambda bank, x, i: bank(x, adapter=i))
    for i, name in enumerate([None, "saved", "plain", "saved"]):
        i = bank.index(name) if name else 0
        chex.assert_trees_all_close(
            forward(bank, IDS, i), _alone(bank, name, IDS), atol=1e-5, rtol=1e-5
        )
    chex.assert_trees_all_equal(nnx.state(bank.base), nnx.state(base))  # the base keeps its own
    with pytest.raises(ValueError, match=r"cannot use adapters that train whole leaves .*'head"):
        bank(IDS, adapter=bank.ids(["saved", "plain", None, "saved"]))
    # training "saved" on its id moves its factors and its own leaves, nothing else
    wrt = nnx.All(jaxlora.TrainableParam, nnx.PathContains("saved"))
    before = nnx.clone(bank)

    @nnx.jit
    def step(bank, optimizer):
        def loss_fn(bank):
            return jnp.mean(bank(IDS, adapter=1)[0] ** 2)

        optimizer.update(bank, nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(bank))

    step(bank, nnx.Optimizer(bank, optax.sgd(0.5), wrt=wrt))
    for held in ("adapters", "leaves"):
        moved = jax.tree.map(
            lambda x, y: bool(jnp.any(x != y)),
            nnx.state(getattr(bank, held)["saved"]),
            nnx.state(getattr(before, held)["saved"]),
        )
        assert all(jax.tree.leaves(moved))
    chex.assert_trees_all_equal(
        nnx.state(bank.adapters["plain"]), nnx.state(before.adapters["plain"])
    )
    chex.assert_trees_all_equal(nnx.state(bank.base), nnx.state(base))


def test_lora_dropout_per_adapter_row_by_row():
    bank = models.NnxModel(nnx.Rngs(0))
    configs = {
        "wet": jaxlora.LoraConfig(rank=2, targets=["all-linear"], dropout=0.5),
        "dry": jaxlora.LoraConfig(rank=2, targets=["all-linear"]),
    }
    for i, (name, cfg) in enumerate(configs.items()):
        bank = jaxlora.lorafy(bank, cfg, IDS, rngs=nnx.Rngs(params=i, dropout=3), name=name)
        for adapter in bank.adapters[name]:
            adapter.lora_b[...] = adapter.lora_b[...] + 0.05
    ids = bank.ids(["wet", "dry", "wet", "dry"])
    dropped = bank(IDS, adapter=ids)[0]  # train mode (the default): LoRA dropout is on
    again = bank(IDS, adapter=ids)[0]  # a fresh dropout key each call
    bank.eval()
    plain = bank(IDS, adapter=ids)[0]
    chex.assert_trees_all_close(dropped[1::2], plain[1::2], atol=1e-6)
    assert float(jnp.abs(dropped[0::2] - plain[0::2]).max()) > 1e-3
    assert float(jnp.abs(dropped[0::2] - again[0::2]).max()) > 1e-3
    chex.assert_trees_all_close(plain[0], bank.merge("wet")(IDS)[0][0], atol=1e-5, rtol=1e-5)
    bank.train()
    with pytest.raises(ValueError, match="must share one dropout rate"):
        bank(IDS, adapter=1)


def _params(module):
    return nnx.state(module, nnx.Param)


def test_files_combination_and_summary_reuse_linens(tmp_path):
    bank = _whole_bank()
    bank.add("c", CONFIGS["b"], IDS, rngs=nnx.Rngs(7))
    for adapter in bank.adapters["c"]:
        adapter.lora_b[...] = adapter.lora_b[...] - 0.03
    jaxlora.save_bank(tmp_path / "bank", bank)
    fresh = jaxlora.LoraBank(nnx.clone(bank.base))
    assert jaxlora.load_bank(tmp_path / "bank", fresh) is fresh
    assert fresh.names == bank.names and len(fresh.leaves["saved"]) == 3
    for i in range(len(bank.names) + 1):
        chex.assert_trees_all_close(fresh(IDS, adapter=i), bank(IDS, adapter=i), atol=1e-6)
    assert [fresh.config(n) for n in fresh.names] == [bank.config(n) for n in bank.names]
    with pytest.raises(ValueError, match="load_bank: adapter 'saved'"):
        jaxlora.load_bank(tmp_path / "bank", jaxlora.LoraBank(models.NnxModel(nnx.Rngs(9))))
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="an NNX LoraBank loads directories written by jaxlora"):
        jaxlora.load_bank(tmp_path / "peft", fresh)
    # combining: "cat" is exactly the weighted sum of the updates, "svd" at full rank too
    with pytest.raises(ValueError, match="'saved' trains whole modules"):
        jaxlora.add_weighted_adapter(bank, ["saved", "c"], [1, 1], "x", "cat")
    base, plain, c = (_params(m) for m in (bank.base, bank.merge("plain"), bank.merge("c")))
    want = jax.tree.map(lambda w, x, y: w + 0.7 * (x - w) - 0.4 * (y - w), base, plain, c)
    for how, rank in (("cat", None), ("svd", 4)):
        assert (
            jaxlora.add_weighted_adapter(bank, ["plain", "c"], [0.7, -0.4], how, how, rank) is bank
        )
        chex.assert_trees_all_close(_params(bank.merge(how)), want, atol=1e-5)
    assert bank.config("cat").rank == 4 and bank.names[-2:] == ("cat", "svd")
    with pytest.raises(ValueError, match="adapters 'plain' and 'c' differ in their layers"):
        jaxlora.add_weighted_adapter(bank, ["plain", "c"], [1, 1], "lin", "linear")
    assert "lin" not in bank.names
    report = jaxlora.summary(bank)
    rows = {(layer.adapter, layer.path) for layer in report.layers}
    assert ("saved", "layers/0") in rows and ("plain", "head") in rows and ("cat", "head") in rows
    assert len(rows) == sum(len(bank.adapters[n]) for n in bank.names)
    own = nnx.state(bank, jaxlora.TrainableParam)
    assert report.trainable_params == sum(x.size for x in jax.tree.leaves(own))


@pytest.mark.filterwarnings(tunix_zoo.PYTEST_WARNINGS)
def test_tunix_bank_with_dropout_whole_leaves_files_and_combination(tmp_path):
    built = tunix_zoo.build("llama3")
    configs = {
        "a": jaxlora.LoraConfig(rank=2, targets=["all-linear"], dropout=0.1),
        "b": jaxlora.LoraConfig(
            rank=4, targets=["re:.*(q_proj|v_proj).*"], modules_to_save=["final_norm"]
        ),
    }
    bank = jaxlora.LoraBank(built.module)
    for i, (name, cfg) in enumerate(configs.items()):
        bank.add(name, cfg, *built.inputs, rngs=nnx.Rngs(i), **built.kwargs)
        for adapter in bank.adapters[name]:
            adapter.lora_b[...] = adapter.lora_b[...] + 0.02
    bank.leaves["b"][0][...] = bank.leaves["b"][0][...] * 1.5  # final_norm's scale
    bank.eval()
    for name in bank.names:
        got = bank(*built.inputs, adapter=bank.index(name), **built.kwargs)[0]
        want = bank.merge(name)(*built.inputs, **built.kwargs)[0]
        chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    jaxlora.save_bank(tmp_path / "bank", bank)
    fresh = jaxlora.load_bank(tmp_path / "bank", jaxlora.LoraBank(nnx.clone(bank.base)))
    fresh.eval()
    for i in (1, 2):
        chex.assert_trees_all_close(
            fresh(*built.inputs, adapter=i, **built.kwargs)[0],
            bank(*built.inputs, adapter=i, **built.kwargs)[0],
            atol=1e-6,
        )
    jaxlora.add_weighted_adapter(bank, ["a"], [0.5], "half", "cat")
    base, full = _params(bank.base), _params(bank.merge("a"))
    want = jax.tree.map(lambda w, x: w + 0.5 * (x - w), base, full)
    chex.assert_trees_all_close(_params(bank.merge("half")), want, atol=1e-5)
