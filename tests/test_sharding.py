"""Sharded adapters on a 2x4 (data x model) mesh of 8 fake CPU devices, Auto and Explicit."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, reshard
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora._sharding import factor_axes
from tests.support import models

KEY = jax.random.key(0)
FSDP_TP = [  # FSDP over "data" and Megatron-style tensor parallelism over "model"
    ("re:.*(query|key|value|up)/kernel", P("data", "model")),
    ("re:.*(out|down)/kernel", P("model", "data")),
    ("embed/embedding", P("model", "data")),
]


def _mesh(axis_type=AxisType.Auto):
    return jaxlora.parse_mesh("data=2,model=4", axis_type=axis_type)


def _lm_loss(apply):
    def loss_fn(params, ids):
        logits = apply({"params": params}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return loss_fn


def _train(lora_model, params, batch, steps=3, loss=_lm_loss):
    tx = jaxlora.optimizer(optax.adam(1e-2), params)
    step = jaxlora.make_train_step(loss(lora_model.apply), tx)
    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, batch)
        losses.append(float(value))
    return params, opt_state, losses, step


def _host(tree):
    return jax.device_get(jaxlora.split(tree)[0])


@pytest.mark.parametrize(
    ("kernel", "delta_eq", "rank_axis", "a", "b"),
    [
        (("data", "model"), "...ar,...rb->...ab", None, ("data", None), (None, "model")),
        # DenseGeneral (in: 2 axes, out: 2 axes), stacked by nn.scan over "layers"
        (
            ("layers", "x", None, "y", "z"),
            "...abr,...rcd->...abcd",
            None,
            ("layers", "x", None, None),
            ("layers", None, "y", "z"),
        ),
        # Einsum "btnh,nhd->btd": n is contracted, h too, d kept
        (
            (None, "model", "data"),
            "...nhr,...rd->...nhd",
            None,
            (None, "model", None),
            (None, "data"),
        ),
        # Einsum with a batch (per-head) label: "bnd,ndh->bnh"
        (
            ("model", None, "data"),
            "...ndr,...nrh->...ndh",
            None,
            ("model", None, None),
            ("model", None, "data"),
        ),
        # the rank sharded, except in a factor that already uses the axis
        (("data", "model"), "...ar,...rb->...ab", "model", ("data", "model"), (None, "model")),
        # a PartitionSpec may leave trailing axes out
        (("data",), "...ar,...rb->...ab", None, ("data", None), (None, None)),
    ],
)
def test_factor_axes_follow_the_kernel(kernel, delta_eq, rank_axis, a, b):
    assert factor_axes(kernel, delta_eq, rank_axis) == (a, b)


def test_sharded_training_equals_one_device_and_keeps_kernels_sharded():
    mesh = _mesh()
    model = models.TinyLM(vocab=64, d_model=32, heads=4, layers=1)
    ids = jax.random.randint(KEY, (8, 12), 0, 64)
    params = jax.device_get(model.init(KEY, ids)["params"])
    cfg = jaxlora.LoraConfig(rank=4, targets=["all-linear", "embed"])
    sharded = jaxlora.shard_params(params, mesh, FSDP_TP)
    # Created in place: copying an adapter from one device onto the mesh would be caught.
    with jax.transfer_guard_device_to_device("disallow_explicit"):
        lora_model, lora_sharded = jaxlora.lorafy(model, sharded, cfg, ids, key=KEY)
    _, lora_single = jaxlora.lorafy(model, params, cfg, ids, key=KEY)
    chex.assert_trees_all_equal(_host(lora_sharded), _host(lora_single))

    specs = jaxlora.adapter_partition_specs(lora_sharded)
    assert specs["block_0/up"] == (P("data", None), P(None, "model"))
    assert specs["block_0/down"] == (P("model", None), P(None, "data"))
    assert specs["embed"] == (P("model", None), P(None, "data"))
    adapter = lora_sharded["block_0"]["attn"]["query"]["lora"]
    assert adapter.a.sharding == NamedSharding(mesh, P("data", None))
    assert adapter.b.sharding == NamedSharding(mesh, P(None, "model"))

    batch = jaxlora.shard_batch(ids, mesh)
    chex.assert_trees_all_equal(
        batch, jaxlora.shard_batch(np.asarray(ids), mesh, process_local=False)
    )
    assert batch.sharding == NamedSharding(mesh, P("data"))
    trained, opt_state, losses, step = _train(lora_model, lora_sharded, batch)
    reference, _, ref_losses, _ = _train(lora_model, lora_single, ids)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(_host(trained), _host(reference), rtol=1e-5, atol=1e-6)

    compiled = step.lower(trained, opt_state, batch).compile()
    trainable, frozen = jaxlora.split(trained)
    (trainable_in, frozen_in, state_in, _), _ = compiled.input_shardings
    trainable_out, state_out, _ = compiled.output_shardings
    leaves = jax.tree_util.tree_leaves_with_path((trainable, opt_state))
    ins = jax.tree.leaves((trainable_in, state_in))
    outs = jax.tree.leaves((trainable_out, state_out))
    for (path, x), s_in, s_out in zip(leaves, ins, outs, strict=True):
        assert s_out.is_equivalent_to(s_in, x.ndim), (jax.tree_util.keystr(path), s_in, s_out)
        assert s_in.is_equivalent_to(x.sharding, x.ndim), (jax.tree_util.keystr(path), x.sharding)
    # frozen kernels are inputs only (never outputs), and enter the step sharded as they are
    frozen_leaves = jax.tree_util.tree_leaves_with_path(frozen)
    kernels = [
        (s, x)
        for (p, x), s in zip(frozen_leaves, jax.tree.leaves(frozen_in), strict=True)
        if "kernel" in str(p)
    ]
    assert len(kernels) == 6
    for s, x in kernels:
        assert not s.is_fully_replicated and s.is_equivalent_to(x.sharding, x.ndim)


def test_restored_rng_key_is_replicated_on_the_params_mesh(tmp_path):
    """A restored key must enter a jitted step next to mesh-sharded params (was: device 0)."""
    mesh = _mesh()
    model = models.TinyLM(vocab=64, d_model=32, heads=4, layers=1)
    ids = jax.random.randint(KEY, (8, 12), 0, 64)
    params = jaxlora.shard_params(jax.device_get(model.init(KEY, ids)["params"]), mesh, FSDP_TP)
    _, params = jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=4), ids, key=KEY)
    tx = jaxlora.optimizer(optax.adam(1e-2), params)
    with jaxlora.TrainCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, params, tx.init(params), jax.random.key(3))
        resumed = ckpt.restore_latest(params, tx.init(params))
    assert resumed.rng.sharding == NamedSharding(mesh, P())
    chex.assert_trees_all_equal(
        jax.random.key_data(resumed.rng), jax.random.key_data(jax.random.key(3))
    )
    noise = jax.jit(lambda p, k: jax.random.normal(k, p.shape) + p)
    kernel = resumed.params["block_0"]["up"]["kernel"]
    assert noise(kernel, resumed.rng).sharding.mesh == mesh


RULES = (("embed", "data"), ("mlp", "model"), ("layers", None))


def _logical(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class _LogicalBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.gelu(nn.Dense(32, kernel_init=_logical(("embed", "mlp")), name="up")(x))
        return x + nn.Dense(16, kernel_init=_logical(("mlp", "embed")), name="down")(h), None


class _ScannedLogical(nn.Module):
    """nn.scan over logically partitioned blocks, plus a head with mesh-axis names."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _LogicalBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(name="layers")(x, None)
        head_init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        return nn.Dense(8, kernel_init=head_init, name="head")(x)


def test_boxed_scanned_params_get_boxed_adapters_with_derived_names():
    mesh, model, x = _mesh(), _ScannedLogical(), jnp.ones((8, 16))
    params = jaxlora.shard_params(model.init(KEY, x)["params"], mesh, rules=RULES)
    with nn.logical_axis_rules(RULES):
        lora_model, lora_params = jaxlora.lorafy(
            model, params, jaxlora.LoraConfig(rank=4), x, key=KEY
        )
        base = model.apply({"params": params}, x)
        chex.assert_trees_all_equal(lora_model.apply({"params": lora_params}, x), base)
    names = nn.get_partition_spec(lora_params)
    assert names["layers"]["up"]["lora"].a == P("layers", "embed", None)
    assert names["layers"]["up"]["lora"].b == P("layers", None, "mlp")
    assert names["head"]["lora"].a == P(None, None)
    assert names["head"]["lora"].b == P(None, "model")
    specs = jaxlora.adapter_partition_specs(lora_params)  # the arrays: mesh axes
    assert specs["layers/up"] == (P(None, "data", None), P(None, None, "model"))
    assert specs["layers/down"] == (P(None, "model", None), P(None, None, "data"))
    assert specs["head"] == (P(None, None), P(None, "model"))
    assert lora_params["layers"]["up"]["kernel"].value.sharding.spec == P(None, "data", "model")


class _ExplicitDense(nn.Dense):
    """A Dense written for Explicit sharding: gathers its kernel and names its output."""

    compute: tuple = (None, None)
    out: tuple = ("data", None)

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        y = jnp.einsum("bi,io->bo", x, reshard(kernel, P(*self.compute)), out_sharding=P(*self.out))
        return y + bias


class _MLP(nn.Module):
    explicit: bool = False

    @nn.compact
    def __call__(self, x):
        if self.explicit:  # FSDP-stored kernels, gathered over "data" for compute
            up = _ExplicitDense(32, compute=(None, "model"), out=("data", "model"), name="up")
            down = _ExplicitDense(16, compute=("model", None), out=("data", None), name="down")
        else:
            up, down = nn.Dense(32, name="up"), nn.Dense(16, name="down")
        return down(nn.gelu(up(x)))


def _mse(apply):
    def loss_fn(params, batch):
        pred = apply({"params": params}, batch[0], rngs={"dropout": KEY})  # LoRA dropout
        return jnp.mean((pred - batch[1]) ** 2)

    return loss_fn


def test_explicit_sharding_linen_trains_like_one_device():
    """Row-parallel A contracts a sharded axis and dropout masks a sharded input: neither may
    break sharding in types."""
    mesh = _mesh(AxisType.Explicit)
    x, y = jax.random.normal(KEY, (8, 16)), jax.random.normal(jax.random.key(1), (8, 16))
    params = jax.device_get(_MLP().init(KEY, x)["params"])
    cfg = jaxlora.LoraConfig(rank=4, dropout=0.25)
    lora_single, lp_single = jaxlora.lorafy(_MLP(), params, cfg, x, key=KEY)
    reference, _, ref_losses, _ = _train(lora_single, lp_single, (x, y), loss=_mse)
    specs = [("up/kernel", P("data", "model")), ("down/kernel", P("model", "data"))]
    sharded = jaxlora.shard_params(params, mesh, specs)
    with jax.set_mesh(mesh):
        lora_model, lp = jaxlora.lorafy(_MLP(explicit=True), sharded, cfg, x, key=KEY)
        batch = jaxlora.shard_batch((x, y), mesh)
        trained, _, losses, _ = _train(lora_model, lp, batch, loss=_mse)
    assert jax.typeof(trained["down"]["lora"].a).sharding.spec == P("model", None)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(_host(trained), _host(reference), rtol=1e-5, atol=1e-6)


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            16, 32, kernel_init=nnx.with_partitioning(init, ("data", "model")), rngs=rngs
        )
        self.down = nnx.Linear(
            32, 16, kernel_init=nnx.with_partitioning(init, ("model", "data")), rngs=rngs
        )

    def __call__(self, x):
        explicit = bool(jax.typeof(x).sharding.mesh.explicit_axes)
        h = nnx.gelu(self.up(x, out_sharding=P("data", "model") if explicit else None))
        return self.down(h, out_sharding=P("data", None) if explicit else None)


def _nnx_train(model, x, steps=2):
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=jaxlora.TrainableParam)

    @nnx.jit
    def step(model, opt, x):
        diff = nnx.DiffState(0, jaxlora.TrainableParam)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2), argnums=diff)(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt, x)) for _ in range(steps)]


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_nnx_adapters_follow_kernel_sharding(axis_type):
    x, cfg = jax.random.normal(KEY, (8, 16)), jaxlora.LoraConfig(rank=4)
    with nnx.use_eager_sharding(False):
        single = jaxlora.lorafy(_NnxMLP(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    mesh = _mesh(axis_type)
    with jax.set_mesh(mesh):
        model = jaxlora.lorafy(_NnxMLP(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
        assert jaxlora.adapter_partition_specs(model) == {
            "up": (P("data", None), P(None, "model")),
            "down": (P("model", None), P(None, "data")),
        }
        assert model.down.lora_b.get_metadata()["out_sharding"] == (None, "data")
        losses = _nnx_train(model, jaxlora.shard_batch(x, mesh))
    np.testing.assert_allclose(losses, _nnx_train(single, x), rtol=1e-5)
    chex.assert_trees_all_close(
        jax.device_get(nnx.to_pure_dict(nnx.state(model, jaxlora.LoraParam))),
        jax.device_get(nnx.to_pure_dict(nnx.state(single, jaxlora.LoraParam))),
        rtol=1e-5,
        atol=1e-6,
    )


def test_rank_axis_shards_the_rank():
    mesh, model, x = _mesh(), models.MLP(features=(32, 16)), jnp.ones((4, 16))
    params = jaxlora.shard_params(model.init(KEY, x)["params"], mesh, [("kernel", P("data"))])
    _, lp = jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=4), x, key=KEY, rank_axis="model")
    assert jaxlora.adapter_partition_specs(lp)["dense_0"] == (P("data", "model"), P("model", None))
    with pytest.raises(
        ValueError,
        match=r"rank 6 of layer 'dense_0' is not divisible by mesh axis 'model' \(size 4\)",
    ):
        jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=6), x, key=KEY, rank_axis="model")
    with pytest.raises(ValueError, match=r"rank_axis='tensor' is not an axis.*\('data', 'model'\)"):
        jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=4), x, key=KEY, rank_axis="tensor")


def test_bad_sharding_inputs_are_clear_errors():
    mesh = _mesh()
    params = {"dense": {"kernel": np.zeros((6, 8), np.float32)}}
    not_divisible = r"dimension 0 \(size 6\) is not divisible by mesh axis 'model' \(size 4\)"
    with pytest.raises(ValueError, match=r"'dense/kernel' of shape \(6, 8\).*" + not_divisible):
        jaxlora.shard_params(params, mesh, [("kernel", P("model", None))])
    with pytest.raises(
        ValueError, match=r"'tensor' is not an axis of the mesh \(axes \('data', 'model'\)\)"
    ):
        jaxlora.shard_params(params, mesh, [("kernel", P(None, "tensor"))])
    with pytest.raises(ValueError, match=r"axis rule \('mlp', 'tensor'\) names mesh axis 'tensor'"):
        jaxlora.shard_params(params, mesh, rules=[("mlp", "tensor")])
    with pytest.raises(
        ValueError, match=r"leaf '1' has batch size 5, not divisible by mesh axis 'data' \(size 2"
    ):
        jaxlora.shard_batch((np.zeros((8, 3)), np.zeros((5, 3))), mesh)
    with pytest.raises(
        ValueError, match=r"batch size 6, not divisible by mesh axis 'model' \(size 4\)"
    ):
        jaxlora.shard_batch(np.zeros((6, 3)), mesh, "model", process_local=False)
    with pytest.raises(ValueError, match=r"'batch' is not an axis of the mesh"):
        jaxlora.shard_batch(np.zeros((8, 3)), mesh, axis="batch")
    with pytest.raises(ValueError, match=r"cannot read 'model:4'.*name=size"):
        jaxlora.parse_mesh("data=2,model:4")
    assert dict(jaxlora.parse_mesh("data=-1,model=4").shape) == {"data": 2, "model": 4}
