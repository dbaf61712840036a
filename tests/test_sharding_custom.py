"""Sharded adapters on weights outside Flax's layers (issue 10): custom einsum params and MoE
expert weights (``ragged_dot`` and per-expert einsums) on a (data, expert, model) mesh of 8
fake CPU devices, linen (NamedSharding, logical and mesh-axis boxes, a layer axis at
position 1) and NNX (``LoraModule``), and a Tunix llama3 on an (fsdp, tp) mesh."""

import functools
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
from jaxlora._sharding import box_factors

KEY = jax.random.key(0)
D, HEADS, HEAD_DIM, EXPERTS, F = 16, 2, 8, 4, 16
X, Y = np.random.default_rng(1).normal(size=(2, 8, 4, D)).astype(np.float32)

# Each weight's sharding, as mesh axes and as the logical names of the boxed variant.
WEIGHTS = {  # name: (shape, mesh axes, logical names)
    "attn/q": ((D, HEADS, HEAD_DIM), ("data", "model", None), ("embed", "heads", "kv")),
    "attn/o": ((HEADS, HEAD_DIM, D), ("model", None, "data"), ("heads", "kv", "embed")),
    "moe/router": ((D, EXPERTS), (None, None), ("embed_rep", "experts_rep")),
    "moe/wi": ((EXPERTS, D, F), ("expert", None, "model"), ("experts", "embed_rep", "mlp")),
    "moe/wo": ((EXPERTS, F, D), ("expert", "model", None), ("experts", "mlp", "embed_rep")),
    "dense_moe/w1": ((EXPERTS, D, F), ("expert", None, "model"), ("experts", "embed_rep", "mlp")),
    "dense_moe/w2": ((EXPERTS, F, D), ("expert", "model", None), ("experts", "mlp", "embed_rep")),
}
RULES = (
    ("embed", "data"),
    ("heads", "model"),
    ("kv", None),
    ("experts", "expert"),
    ("mlp", "model"),
    ("embed_rep", None),
    ("experts_rep", None),
)
# The factors' mesh axes: A (*stack, *in, r) keeps the input axes, B (*stack, r, *out) the
# output axes, both the expert axis.
FACTORS = {
    "attn/q": (P("data", None), P(None, "model", None)),
    "attn/o": (P("model", None, None), P(None, "data")),
    "moe/router": (P(None, None), P(None, None)),
    "moe/wi": (P("expert", None, None), P("expert", None, "model")),
    "moe/wo": (P("expert", "model", None), P("expert", None, None)),
    "dense_moe/w1": (P("expert", None, None), P("expert", None, "model")),
    "dense_moe/w2": (P("expert", "model", None), P("expert", None, None)),
}


def _mesh():
    return jaxlora.parse_mesh("data=2,expert=2,model=2")


def _param(module, name, boxed):
    shape, mesh_axes, logical = WEIGHTS[f"{module.name}/{name}"]
    init = nn.initializers.normal(0.3)
    if boxed == "mesh":
        init = nn.with_partitioning(init, mesh_axes)
    elif boxed == "logical":
        init = nn.with_logical_partitioning(init, logical)
    return module.param(name, init, shape)


class Attn(nn.Module):
    """Heads-shaped projections as the gemma library writes them: raw params + einsum."""

    boxed: str | None = None

    @nn.compact
    def __call__(self, x):
        q = jnp.einsum("btd,dnh->btnh", x, _param(self, "q", self.boxed))
        return jnp.einsum("btnh,nhd->btd", jax.nn.gelu(q), _param(self, "o", self.boxed))


class RaggedMoE(nn.Module):
    """Top-1 experts over token-sorted groups with `jax.lax.ragged_dot` (MaxText/Mixtral)."""

    boxed: str | None = None

    @nn.compact
    def __call__(self, x):
        tokens = x.reshape(-1, D)
        probs = jax.nn.softmax(tokens @ _param(self, "router", self.boxed))
        expert = jnp.argmax(probs, -1)
        order = jnp.argsort(expert)
        sizes = jnp.bincount(expert, length=EXPERTS).astype(jnp.int32)
        h = jax.nn.gelu(jax.lax.ragged_dot(tokens[order], _param(self, "wi", self.boxed), sizes))
        y = jax.lax.ragged_dot(h, _param(self, "wo", self.boxed), sizes)
        y = jnp.zeros_like(y).at[order].set(y) * probs.max(-1, keepdims=True)
        return y.reshape(x.shape)


class DenseMoE(nn.Module):
    """Tokens dispatched to every expert, per-expert einsums over the expert axis, mixed."""

    boxed: str | None = None

    @nn.compact
    def __call__(self, x):
        xe = jnp.broadcast_to(x, (EXPERTS, *x.shape))
        h = jax.nn.gelu(jnp.einsum("ebtd,edf->ebtf", xe, _param(self, "w1", self.boxed)))
        y = jnp.einsum("ebtf,efd->ebtd", h, _param(self, "w2", self.boxed))
        return y.mean(0)


class Block(nn.Module):
    boxed: str | None = None

    @nn.compact
    def __call__(self, x):
        x = x + Attn(self.boxed, name="attn")(x)
        x = x + RaggedMoE(self.boxed, name="moe")(x)
        return x + DenseMoE(self.boxed, name="dense_moe")(x)


def _mse(apply):
    def loss_fn(params, batch):
        return jnp.mean((apply({"params": params}, batch[0]) - batch[1]) ** 2)

    return loss_fn


def _train(lora_model, params, batch, steps=3):
    tx = jaxlora.optimizer(optax.adam(1e-2), params)
    step = jaxlora.make_train_step(_mse(lora_model.apply), tx, donate=False)
    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, batch)
        losses.append(float(value))
    return params, opt_state, losses


def _host(tree):
    return jax.device_get(nn.meta.unbox(jaxlora.split(tree)[0]))


def _padded_spec(x):
    """The spec of ``x``'s sharding with one entry per axis (trailing Nones written out)."""
    spec = tuple(x.sharding.spec)
    return (*spec, *(None,) * (x.ndim - len(spec)))


def _placements(tree):
    """Each array's mesh and padded spec."""
    return jax.tree.map(lambda x: (x.sharding.mesh, _padded_spec(x)), nn.meta.unbox(tree))


def _is_placement(x):
    return isinstance(x, tuple) and isinstance(x[0], jax.sharding.Mesh)


def _specs(tree):
    """The padded specs of the non-scalar arrays in ``tree``, sorted (a multiset)."""
    leaves = jax.tree.leaves(nn.meta.unbox(tree))
    return sorted(str(_padded_spec(x)) for x in leaves if x.ndim)


def _frozen_shardings(params):
    return _placements(jaxlora.split(params)[1])


def _normal(rng, shape):
    """Host-drawn weights: compiling jax.random's threefry costs seconds per shape on CPU."""
    return rng.normal(0, 0.3, shape).astype(np.float32)


def _init(model):
    """Params of ``model`` (boxes included) drawn on the host: no init program to compile."""
    rng = np.random.default_rng(0)
    abstract = jax.eval_shape(model.init, KEY, X)["params"]
    return jax.tree.map(lambda s: _normal(rng, s.shape), abstract)


@functools.cache
def _one_device_run():
    """The reference: the same adapters trained on one device, unsharded."""
    cfg = jaxlora.LoraConfig(rank=2)
    lora_model, lora_params = jaxlora.lorafy(Block(), _init(Block()), cfg, X, key=KEY)
    trained, _, losses = _train(lora_model, lora_params, (X, Y))
    return _host(lora_params), _host(trained), losses


def _check_sharded_training(lora_model, lora_params):
    """Adapters as FACTORS; training on a batch sharded over "data" equals one device."""
    mesh = _mesh()
    assert jaxlora.adapter_partition_specs(lora_params) == FACTORS
    inner = nn.meta.unbox(lora_params)
    for name, (a, b) in FACTORS.items():
        module, weight = name.split("/")
        adapter = inner[module][f"lora_{weight}"]
        assert adapter.a.sharding == NamedSharding(mesh, a), name
        assert adapter.b.sharding == NamedSharding(mesh, b), name

    initial, reference, ref_losses = _one_device_run()
    chex.assert_trees_all_equal(_host(lora_params), initial)  # created in place, same values
    before = _frozen_shardings(lora_params)
    trained, opt_state, losses = _train(lora_model, lora_params, jaxlora.shard_batch((X, Y), mesh))
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(_host(trained), reference, rtol=1e-5, atol=1e-5)
    # the adapters (and their optimizer state) stay where they were created, the frozen
    # weights where they were placed
    assert jaxlora.adapter_partition_specs(trained) == FACTORS
    assert _frozen_shardings(trained) == before
    # Adam's two moments per factor sit like the factor
    assert _specs(opt_state) == sorted(2 * _specs(jaxlora.split(trained)[0]))
    # merging writes each update into its weight where the weight is
    merged = jax.tree.leaves(_placements(jaxlora.merge(trained)), is_leaf=_is_placement)
    assert merged == jax.tree.leaves(before, is_leaf=_is_placement)
    chex.assert_trees_all_equal(
        jax.device_get(nn.meta.unbox(jaxlora.split(trained)[1])),
        jax.device_get(nn.meta.unbox(jaxlora.split(lora_params)[1])),
    )


def test_custom_and_expert_weights_sharded_by_named_sharding():
    mesh, model = _mesh(), Block()
    params = _init(model)
    specs = [(name, P(*axes)) for name, (_, axes, _) in WEIGHTS.items()]
    sharded = jaxlora.shard_params(params, mesh, specs)
    with jax.transfer_guard_device_to_device("disallow_explicit"):  # created in place
        lora_model, lora_params = jaxlora.lorafy(
            model, sharded, jaxlora.LoraConfig(rank=2), X, key=KEY
        )
    rows = {row.path: row for row in jaxlora.summary(lora_params).layers}
    assert set(rows) == set(WEIGHTS)
    assert rows["moe/wi"].a_shape == (EXPERTS, D, 2) and rows["moe/wi"].b_shape == (EXPERTS, 2, F)
    _check_sharded_training(lora_model, lora_params)


def test_boxed_custom_weights_get_boxed_adapters():
    """linen ``nn.Partitioned`` boxes on the raw params: logical names, then mesh axes."""
    mesh, model = _mesh(), Block(boxed="logical")
    params = jaxlora.shard_params(_init(model), mesh, rules=RULES)
    with nn.logical_axis_rules(RULES):
        lora_model, lora_params = jaxlora.lorafy(
            model, params, jaxlora.LoraConfig(rank=2), X, key=KEY
        )
    names = nn.get_partition_spec(lora_params)
    assert names["attn"]["lora_q"].a == P("embed", None)
    assert names["attn"]["lora_q"].b == P(None, "heads", "kv")
    assert names["attn"]["lora_o"].a == P("heads", "kv", None)
    assert names["attn"]["lora_o"].b == P(None, "embed")
    assert names["moe"]["lora_wi"].a == P("experts", "embed_rep", None)
    assert names["moe"]["lora_wi"].b == P("experts", None, "mlp")
    assert names["dense_moe"]["lora_w2"].a == P("experts", "mlp", None)
    assert names["dense_moe"]["lora_w2"].b == P("experts", None, "embed_rep")
    # the boxes' names resolve, through the rules, to where the arrays are
    for path, spec in jax.tree_util.tree_leaves_with_path(
        nn.logical_to_mesh(names, RULES), is_leaf=lambda x: isinstance(x, P)
    ):
        leaf = nn.meta.unbox(lora_params)
        for key in path:
            leaf = leaf[key.key] if hasattr(key, "key") else getattr(leaf, key.name)
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), path

    with nn.logical_axis_rules(RULES):
        _check_sharded_training(lora_model, lora_params)

    # nn.with_partitioning with mesh axis names: the boxes carry the mesh axes themselves
    model = Block(boxed="mesh")
    params = jaxlora.shard_params(_init(model), mesh)
    _, lora_params = jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=2), X, key=KEY)
    names = nn.get_partition_spec(lora_params)
    got = {
        name: (names[m][f"lora_{w}"].a, names[m][f"lora_{w}"].b)
        for name in FACTORS
        for m, w in [name.split("/")]
    }
    assert got == FACTORS
    assert jaxlora.adapter_partition_specs(lora_params) == FACTORS


class _AttnMoE(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + Attn(name="attn")(x)
        return x + RaggedMoE(name="moe")(x), None


class ScannedAt1(nn.Module):
    """Two blocks stacked by nn.scan with the layer axis at position 1 (MaxText's
    ``param_scan_axis=1``): q is stored (d, layers, heads, head_dim), wi (experts, layers,
    d, f)."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _AttnMoE, variable_axes={"params": 1}, split_rngs={"params": True}, length=2
        )
        return stack(name="layers")(x, None)[0]


def test_layer_axis_at_position_one_keeps_its_sharding_in_both_factors():
    mesh, model = _mesh(), ScannedAt1()
    specs = [  # the layer axis over "data" (as pipeline stages would be), heads over "model"
        ("layers/attn/q", P(None, "data", "model", None)),
        ("layers/moe/wi", P("expert", "data", None, "model")),
    ]
    params = jaxlora.shard_params(_init(model), mesh, specs)
    assert params["layers"]["attn"]["q"].shape == (D, 2, HEADS, HEAD_DIM)
    cfg = jaxlora.LoraConfig(rank=2, targets=["*/attn/q", "*/moe/wi"])
    _, lora_params = jaxlora.lorafy(model, params, cfg, X, key=KEY)
    assert jaxlora.adapter_partition_specs(lora_params) == {
        "layers/attn/q": (P("data", None, None), P("data", None, "model", None)),
        "layers/moe/wi": (P("expert", "data", None, None), P("expert", "data", None, "model")),
    }


# --- NNX: the model's own modules, wrapped in a LoraModule by lorafy ------------------------


class NnxEinsum(nnx.Module):
    """As Tunix writes its projections: an ``nnx.Param`` with sharding names + jnp.einsum."""

    def __init__(self, eq, shape, names, rng, meta_key="out_sharding"):
        self.eq = eq
        self.w = nnx.Param(_normal(rng, shape), **{meta_key: names})

    def __call__(self, x):
        return jnp.einsum(self.eq, x, self.w[...])


class NnxMoE(nnx.Module):
    """`RaggedMoE` in NNX: bare expert Params fed to ``ragged_dot``."""

    def __init__(self, rng):
        def param(name):
            shape, names, _ = WEIGHTS[f"moe/{name}"]
            return nnx.Param(_normal(rng, shape), out_sharding=names)

        self.router, self.wi, self.wo = param("router"), param("wi"), param("wo")

    def __call__(self, x):
        tokens = x.reshape(-1, D)
        probs = jax.nn.softmax(tokens @ self.router[...])
        expert = jnp.argmax(probs, -1)
        order = jnp.argsort(expert)
        sizes = jnp.bincount(expert, length=EXPERTS).astype(jnp.int32)
        h = jax.nn.gelu(jax.lax.ragged_dot(tokens[order], self.wi[...], sizes))
        y = jax.lax.ragged_dot(h, self.wo[...], sizes)
        y = jnp.zeros_like(y).at[order].set(y) * probs.max(-1, keepdims=True)
        return y.reshape(x.shape)


class NnxBlock(nnx.Module):
    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        (q_shape, q_names, _), (o_shape, o_names, _) = WEIGHTS["attn/q"], WEIGHTS["attn/o"]
        self.q = NnxEinsum("btd,dnh->btnh", q_shape, q_names, rng)
        # Tunix passes the deprecated ``sharding=``: it must mean ``out_sharding``
        self.o = NnxEinsum("btnh,nhd->btd", o_shape, o_names, rng, meta_key="sharding")
        self.moe = NnxMoE(rng)

    def __call__(self, x):
        x = x + self.o(jax.nn.gelu(self.q(x)))
        return x + self.moe(x)


def _nnx_block():
    with warnings.catch_warnings():  # "'sharding' is deprecated", as Tunix passes it
        warnings.simplefilter("ignore", DeprecationWarning)
        return NnxBlock(0)


NNX_FACTORS = {
    "q/w": FACTORS["attn/q"],
    "o/w": FACTORS["attn/o"],
    **{f"moe/{w}": FACTORS[f"moe/{w}"] for w in ("router", "wi", "wo")},
}


def _nnx_mse(model, batch):
    return jnp.mean((model(batch[0]) - batch[1]) ** 2)


def _nnx_train(model, batch, loss=_nnx_mse, steps=3):
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=jaxlora.TrainableParam)

    @nnx.jit
    def step(model, opt, batch):
        diff = nnx.DiffState(0, jaxlora.TrainableParam)
        value, grads = nnx.value_and_grad(loss, argnums=diff)(model, batch)
        opt.update(model, grads)
        return value

    return [float(step(model, opt, batch)) for _ in range(steps)]


def _lora_state(model):
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, jaxlora.LoraParam)))


def test_nnx_custom_module_adapters_follow_the_param_sharding():
    cfg, mesh = jaxlora.LoraConfig(rank=2), _mesh()
    with nnx.use_eager_sharding(False):
        single = jaxlora.lorafy(_nnx_block(), cfg, X, rngs=nnx.Rngs(1))
    with jax.set_mesh(mesh):
        model = _nnx_block()
    assert model.q.w.get_metadata()["out_sharding"] == WEIGHTS["attn/q"][1]
    assert model.o.w.get_metadata()["out_sharding"] == WEIGHTS["attn/o"][1]
    assert model.q.w.sharding == NamedSharding(mesh, P(*WEIGHTS["attn/q"][1]))
    with jax.set_mesh(mesh), jax.transfer_guard_device_to_device("disallow_explicit"):
        model = jaxlora.lorafy(model, cfg, X, rngs=nnx.Rngs(1))
    assert isinstance(model.q, jaxlora.LoraModule) and isinstance(model.moe, jaxlora.LoraModule)
    assert jaxlora.adapter_partition_specs(model) == NNX_FACTORS
    # derived sharding metadata: A (*stack, *in, r), B (*stack, r, *out)
    wi = model.moe.adapters["wi"]
    assert wi.lora_a.get_metadata()["out_sharding"] == ("expert", None, None)
    assert wi.lora_b.get_metadata()["out_sharding"] == ("expert", None, "model")
    assert wi.lora_a.sharding == NamedSharding(mesh, P("expert", None, None))
    specs = nnx.get_partition_spec(nnx.state(model, jaxlora.LoraParam))
    assert specs["q"]["adapters"]["w"]["lora_a"].get_value() == P("data", None)
    assert specs["o"]["adapters"]["w"]["lora_b"].get_value() == P(None, "data")
    chex.assert_trees_all_equal(_lora_state(model), _lora_state(single))

    frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(jaxlora.TrainableParam)))
    before = _placements(frozen)
    with jax.set_mesh(mesh):
        losses = _nnx_train(model, jaxlora.shard_batch((X, Y), mesh))
    np.testing.assert_allclose(losses, _nnx_train(single, (X, Y)), rtol=1e-5)
    assert losses[-1] < losses[0]
    chex.assert_trees_all_close(_lora_state(model), _lora_state(single), rtol=1e-5, atol=1e-5)
    assert jaxlora.adapter_partition_specs(model) == NNX_FACTORS
    after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(jaxlora.TrainableParam)))
    assert _placements(after) == before


def _trimmed(axes):
    """A spec without its trailing Nones, as users write them and as ``jit`` returns them."""
    axes = list(axes)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def test_specs_without_trailing_nones_keep_the_stacked_axes():
    """``P("expert", "model")`` on an (experts, f, d) weight: "expert" is still the stacked
    axis, "model" its input axis (was: read as the kernel's (f, d), B lost "expert")."""
    mesh, model = _mesh(), Block()
    specs = [(name, _trimmed(axes)) for name, (_, axes, _) in WEIGHTS.items()]
    params = jaxlora.shard_params(_init(model), mesh, specs)
    assert params["moe"]["wo"].sharding.spec == P("expert", "model")
    _, lora_params = jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=2), X, key=KEY)
    assert jaxlora.adapter_partition_specs(lora_params) == FACTORS
    # linen boxes and NNX sharding names written the same way
    boxed = nn.Partitioned(params["moe"]["wo"], names=("expert", "model"))
    adapter = lora_params["moe"]["lora_wo"]
    a, b = box_factors(boxed, adapter.a, adapter.b, adapter.delta_eq, None)
    assert (a.names, b.names) == (("expert", "model", None), ("expert", None, None))
    with jax.set_mesh(mesh):
        block = _nnx_block()
        block.moe.wo = nnx.Param(block.moe.wo[...], out_sharding=("expert", "model"))
        cfg = jaxlora.LoraConfig(rank=2, targets=["moe/wo"])
        block = jaxlora.lorafy(block, cfg, X, rngs=nnx.Rngs(1))
    wo = block.moe.adapters["wo"]
    assert wo.lora_a.get_metadata()["out_sharding"] == ("expert", "model", None)
    assert wo.lora_b.get_metadata()["out_sharding"] == ("expert", None, None)
    assert wo.lora_b.sharding.spec == P("expert", None, None)


# --- Tunix llama3: its Params name mesh axes "fsdp"/"tp" (tunix's ShardingConfig) -----------


# tunix's own code reads a deprecated JAX mesh API and Variable.value on every call
@pytest.mark.filterwarnings(
    "ignore:jax.interpreters.pxla.thread_resources is deprecated:DeprecationWarning"
)
@pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning")
def test_tunix_llama3_trains_sharded_like_one_device():
    from tests.support import tunix_zoo as zoo

    mesh = jaxlora.parse_mesh("fsdp=2,tp=4")
    cfg = jaxlora.LoraConfig(rank=2, targets="all-linear")
    # tp=4 must divide the kv heads: tunix shards k/v_proj (D, K, H) as ("fsdp", "tp", None)
    size = {"num_kv_heads": zoo.HEADS, "num_layers": 1}
    single, z = zoo.build("llama3", **size), zoo.build("llama3", **size)
    state = nnx.state(z.module)
    specs = nnx.get_partition_spec(state)
    nnx.update(
        z.module, jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    )
    assert z.module.layers[0].attn.q_proj.w.sharding.spec == P("fsdp", "tp", None)

    single = jaxlora.lorafy(single.module, cfg, *single.inputs, rngs=nnx.Rngs(1))
    model = jaxlora.lorafy(z.module, cfg, *z.inputs, rngs=nnx.Rngs(1))
    specs = jaxlora.adapter_partition_specs(model)
    assert len(specs) == 8  # q/k/v/o, gate/up/down, lm_head
    assert specs["layers/0/attn/q_proj/w"] == (P("fsdp", None), P(None, "tp", None))
    assert specs["layers/0/attn/o_proj/w"] == (P("tp", None, None), P(None, "fsdp"))
    assert specs["layers/0/mlp/down_proj"] == (P("tp", None), P(None, "fsdp"))
    assert specs["lm_head/w"] == (P("fsdp", None), P(None, "tp"))
    q = model.layers[0].attn.q_proj.adapters["w"]
    assert q.lora_b.get_metadata()["out_sharding"] == (None, "tp", None)
    assert q.lora_b.sharding == NamedSharding(mesh, P(None, "tp", None))
    chex.assert_trees_all_equal(_lora_state(model), _lora_state(single))

    frozen = nnx.All(nnx.Param, nnx.Not(jaxlora.TrainableParam))
    before = _placements(nnx.state(model, frozen))
    with jax.set_mesh(mesh):
        losses = _nnx_train(model, jaxlora.shard_batch(z.tokens, mesh, "fsdp"), zoo.next_token_loss)
    ref_losses = _nnx_train(single, z.tokens, zoo.next_token_loss)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    chex.assert_trees_all_close(_lora_state(model), _lora_state(single), rtol=1e-5, atol=1e-5)
    assert jaxlora.adapter_partition_specs(model) == specs
    assert _placements(nnx.state(model, frozen)) == before
