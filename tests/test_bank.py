"""Many adapters on one base (linen): names, switching without recompiling, mixed batches."""

import re
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import jaxlora
from tests.support import models

KEY = jax.random.key(0)
IDS = jnp.arange(32, dtype=jnp.int32).reshape(4, 8) % 64
CONFIGS = {
    "a": jaxlora.LoraConfig(rank=4, targets=["all-linear"]),
    "b": jaxlora.LoraConfig(rank=2, alpha=3, targets=["query", "up", "embed"]),
    "c": jaxlora.LoraConfig(rank=4, alpha=8, targets=["value", "down"], rank_pattern={"down": 1}),
}


def _shift(bank, name, value):
    """A bank whose adapter ``name`` has every array shifted, so it does something."""
    adapters = dict(bank.adapters)
    adapters[name] = jax.tree.map(lambda x: x + jnp.asarray(value, x.dtype), adapters[name])
    return jaxlora.AdapterBank(bank.base, adapters, {n: bank.config(n) for n in bank.names})


def _bank(model, params, x, configs=CONFIGS):
    bank = params
    for i, (name, cfg) in enumerate(configs.items()):
        bank_model, bank = jaxlora.lorafy(model, bank, cfg, x, key=jax.random.key(i), name=name)
        bank = _shift(bank, name, 0.03 * (i + 1))
    return bank_model, bank


@pytest.fixture(scope="module")
def tiny():
    model = models.TinyLM()
    params = model.init(KEY, IDS)["params"]
    bank_model, bank = _bank(model, params, IDS)
    return model, params, bank_model, bank


def _alone(model, bank, name, x):
    """The output of adapter ``name`` alone, through the single-adapter API."""
    if name is None:
        return model.apply({"params": bank.base}, x)
    return jaxlora.LoraModel(model, bank.config(name)).apply({"params": bank.select(name)}, x)


def test_names_list_select_remove_rename_and_bytes(tiny):
    model, params, _, bank = tiny
    assert bank.names == ("a", "b", "c")
    assert [bank.index(n) for n in (jaxlora.AdapterBank.BASE, "a", "b", "c")] == [0, 1, 2, 3]
    # the base is held once (the very arrays given), each adapter adds its own bytes only
    pairs = zip(jax.tree.leaves(bank.base), jax.tree.leaves(params), strict=True)
    assert all(x is y for x, y in pairs)
    sizes = bank.nbytes()
    assert sizes["base"] == sum(x.nbytes for x in jax.tree.leaves(params))
    for name in bank.names:
        factors = jax.tree.leaves(jaxlora.split(bank.select(name))[0])
        assert sizes[name] == sum(x.nbytes for x in factors)
    assert sum(x.nbytes for x in jax.tree.leaves(bank)) == sum(sizes.values())
    renamed = bank.rename("b", "sentiment")
    assert renamed.names == ("a", "sentiment", "c")
    chex.assert_trees_all_equal(renamed.select("sentiment"), bank.select("b"))
    assert bank.remove("a").names == ("b", "c") and bank.remove("a").index("c") == 2
    # select gives the single-adapter tree lorafy makes with the same config and key
    _, single = jaxlora.lorafy(model, params, CONFIGS["c"], IDS, key=jax.random.key(2))
    chex.assert_trees_all_equal_structs(single, bank.select("c"))
    summary = jaxlora.summary(bank.select("b"))
    assert {layer.path for layer in summary.layers} == {
        "embed",
        "block_0/attn/query",
        "block_1/attn/query",
        "block_0/up",
        "block_1/up",
    }


@pytest.mark.parametrize("jit", [False, True])
def test_one_adapter_by_name_or_id_equals_that_adapter_alone(tiny, jit):
    model, _, bank_model, bank = tiny

    def run(bank, x, adapter):
        return bank_model.apply({"params": bank}, x, adapter=adapter)

    run = jax.jit(run) if jit else run
    for name in (None, "a", "b", "c"):
        want = _alone(model, bank, name, IDS)
        got = run(bank, IDS, bank.index(name or jaxlora.AdapterBank.BASE))
        chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
        bank_model.apply({"params": bank}, IDS, adapter="b"),
        _alone(model, bank, "b", IDS),
        atol=1e-5,
        rtol=1e-5,
    )


def test_switching_adapters_compiles_once_per_structure(tiny):
    model, _, bank_model, bank = tiny
    forward = jax.jit(lambda bank, x, i: bank_model.apply({"params": bank}, x, adapter=i))
    order = [1, 0, 3, 2, 2, 0, 1, 3, 0, 2, 1]  # ten switches among three adapters and the base
    outs = [forward(bank, IDS, i) for i in order]
    assert forward._cache_size() == 1
    for i, y in zip(order, outs, strict=True):
        name = None if i == 0 else bank.names[i - 1]
        chex.assert_trees_all_close(y, _alone(model, bank, name, IDS), atol=1e-5, rtol=1e-5)
    # through the single-adapter API: adapters of one structure share a compilation, the
    # base model (another structure) gets its own
    same = _shift(bank.rename("a", "a2"), "a2", 0.1)
    trees = [bank.select("a"), same.select("a2"), bank.base]
    lora_model = jaxlora.LoraModel(model, CONFIGS["a"])
    single = jax.jit(lambda p, x: lora_model.apply({"params": p}, x))
    for tree in [*trees, *trees, trees[0]]:
        single(tree, IDS)
    assert single._cache_size() == 2


@pytest.mark.parametrize("jit", [False, True])
def test_mixed_batch_rows_equal_each_adapter_alone(tiny, jit):
    model, _, bank_model, bank = tiny
    names = ["c", None, "a", "b"]

    def run(bank, x, ids):
        return bank_model.apply({"params": bank}, x, adapter=ids)

    run = jax.jit(run) if jit else run
    got = run(bank, IDS, bank.ids(names))
    for row, name in enumerate(names):
        want = _alone(model, bank, name, IDS)[row]
        chex.assert_trees_all_close(got[row], want, atol=1e-5, rtol=1e-5)


def test_mixed_batch_through_nn_scan_and_remat():
    model = models.ScannedLM()
    params = model.init(KEY, IDS)["params"]
    configs = {
        "x": jaxlora.LoraConfig(rank=4, targets=["all-linear"]),
        "y": jaxlora.LoraConfig(rank=2, targets=["query", "head", "embed"]),
    }
    bank_model, bank = _bank(model, params, IDS, configs)
    names = ["y", "x", None, "x"]
    got = jax.jit(lambda b, x, i: bank_model.apply({"params": b}, x, adapter=i))(
        bank, IDS, bank.ids(names)
    )
    for row, name in enumerate(names):
        want = _alone(model, bank, name, IDS)[row]
        chex.assert_trees_all_close(got[row], want, atol=1e-5, rtol=1e-5)


def _row_losses(bank_model, bank, x, y, ids):
    out = bank_model.apply({"params": bank}, x, adapter=ids)
    return jnp.sum((out - y) ** 2, axis=tuple(range(1, out.ndim)))


HEADS = {  # adapters that train whole leaves: a head of their own (modules_to_save), biases
    "head": jaxlora.LoraConfig(rank=4, targets=["dense_0"], modules_to_save=["dense_2"]),
    "plain": jaxlora.LoraConfig(rank=2, targets=["dense_1"], bias="lora_only"),
}


@pytest.fixture(scope="module")
def heads():
    model = models.MLP()
    x = jax.random.normal(KEY, (4, 16))
    params = model.init(KEY, x)["params"]
    bank_model, bank = _bank(model, params, x, HEADS)
    return model, bank_model, bank, x


@pytest.mark.parametrize("setup", ["lora", "whole_leaves"])
def test_one_mixed_step_equals_the_per_adapter_steps(tiny, heads, setup):
    if setup == "lora":
        _, _, bank_model, bank = tiny
        bank, x, names = bank.remove("c"), IDS, ["a", "b", "b", "a"]
    else:
        _, bank_model, bank, x = heads
        names = ["head", "plain", "plain", "head"]
    ids = bank.ids(names)
    target = jax.random.normal(
        jax.random.key(7), bank_model.model.apply({"params": bank.base}, x).shape
    )
    n = len(names)

    def loss_fn(bank, batch):
        x, y, ids = batch
        return jnp.sum(_row_losses(bank_model, bank, x, y, ids)) / n

    tx = jaxlora.optimizer(optax.adam(1e-2), bank)
    step = jaxlora.make_train_step(loss_fn, tx, donate=False)
    mixed, _, mixed_loss = step(bank, tx.init(bank), (x, target, ids))

    total = 0.0
    for name in bank.names:
        rows = np.flatnonzero(np.asarray(names) == name)
        only = bank.train_only(name)
        tx_one = jaxlora.optimizer(optax.adam(1e-2), only)
        step_one = jaxlora.make_train_step(loss_fn, tx_one, donate=False)
        batch = (x[rows], target[rows], ids[rows])
        trained, _, loss = step_one(only, tx_one.init(only), batch)
        total += float(loss)
        chex.assert_trees_all_close(trained.adapters[name], mixed.adapters[name], atol=1e-6)
        (other,) = set(bank.names) - {name}  # frozen: bit-identical
        chex.assert_trees_all_equal(trained.adapters[other], bank.adapters[other])
    np.testing.assert_allclose(float(mixed_loss), total, rtol=1e-6)
    if setup == "whole_leaves":  # the head and the biases moved, the base's stayed
        moved = jax.tree.map(lambda a, b: not np.allclose(a, b), mixed.adapters, bank.adapters)
        assert all(jax.tree.leaves(moved))
        chex.assert_trees_all_equal(mixed.base, bank.base)


def test_lora_dropout_per_adapter_in_a_mixed_batch(tiny):
    model, params, _, _ = tiny
    configs = {
        "wet": jaxlora.LoraConfig(rank=4, targets=["all-linear"], dropout=0.5),
        "dry": jaxlora.LoraConfig(rank=4, targets=["all-linear"]),
    }
    bank_model, bank = _bank(model, params, IDS, configs)
    ids = bank.ids(["wet", "dry", "wet", "dry"])
    plain = bank_model.apply({"params": bank}, IDS, adapter=ids)
    rngs = {"dropout": jax.random.key(3)}
    dropped = bank_model.apply({"params": bank}, IDS, adapter=ids, rngs=rngs)
    chex.assert_trees_all_close(dropped[1::2], plain[1::2], atol=1e-6)
    assert float(jnp.abs(dropped[0::2] - plain[0::2]).max()) > 1e-3


def test_merge_folds_the_named_adapters(tiny):
    model, _, _, bank = tiny
    merged = jaxlora.merge(bank, adapters="b")
    chex.assert_trees_all_close(
        model.apply({"params": merged}, IDS), _alone(model, bank, "b", IDS), atol=1e-5
    )
    # folding a and c adds both updates to the base weights
    both = jaxlora.merge(bank, adapters=["a", "c"])
    delta_a = jax.tree.map(lambda m, b: m - b, jaxlora.merge(bank, adapters="a"), bank.base)
    delta_c = jax.tree.map(lambda m, b: m - b, jaxlora.merge(bank, adapters="c"), bank.base)
    chex.assert_trees_all_close(
        both, jax.tree.map(lambda b, x, y: b + x + y, bank.base, delta_a, delta_c), atol=1e-6
    )


def test_errors_name_the_adapter_and_the_fix(tiny):
    model, params, bank_model, bank = tiny
    with pytest.raises(KeyError, match=r"no adapter named 'z'; this bank holds \['a', 'b', 'c'\]"):
        bank.select("z")
    with pytest.raises(ValueError, match="an adapter named 'a' is already in this bank"):
        jaxlora.lorafy(model, bank, CONFIGS["a"], IDS, key=KEY, name="a")
    other = jax.tree.map(lambda x: x + 1.0, params)
    _, elsewhere = jaxlora.lorafy(model, other, CONFIGS["a"], IDS, key=KEY)
    with pytest.raises(ValueError, match="adapter 'd' was made on another base"):
        bank.add("d", elsewhere, CONFIGS["a"])
    with pytest.raises(TypeError, match=r"got float32 of shape \(4,\)"):
        bank_model.apply({"params": bank}, IDS, adapter=jnp.zeros(4))
    with pytest.raises(TypeError, match=r"of shape \(2, 2\)"):
        bank_model.apply({"params": bank}, IDS, adapter=np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match=r"out of range at rows \[1, 3\] \(values \[4, -1\]\)"):
        bank_model.apply({"params": bank}, IDS, adapter=np.array([0, 4, 1, -1]))


def test_traced_ids_out_of_range_never_pick_another_adapter(tiny):
    _, _, bank_model, bank = tiny

    def run(bank, ids, check_ids=False):
        return bank_model.apply({"params": bank}, IDS, adapter=ids, check_ids=check_ids)

    out = jax.jit(run)(bank, jnp.array([1, 9, 2, -1]))
    assert bool(jnp.isfinite(out[0::2]).all()) and bool(jnp.isnan(out[1::2]).all())
    checked = jax.jit(checkify.checkify(lambda b, i: run(b, i, check_ids=True)))
    err, _ = checked(bank, jnp.array([1, 9, 2, 0]))
    with pytest.raises(checkify.JaxRuntimeError, match=r"adapter ids must lie in \[0, 3\]"):
        err.throw()
    err, _ = checked(bank, jnp.array([1, 3, 2, 0]))
    err.throw()


class SortedTokens(nn.Module):
    """A mixture-of-experts-like layer that sorts all tokens of the batch together."""

    @nn.compact
    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        order = jnp.argsort(flat[:, 0])
        y = nn.Dense(8, name="expert")(flat[order])
        return jnp.zeros_like(y).at[order].set(y).reshape(*x.shape[:-1], 8)


def test_a_use_that_mixes_rows_is_refused_by_name():
    model = SortedTokens()
    x = jax.random.normal(KEY, (4, 3, 8))
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["expert"])
    bank_model, bank = jaxlora.lorafy(model, params, cfg, x, key=KEY, name="e")
    bank_model.apply({"params": bank}, x, adapter=1)  # one adapter: fine
    refusal = r"weight 'params/expert/kernel': the batch rows cannot be followed .*\(sort runs"
    with pytest.raises(ValueError, match=refusal):
        bank_model.apply({"params": bank}, x, adapter=np.array([1, 0, 1, 0]))


def test_mixed_batch_sharded_over_data_matches_one_device(tiny):
    _, _, bank_model, bank = tiny
    mesh = jaxlora.parse_mesh("data=4,model=2")
    ids = bank.ids(["a", "b", "c", None])
    want = bank_model.apply({"params": bank}, IDS, adapter=ids)
    x, ids_sharded = jaxlora.shard_batch((np.asarray(IDS), ids), mesh, process_local=False)
    run = jax.jit(lambda b, x, i: bank_model.apply({"params": b}, x, adapter=i))
    got = run(bank, x, ids_sharded)
    assert got.sharding.spec[0] == "data"
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_readme_bank_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Many adapters on one base", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", section, re.S).group(1)
    scope = {"__name__": "readme"}
    exec(compile(code, "README.md bank example", "exec"), scope)
    printed = capsys.readouterr().out.strip()
    assert printed == code.split("print(bank.names, bank.nbytes())  # ", 1)[1].splitlines()[0]
    chex.assert_trees_all_close(
        scope["y_mix"][1], scope["y_b"][1], atol=1e-6
    )  # row 1 uses adapter b
    chex.assert_trees_all_equal(scope["y_mix"][2], scope["y_base"][2])


def test_summary_lists_the_adapters_of_each_layer(tiny):
    _, _, _, bank = tiny
    report = jaxlora.summary(bank.train_only("b"))
    rows = [(layer.path, layer.adapter, layer.rank) for layer in report.layers]
    first = rows.index(("block_0/attn/query", "a", 4))
    assert rows[first + 1] == ("block_0/attn/query", "b", 2)  # grouped by layer
    assert ("embed", "b", 2) in rows
    assert ("block_1/down", "c", 1) in rows
    assert report.trainable_params == sum(x.size for x in jax.tree.leaves(bank.adapters["b"]))
    assert report.total_params == sum(x.size for x in jax.tree.leaves(bank))
    lines = str(report).splitlines()
    assert lines[0].split()[:2] == ["adapter", "layer"]
    assert lines[1].split()[:3] == ["a", "block_*/attn/query", "2"]
    assert lines[2].split()[:3] == ["b", "block_*/attn/query", "2"]


def test_adapters_made_with_the_same_head_train_with_donated_buffers(heads):
    model, _, bank, x = heads
    bank_model = None
    for i, name in enumerate(("h", "g")):
        bank_model, bank = jaxlora.lorafy(
            model, bank.base if i == 0 else bank, HEADS["head"], x, key=KEY, name=name
        )

    def loss_fn(bank, batch):
        return jnp.mean(_row_losses(bank_model, bank, *batch))

    tx = jaxlora.optimizer(optax.adam(1e-2), bank)
    step = jaxlora.make_train_step(loss_fn, tx)  # donates the adapters' buffers
    target = jnp.ones((4, 32))
    trained, _, _ = step(bank, tx.init(bank), (x, target, bank.ids(["h", "g", "g", "h"])))
    heads = [trained.adapters[n]["dense_2"]["kernel"].value for n in ("h", "g")]
    assert not np.allclose(heads[0], heads[1])  # each head moved with its own rows


@pytest.mark.parametrize("jit", [False, True])
def test_adapters_with_their_own_head_switch_by_id_and_mix_per_row(heads, jit):
    model, bank_model, bank, x = heads
    run = lambda b, x, i: bank_model.apply({"params": b}, x, adapter=i)  # noqa: E731
    run = jax.jit(run) if jit else run
    for name in (None, "head", "plain"):
        want = _alone(model, bank, name, x)
        chex.assert_trees_all_close(run(bank, x, bank.index(name or "__base__")), want, atol=1e-5)
    names = ["head", "plain", None, "head"]
    got = run(bank, x, bank.ids(names))
    for row, name in enumerate(names):
        chex.assert_trees_all_close(got[row], _alone(model, bank, name, x)[row], atol=1e-5)


def test_adapters_with_trained_heads_save_and_load_as_a_bank(heads, tmp_path):
    _, bank_model, bank, x = heads  # the heads differ from the base's (shifted)
    jaxlora.save_bank(tmp_path / "bank", bank)
    loaded = jaxlora.load_bank(tmp_path / "bank", bank.base)
    ids = bank.ids(["head", "plain", None, "head"])
    chex.assert_trees_all_close(
        bank_model.apply({"params": loaded}, x, adapter=ids),
        bank_model.apply({"params": bank}, x, adapter=ids),
    )
    other = jax.tree.map(lambda w: w + 1, bank.base)
    with pytest.raises(ValueError, match=r"(?s)adapter 'head'.*another base.*'dense_0'"):
        jaxlora.load_bank(tmp_path / "bank", other)


def test_a_saved_leaf_through_a_custom_jvp_function_mixes_per_row():
    class Gate(nn.Module):
        @nn.compact
        def __call__(self, h):
            return h * jax.nn.relu(self.param("g", nn.initializers.normal(1.0), (8,)))

    class Gated(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Gate(name="gate")(nn.Dense(8, name="body")(x))

    model, x = Gated(), jax.random.normal(KEY, (4, 16))
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["body"], modules_to_save=["gate"])
    bank_model, bank = _bank(model, params, x, {"h": cfg, "g": cfg})
    names = ["h", "g", None, "g"]
    got = bank_model.apply({"params": bank}, x, adapter=bank.ids(names))
    for row, name in enumerate(names):
        chex.assert_trees_all_close(got[row], _alone(model, bank, name, x)[row], atol=1e-6)


def test_whole_leaves_per_row_where_rows_are_lost_are_refused():
    class Pooled(nn.Module):  # the head's bias meets a value summed over the batch
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, name="body")(x)
            return nn.Dense(2, name="head")(jnp.sum(h, axis=0, keepdims=True)) + h[:, :2]

    model, x = Pooled(), jax.random.normal(KEY, (4, 16))
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["body"], modules_to_save=["head"])
    bank_model, bank = _bank(model, params, x, {"h": cfg, "g": cfg})
    with pytest.raises(ValueError, match=r"its own copy of 'params/head/kernel'.*reduce_sum"):
        bank_model.apply({"params": bank}, x, adapter=bank.ids(["h", "g", "h", None]))
