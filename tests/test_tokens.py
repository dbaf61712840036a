"""New tokens (``LoraConfig(trainable_token_indices=...)``, PEFT's option): only chosen rows
of an embedding train; a tied head reads the same rows; merge writes them exactly."""

import dataclasses
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from tests.support.steps import full_finetune_step, moved

VOCAB, WIDTH, NEW = 37, 8, (3, 30, 36)
KEY = jax.random.key(0)
IDS = jnp.array([[3, 1, 30, 5, 36, 2], [0, 36, 4, 3, 9, 30]], jnp.int32)


class TiedLM(nn.Module):
    """Embedding, one Dense block, and the embedding again as the output head (``attend``)."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, WIDTH, name="embed_tokens")
        h = embed(ids)
        h = h + jnp.tanh(nn.Dense(WIDTH, name="hidden")(h))
        return embed.attend(h)


class UntiedLM(nn.Module):
    """Embedding, one Dense block and its own ``lm_head`` ``(width, vocab)``."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, WIDTH, name="embed_tokens")(ids)
        h = h + jnp.tanh(nn.Dense(WIDTH, name="hidden")(h))
        return nn.Dense(VOCAB, name="lm_head")(h)


def _setup(model=None, **cfg):
    model = model or TiedLM()
    params = model.init(KEY, IDS)["params"]
    cfg = jaxlora.LoraConfig(**{"rank": 2, "targets": ["hidden"], **cfg})
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    return model, params, lora_model, lora_params


def _moved(params, scale=0.5):
    return moved(params, scale)


def _lm_loss(apply):
    def loss(params, ids):
        logits = apply({"params": params}, ids)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return loss


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_rows_replace_the_embedding_in_lookup_and_tied_head(jit):
    model, params, lora_model, lora_params = _setup(targets=[], trainable_token_indices=NEW)
    node = lora_params["embed_tokens"]["tokens"]
    assert isinstance(node, jaxlora.TrainableTokens) and node.indices == NEW
    np.testing.assert_array_equal(node.values, params["embed_tokens"]["embedding"][np.array(NEW)])
    apply = jax.jit(lora_model.apply) if jit else lora_model.apply
    chex.assert_trees_all_close(
        apply({"params": lora_params}, IDS), model.apply({"params": params}, IDS), atol=1e-6
    )

    moved = _moved(lora_params)
    values = moved["embed_tokens"]["tokens"].values
    want_table = params["embed_tokens"]["embedding"].at[np.array(NEW)].set(values)
    want = model.apply({"params": {**params, "embed_tokens": {"embedding": want_table}}}, IDS)
    got = apply({"params": moved}, IDS)
    assert float(jnp.max(jnp.abs(want - model.apply({"params": params}, IDS)))) > 0.1
    chex.assert_trees_all_close(got, want, atol=1e-5)


def test_only_the_rows_train_and_hold_optimizer_state():
    _, _, lora_model, lora_params = _setup(trainable_token_indices=NEW)
    trainable, _ = jaxlora.split(lora_params)
    shapes = sorted(x.shape for x in jax.tree.leaves(trainable))
    assert shapes == [(2, WIDTH), (len(NEW), WIDTH), (WIDTH, 2)]  # rows, A, B
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    state = tx.init(lora_params)
    floats = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert floats == 2 * (len(NEW) * WIDTH + 2 * (WIDTH + WIDTH))
    summary = jaxlora.summary(lora_params)
    assert summary.trainable_params == len(NEW) * WIDTH + 4 * WIDTH
    assert summary.tokens == (("embed_tokens", NEW, (3, WIDTH)),)
    assert "token rows of embed_tokens: ids [3, 30, 36], (3, 8)" in str(summary)

    step = jaxlora.make_train_step(_lm_loss(lora_model.apply), tx, donate=False)
    before = lora_params
    losses = []
    for _ in range(5):
        lora_params, state, loss = step(lora_params, state, IDS)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(jaxlora.split(lora_params)[1], jaxlora.split(before)[1])
    after = lora_params["embed_tokens"]["tokens"].values
    assert np.all(np.abs(np.asarray(after - before["embed_tokens"]["tokens"].values)).max(1) > 0)


def _full_table_results(hlo: str) -> list[str]:
    """Ops of a compiled step whose result has the embedding's shape, either way round,
    other than parameters, copies and bitcasts (a gradient would be a dot or a scatter)."""
    shape = rf"f32\[({VOCAB},{WIDTH}|{WIDTH},{VOCAB})\]\S* (\w+)\("
    return [m.group(2) for m in re.finditer(shape, hlo) if m.group(2) in ("dot", "scatter")]


def test_no_full_embedding_gradient_in_the_compiled_step():
    model, params, lora_model, lora_params = _setup(trainable_token_indices=NEW)
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(_lm_loss(lora_model.apply), tx, donate=False)
    trainable, frozen = jaxlora.split(lora_params)
    hlo = step.jitted.lower(trainable, frozen, tx.init(lora_params), IDS).compile().as_text()
    assert not _full_table_results(hlo)
    # the detector sees the table gradient of full fine-tuning (lookup and tied head)
    full_tx = optax.adam(1e-2)
    full = full_finetune_step(_lm_loss(model.apply), full_tx)
    full_hlo = full.lower(params, full_tx.init(params), IDS).compile().as_text()
    assert _full_table_results(full_hlo)


def test_merge_writes_the_rows_exactly_and_unmerge_restores_the_base():
    model, params, lora_model, lora_params = _setup(trainable_token_indices=NEW)
    moved = _moved(lora_params)
    merged = jaxlora.merge(moved)
    table = merged["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(table[np.array(NEW)], moved["embed_tokens"]["tokens"].values)
    others = [i for i in range(VOCAB) if i not in NEW]
    np.testing.assert_array_equal(
        table[np.array(others)], params["embed_tokens"]["embedding"][np.array(others)]
    )
    assert "tokens" not in merged["embed_tokens"]
    chex.assert_trees_all_close(
        model.apply({"params": merged}, IDS), lora_model.apply({"params": moved}, IDS), atol=1e-5
    )
    back = jaxlora.unmerge(merged, moved)
    chex.assert_trees_all_equal(back["embed_tokens"], moved["embed_tokens"])
    chex.assert_trees_all_close(back, moved, atol=1e-6)
    rows_only = _moved(_setup(targets=[], trainable_token_indices=NEW)[-1])
    with pytest.raises(ValueError, match=r"'embed_tokens'.*still has the base rows.*\[3, 30, 36\]"):
        jaxlora.unmerge(jax.tree.map(jnp.copy, params), rows_only)


def test_untied_head_rows_are_its_output_columns():
    model, params, lora_model, lora_params = _setup(
        UntiedLM(), trainable_token_indices={"embed_tokens": NEW, "lm_head": NEW[:2]}
    )
    head = lora_params["lm_head"]["tokens"]
    assert head.values.shape == (2, WIDTH)
    np.testing.assert_array_equal(head.values, params["lm_head"]["kernel"][:, np.array(NEW[:2])].T)
    moved = _moved(lora_params)
    merged = jaxlora.merge(moved)
    np.testing.assert_array_equal(
        merged["lm_head"]["kernel"][:, np.array(NEW[:2])], moved["lm_head"]["tokens"].values.T
    )
    chex.assert_trees_all_close(
        lora_model.apply({"params": moved}, IDS), model.apply({"params": merged}, IDS), atol=1e-5
    )


def test_save_load_adapter_and_train_checkpointer_carry_the_rows(tmp_path):
    model, params, _, lora_params = _setup(trainable_token_indices=NEW)
    cfg = jaxlora.LoraConfig(rank=2, targets=["hidden"], trainable_token_indices=NEW)
    moved = _moved(lora_params)
    jaxlora.save_adapter(tmp_path / "adapter", moved, cfg)
    loaded_cfg, loaded = jaxlora.load_adapter(tmp_path / "adapter", params)
    assert loaded_cfg == cfg
    chex.assert_trees_all_equal(loaded, moved)
    wider = model.init(KEY, IDS)["params"]  # a vocabulary that was not resized
    small = {**wider, "embed_tokens": {"embedding": wider["embed_tokens"]["embedding"][:30]}}
    with pytest.raises(
        ValueError,
        match=r"rows \[3, 30, 36\] of weight 'embed_tokens' \(37, 8\), but these params have shape",
    ):
        jaxlora.load_adapter(tmp_path / "adapter", small)
    with pytest.raises(ValueError, match="'embed_tokens' has trained token rows but the config"):
        jaxlora.save_adapter(
            tmp_path / "other", moved, jaxlora.LoraConfig(rank=2, targets=["hidden"])
        )

    diverged = {**moved, "embed_tokens": {**moved["embed_tokens"]}}
    rows = diverged["embed_tokens"]["tokens"]
    diverged["embed_tokens"]["tokens"] = dataclasses.replace(rows, values=rows.values * jnp.nan)
    with pytest.raises(ValueError, match=r"NaN or inf:\n  - token rows of 'embed_tokens'"):
        jaxlora.save_adapter(tmp_path / "diverged", diverged, cfg)

    tx = jaxlora.optimizer(optax.adam(1e-2), moved)
    opt_state = tx.init(moved)
    with jaxlora.TrainCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(1, moved, opt_state, KEY)
        resumed = ckpt.restore_latest(lora_params, tx.init(lora_params))
    chex.assert_trees_all_equal((resumed.params, resumed.opt_state), (moved, opt_state))


def test_an_adapter_with_rows_is_refused_by_a_jaxlora_that_cannot_read_them(tmp_path, monkeypatch):
    _, params, _, lora_params = _setup(trainable_token_indices=NEW)
    cfg = jaxlora.LoraConfig(rank=2, targets=["hidden"], trainable_token_indices=NEW)
    jaxlora.save_adapter(tmp_path / "rows", lora_params, cfg)
    _, _, _, plain_params = _setup()
    jaxlora.save_adapter(
        tmp_path / "plain", plain_params, jaxlora.LoraConfig(rank=2, targets=["hidden"])
    )
    # A jaxlora from before token rows reads versions 1 and 2 only.
    monkeypatch.setattr("jaxlora._adapter_files._READABLE", (1, 2))
    jaxlora.load_adapter(tmp_path / "plain", params)  # LoRA alone: still version 2
    with pytest.raises(ValueError, match="has format version 3; this jaxlora reads"):
        jaxlora.load_adapter(tmp_path / "rows", params)


class Einsum3D(nn.Module):
    """An embedding and a head-shaped einsum weight ``(heads, head_dim, width)``."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, WIDTH, name="embed_tokens")(ids)
        w = self.param("w", nn.initializers.normal(), (2, 4, WIDTH))
        return jnp.einsum("btnh,nhd->btd", h.reshape(*h.shape[:2], 2, 4), w)


class TwoTables(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(VOCAB, WIDTH, name="words")(ids) + nn.Embed(VOCAB, WIDTH, name="pos")(ids)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([3, 3, 5], r"trainable_token_indices repeats token ids \[3\]; list each id once"),
        ([3, -1], r"holds \[-1\], which are not token ids"),
        ({"embed_tokens": []}, r"\['embed_tokens'\]=\[\] must be a non-empty list"),
        ({}, "trainable_token_indices is an empty dict"),
        ([1.5], r"holds \[1.5\], which are not token ids"),
    ],
)
def test_config_refuses_bad_ids(indices, message):
    with pytest.raises(ValueError, match=message):
        jaxlora.LoraConfig(trainable_token_indices=indices)


@pytest.mark.parametrize(
    ("model", "cfg", "message"),
    [
        (
            TiedLM(),
            {"trainable_token_indices": [3, 37]},
            r"for 'embed_tokens': token ids \[37\] are out of range for its 37 rows; add the "
            r"tokens to the vocabulary first",
        ),
        (
            Einsum3D(),
            {"targets": [], "trainable_token_indices": {"w": [0]}},
            r"names weight 'w' \(2, 4, 8\), which is not an embedding table",
        ),
        (
            TiedLM(),
            {"targets": ["hidden", "embed_tokens"], "trainable_token_indices": [3]},
            "'embed_tokens' is both a LoRA target and in trainable_token_indices",
        ),
        (
            TiedLM(),
            {"modules_to_save": ["embed_tokens"], "trainable_token_indices": [3]},
            r"is in modules_to_save \('embed_tokens'\), which trains the whole table",
        ),
        (
            TwoTables(),
            {"targets": [], "trainable_token_indices": [3]},
            r"the model looks up 2 embeddings \(pos, words\)\. Name the table",
        ),
        (
            TiedLM(),
            {"trainable_token_indices": {"embed": [3]}},
            r"trainable_token_indices key 'embed' matches no layer or weight.*\n.*embed_tokens",
        ),
    ],
    ids=[
        "out-of-range",
        "not-an-embedding",
        "lora-too",
        "modules-to-save",
        "ambiguous",
        "no-match",
    ],
)
def test_lorafy_refuses_what_cannot_train_by_row(model, cfg, message):
    params = model.init(KEY, IDS)["params"]
    config = jaxlora.LoraConfig(**{"rank": 2, "targets": ["hidden"], **cfg})
    with pytest.raises(ValueError, match=message):
        jaxlora.lorafy(model, params, config, IDS, key=KEY)


class NnxTiedLM(nnx.Module):
    """NNX twin of `TiedLM`."""

    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.hidden = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, ids):
        h = self.embed_tokens(ids)
        h = h + jnp.tanh(self.hidden(h))
        return self.embed_tokens.attend(h)


@pytest.mark.parametrize("inputs", [(), (IDS,)], ids=["untraced", "traced"])
def test_nnx_rows_train_alone_and_merge_exactly(inputs):
    base = NnxTiedLM(nnx.Rngs(0))
    table = base.embed_tokens.embedding[...]
    cfg = jaxlora.LoraConfig(rank=2, targets=["hidden"], trainable_token_indices=NEW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untraced: the weights outside Flax's layers
        module = jaxlora.lorafy(nnx.clone(base), cfg, *inputs, rngs=nnx.Rngs(1))
    state = nnx.state(module, jaxlora.TrainableParam)
    assert sorted(x.shape for x in jax.tree.leaves(state)) == [(2, WIDTH), (3, WIDTH), (WIDTH, 2)]
    assert jaxlora.summary(module).tokens == (("embed_tokens", NEW, (3, WIDTH)),)
    chex.assert_trees_all_close(module(IDS), base(IDS), atol=1e-6)

    optimizer = nnx.Optimizer(module, optax.adam(0.1), wrt=jaxlora.TrainableParam)

    @nnx.jit
    def train(module, optimizer):
        def loss(module):
            return -jnp.mean(jax.nn.log_softmax(module(IDS))[..., 0])

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, jaxlora.TrainableParam))(
            module
        )
        optimizer.update(module, grads)
        return value

    losses = [float(train(module, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    values = module.embed_tokens.tokens["embedding"].values[...]
    np.testing.assert_array_equal(module.embed_tokens.base.embedding[...], table)
    assert np.all(np.abs(np.asarray(values - table[np.array(NEW)])).max(1) > 0)
    want = base(IDS)
    reference = nnx.clone(base)
    reference.embed_tokens.embedding[...] = table.at[np.array(NEW)].set(values)
    reference.hidden = jaxlora.merge(module).hidden
    chex.assert_trees_all_close(module(IDS), reference(IDS), atol=1e-5)
    assert float(jnp.max(jnp.abs(module(IDS) - want))) > 0.01

    merged = jaxlora.merge(module)
    np.testing.assert_array_equal(merged.embed_tokens.embedding[np.array(NEW)], values)
    chex.assert_trees_all_close(merged(IDS), module(IDS), atol=1e-5)
    back = jaxlora.unmerge(merged, module)
    np.testing.assert_array_equal(back.embed_tokens.base.embedding[...], table)
    with pytest.raises(ValueError, match=r"'embed_tokens' of the first module still has the base"):
        jaxlora.unmerge(_with_table(merged, table), module)


def _with_table(module, table):
    out = nnx.clone(module)
    out.embed_tokens.embedding[...] = table
    return out


def test_banks_refuse_token_rows():
    model = TiedLM()
    params = model.init(KEY, IDS)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["hidden"], trainable_token_indices=NEW)
    with pytest.raises(ValueError, match=r"AdapterBank.add\('a'\): the config trains token rows"):
        jaxlora.lorafy(model, params, cfg, IDS, key=KEY, name="a")
    with pytest.raises(ValueError, match=r"LoraBank.add\('a'\): the config trains token rows"):
        jaxlora.lorafy(NnxTiedLM(nnx.Rngs(0)), cfg, IDS, rngs=nnx.Rngs(1), name="a")


def test_with_variants_the_rows_are_kept_and_free_of_lora_dropout():
    model = TiedLM()
    params = model.init(KEY, IDS)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["hidden"], init="pissa", trainable_token_indices=NEW)
    _, adapted = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    moved = _moved(adapted, 0.1)
    plain_cfg, plain = jaxlora.convert_to_lora(moved, params, cfg)
    chex.assert_trees_all_equal(plain["embed_tokens"]["tokens"], moved["embed_tokens"]["tokens"])
    chex.assert_trees_all_close(
        jaxlora.LoraModel(model, plain_cfg).apply({"params": plain}, IDS),
        jaxlora.LoraModel(model, cfg).apply({"params": moved}, IDS),
        atol=1e-5,
    )
    # LoRA dropout acts on the LoRA input only: with the adapter's B zero, the tied head's
    # rows give the same logits whatever the dropout key
    cfg = jaxlora.LoraConfig(rank=2, targets=["hidden"], dropout=0.9, trainable_token_indices=NEW)
    lora_model, adapted = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    rows = adapted["embed_tokens"]["tokens"]
    adapted = {**adapted, "embed_tokens": {**adapted["embed_tokens"], "tokens": _moved_rows(rows)}}
    outs = [
        lora_model.apply({"params": adapted}, IDS, rngs={"dropout": jax.random.key(i)})
        for i in range(2)
    ]
    chex.assert_trees_all_equal(outs[0], outs[1])
    assert float(jnp.max(jnp.abs(outs[0] - model.apply({"params": params}, IDS)))) > 0.1


def _moved_rows(node):
    return dataclasses.replace(node, values=node.values + 1.0)


def test_rows_of_a_sharded_table_follow_its_features_and_train_like_one_device(tmp_path):
    mesh = jaxlora.parse_mesh("data=2,model=4")
    model = TiedLM()
    params = model.init(KEY, IDS)["params"]
    sharded = jaxlora.shard_params(params, mesh, [("embed_tokens/embedding", P(None, "model"))])
    cfg = jaxlora.LoraConfig(rank=2, targets=["hidden"], trainable_token_indices=NEW)
    lora_model, on_mesh = jaxlora.lorafy(model, sharded, cfg, IDS, key=KEY)
    _, single = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    rows = on_mesh["embed_tokens"]["tokens"].values
    assert rows.sharding == NamedSharding(mesh, P(None, "model"))

    def train(params):
        tx = jaxlora.optimizer(optax.adam(1e-2), params)
        step = jaxlora.make_train_step(_lm_loss(lora_model.apply), tx, donate=False)
        state = tx.init(params)
        for _ in range(3):
            params, state, _ = step(params, state, IDS)
        return params

    trained = train(on_mesh)
    chex.assert_trees_all_close(jax.device_get(trained), jax.device_get(train(single)), atol=1e-5)
    assert trained["embed_tokens"]["tokens"].values.sharding.spec == P(None, "model")
    jaxlora.save_adapter(tmp_path / "adapter", trained, cfg)
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", sharded)
    assert loaded["embed_tokens"]["tokens"].values.sharding == rows.sharding
