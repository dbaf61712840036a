"""linen models written the ways users write them: own einsum modules, share_scope, nn.jit,
a layer axis at position 1, tied and reshaped weights, experts and convolutions."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import jaxlora
from jaxlora import _uses

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (2, 5, 16))


class Einsum(nn.Module):
    """As the gemma library writes it: a raw param and jnp.einsum."""

    shape: tuple
    eq: str

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.eq, x, self.param("w", nn.initializers.normal(), self.shape))


class SharedMlp(nn.Module):
    """Bare params of a share_scope'd module, one sliced per use (gemma's FeedForward)."""

    def setup(self):
        self.gating = self.param("gating_einsum", nn.initializers.normal(), (2, 16, 32))
        self.linear = self.param("linear", nn.initializers.normal(), (32, 16))

    def __call__(self, x):
        gate = jnp.einsum("btd,df->btf", x, self.gating[0])
        up = jnp.einsum("btd,df->btf", x, self.gating[1])
        return (jax.nn.gelu(gate) * up) @ self.linear


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = Einsum((16, 2, 8), "btd,dnh->btnh", name="q_einsum")(x)
        o = Einsum((2, 8, 16), "btnh,nhd->btd", name="attn_vec_einsum")(q)
        mlp = SharedMlp()
        nn.share_scope(self, mlp)
        return x + o + mlp(x)


class Jitted(nn.Module):
    @nn.jit
    @nn.compact
    def __call__(self, x):
        return Block()(x)


class Scanned(nn.Module):
    """Stacked layers with the layer axis at position 1 (MaxText's param_scan_axis=1)."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            lambda block, c, _: (block(c), None),
            variable_axes={"params": 1},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = stack(Block(), x, None)
        return x


def _random_b(params):
    trainable, frozen = jaxlora.split(params)
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    return jaxlora.combine(trainable, frozen)


_DOT = re.compile(r"= f32\[([\d,]+)\]\S* (?:dot|convolution)\(")


def _dot_shapes(lowered):
    hlo = lowered.compile().as_text()
    return {tuple(int(d) for d in m.group(1).split(",")) for m in _DOT.finditer(hlo)}


def _weight_gradient_dots(step, lora_model, params, opt_state, x):
    """Dots of the train step with a frozen weight's shape that the forward lacks: ``dW``."""
    forward = _dot_shapes(jax.jit(lora_model.apply).lower({"params": params}, x))
    assert forward, "no dots found: the HLO pattern is stale"
    backward = _dot_shapes(step.lower(params, opt_state, x)) - forward
    frozen = jax.tree.leaves(jaxlora.split(params)[1])
    return backward & {w.shape for w in frozen if w.ndim >= 2}


def _assert_merge_matches(model, lora_model, params, x, atol=1e-5):
    """The merged base model computes what the adapted one does."""
    chex.assert_trees_all_close(
        model.apply({"params": jaxlora.merge(params)}, x),
        lora_model.apply({"params": params}, x),
        rtol=1e-5,
        atol=atol,
    )


@pytest.mark.parametrize("model", [Block(), Jitted(), Scanned()], ids=["plain", "jit", "scan1"])
def test_custom_weights_adapt_identity_train_merge(model):
    params = model.init(KEY, X)["params"]
    base = model.apply({"params": params}, X)  # runs nn.jit first: its cache must not hide layers
    cfg = jaxlora.LoraConfig(rank=2, targets="all-linear")
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, X, key=KEY)
    names = {row.path.rsplit("/", 1)[-1] for row in jaxlora.summary(lora_params).layers}
    assert names == {"w", "gating_einsum", "linear"}
    chex.assert_trees_all_equal(lora_model.apply({"params": lora_params}, X), base)

    def loss(p, x):
        return jnp.mean(lora_model.apply({"params": p}, x) ** 2)

    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(loss, tx, donate=False)
    state, p = tx.init(lora_params), lora_params
    assert not _weight_gradient_dots(step, lora_model, p, state, X)
    losses = []
    for _ in range(3):
        p, state, value = step(p, state, X)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(jaxlora.split(p)[1], jaxlora.split(lora_params)[1])

    p = _random_b(lora_params)
    adapted = lora_model.apply({"params": p}, X)
    merged = jaxlora.merge(p)
    chex.assert_trees_all_close(model.apply({"params": merged}, X), adapted, rtol=1e-5, atol=1e-5)
    restored = jaxlora.unmerge(merged, p)
    chex.assert_trees_all_close(lora_model.apply({"params": restored}, X), adapted, atol=1e-5)


def test_layer_axis_at_position_one_is_stacked_in_both_factors():
    params = Scanned().init(KEY, X)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["q_einsum"])
    _, lora_params = jaxlora.lorafy(Scanned(), params, cfg, X, key=KEY)
    (row,) = jaxlora.summary(lora_params).layers
    assert row.kernel_shape == (16, 3, 2, 8)
    assert row.a_shape == (3, 16, 2) and row.b_shape == (3, 2, 2, 8)  # stack axes lead


class TiedLm(nn.Module):
    @nn.compact
    def __call__(self, ids):
        table = self.param("table", nn.initializers.normal(), (40, 16))
        x = table[ids]
        w = self.param("proj", nn.initializers.normal(), (2, 8, 16))
        x = x + x @ w.reshape(16, 16).T  # reshaped and transposed before use
        return x @ table.T


def test_tied_table_and_reshaped_weight():
    ids = jnp.arange(10).reshape(2, 5)
    model = TiedLm()
    params = model.init(KEY, ids)["params"]
    with pytest.raises(ValueError, match="matches no layer"):
        jaxlora.lorafy(model, params, jaxlora.LoraConfig(targets=["tabel"]), ids, key=KEY)
    cfg = jaxlora.LoraConfig(rank=2, targets=["table", "proj"])
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, ids, key=KEY)
    p = _random_b(lora_params)
    _assert_merge_matches(model, lora_model, p, ids)
    report = jaxlora.summary(lora_params, lora_model)
    assert not report.not_adapted


class Experts(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("experts", nn.initializers.normal(), (4, 16, 8))
        tokens = x.reshape(-1, 16)
        sizes = jnp.array([3, 2, 4, 1], jnp.int32)
        ragged = jax.lax.ragged_dot(tokens, w, sizes)
        dense = jnp.einsum("etd,edf->etf", jnp.stack([tokens] * 4), w)
        conv = nn.Conv(6, (3,), name="conv")(x)
        return ragged.sum() + dense.sum() + conv.sum()


def test_expert_weights_and_convolutions():
    model = Experts()
    params = model.init(KEY, X)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["experts", "conv"])
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, X, key=KEY)
    rows = {row.path: row for row in jaxlora.summary(lora_params).layers}
    assert rows["experts"].a_shape == (4, 16, 2) and rows["experts"].b_shape == (4, 2, 8)
    assert rows["conv"].a_shape == (3, 16, 2) and rows["conv"].b_shape == (2, 6)
    p = _random_b(lora_params)
    _assert_merge_matches(model, lora_model, p, X, atol=1e-4)


def test_expert_adapter_forms_agree():
    """The CPU form (dense dots, per-row expert mask) equals the grouped ``ragged_dot`` form
    used on GPU/TPU, gradients included, with rows past the last group left at zero."""
    k = jax.random.split(KEY, 4)
    x = jax.random.normal(k[0], (12, 16))
    a, b = jax.random.normal(k[1], (4, 16, 3)), jax.random.normal(k[2], (4, 3, 8))
    sizes = jnp.array([3, 0, 6, 1], jnp.int32)  # an empty group; 2 rows past the end
    ct = jax.random.normal(k[3], (12, 8))

    def grads(delta):
        loss = lambda x, a, b: jnp.vdot(delta(x, a, b, sizes, scale=0.5), ct)  # noqa: E731
        return delta(x, a, b, sizes, scale=0.5), jax.grad(loss, argnums=(0, 1, 2))(x, a, b)

    dense, grouped = grads(_uses._expert_mask_delta), grads(_uses._grouped_delta)
    chex.assert_trees_all_close(dense, grouped, rtol=1e-5, atol=1e-5)
    assert not dense[0][10:].any()


class NnxDenseGeneral(nnx.Module):
    """As MaxText writes its projections: an NNX module bridged into linen."""

    def __init__(self, d: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d, heads, head_dim)))

    def __call__(self, x):
        return jnp.einsum("btd,dnh->btnh", x, self.kernel[...])


class Bridged(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nnx.bridge.to_linen(NnxDenseGeneral, 16, 2, 8, name="query")(x)
        return q.reshape(*q.shape[:2], -1)


def test_nnx_module_bridged_into_linen():
    model = Bridged()
    params = model.init(KEY, X)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["query"])
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, X, key=KEY)
    (row,) = jaxlora.summary(lora_params).layers
    assert row.path == "query" and row.a_shape == (16, 2) and row.b_shape == (2, 2, 8)
    p = _random_b(lora_params)
    _assert_merge_matches(model, lora_model, p, X)


class NnxEinsum(nnx.Module):
    """A Tunix-style NNX einsum module whose __call__ is wrapped in nnx.jit."""

    def __init__(self, shape, eq, rngs):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), shape))
        self.eq = eq

    @nnx.jit
    def __call__(self, x):
        return jnp.einsum(self.eq, x, self.w[...])


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.q = NnxEinsum((16, 2, 8), "btd,dnh->btnh", rngs)
        self.o = NnxEinsum((2, 8, 16), "btnh,nhd->btd", rngs)

    def __call__(self, x):
        return x + self.o(self.q(x))


class NnxStack(nnx.Module):
    """Three blocks made with nnx.vmap (stacked params) and run with nnx.scan."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_nnx_jit_methods_and_scanned_stacks():
    model = NnxStack(nnx.Rngs(0))
    before = model(X)
    model = jaxlora.lorafy(model, jaxlora.LoraConfig(rank=2), X, rngs=nnx.Rngs(1))
    rows = {row.path: row for row in jaxlora.summary(model).layers}
    assert rows.keys() == {"blocks/q/w", "blocks/o/w"}
    assert rows["blocks/q/w"].a_shape == (3, 16, 2) and rows["blocks/q/w"].b_shape == (3, 2, 2, 8)
    chex.assert_trees_all_equal(model(X), before)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, jaxlora.LoraParam):
            var[...] = var[...] + 0.1
    chex.assert_trees_all_close(model(X), jaxlora.merge(model)(X), rtol=1e-5, atol=1e-4)


class WeightFirst(nn.Module):
    """dot_general with the weight as the left operand, plain and batched over experts."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (16, 8))
        plain = jax.lax.dot_general(w, x, (((0,), (2,)), ((), ())))  # (8, batch, time)
        e = self.param("e", nn.initializers.normal(), (3, 16, 8))
        batched = jax.lax.dot_general(e, jnp.stack([x] * 3), (((1,), (3,)), ((0,), (0,))))
        return plain.sum(0) + (batched**2).sum((0, 1))


def test_weight_as_the_left_operand():
    model = WeightFirst()
    params = model.init(KEY, X)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["w", "e"])
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, X, key=KEY)
    _assert_merge_matches(model, lora_model, _random_b(lora_params), X)


class ReadsAnothersWeight(nnx.Module):
    """A head that reads the embedder's table itself instead of calling a method of it."""

    def __init__(self, rngs):
        self.embedder = NnxTable(rngs)

    def __call__(self, ids):
        x = self.embedder(ids)
        return x @ self.embedder.table[...].T


class NnxTable(nnx.Module):
    def __init__(self, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (20, 16)))

    def __call__(self, ids):
        return self.table[...][ids]


def test_nnx_weight_used_outside_its_module_is_refused():
    ids = jnp.arange(6).reshape(2, 3)
    model = ReadsAnothersWeight(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'embedder/table' is used 2 times .* only 1 of them"):
        jaxlora.lorafy(model, jaxlora.LoraConfig(rank=2, targets=["table"]), ids, rngs=nnx.Rngs(1))
