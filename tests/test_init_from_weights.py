"""PiSSA and OLoRA initialisation (`LoraConfig(init=...)`) against real PEFT in torch.

Each weight is compared to what PEFT computes on the same matrix (a torch ``nn.Linear``
whose ``(out, in)`` weight is the jaxlora weight with its input axes and its output axes
each flattened, per stacked layer): A, B (up to the sign of a singular pair, which LAPACK
picks) and the residual base weight.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxlora
from tests.support import models, peft_models

KEY = jax.random.key(0)
IDS = peft_models.ids()
X = jax.random.normal(jax.random.key(1), (2, 5, 16))
TOLERANCE = 2e-5  # the residual: measured up to 1.1e-5 (the scanned kernel below)
# Singular vectors move by (float32 eps) / (gap between singular values): two LAPACK
# calls differ by up to 1.3e-5 on a (32, 128) kernel with close singular values.
FACTOR_TOLERANCE = 5e-5
INITS = ["pissa", "olora"]


def _peft_init(w_out_in: np.ndarray, rank: int, alpha: float, init: str):
    """PEFT's ``(lora_A (r, in), lora_B (out, r), residual (out, in))`` of one matrix."""
    out_features, in_features = w_out_in.shape
    linear = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
    with torch.no_grad():
        linear[0].weight.copy_(torch.from_numpy(np.array(w_out_in)))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init)
    layer = peft.get_peft_model(linear, config).base_model.model[0]
    return tuple(
        t.detach().numpy()
        for t in (
            layer.lora_A["default"].weight,
            layer.lora_B["default"].weight,
            layer.base_layer.weight,
        )
    )


def _check_against_peft(kernel, residual, a, b, *, stack: int, n_in: int, rank, alpha, init):
    """Compares one jaxlora weight (``stack`` leading stacked axes, then ``n_in`` input axes
    for A) with PEFT slice by slice."""
    kernel, residual, a, b = (np.asarray(jax.device_get(x)) for x in (kernel, residual, a, b))
    lead = kernel.shape[:stack]
    fan_in = int(np.prod(a.shape[stack:-1]))
    for index in np.ndindex(*lead):
        w = kernel[index].reshape(fan_in, -1).T
        want_a, want_b, want_w = _peft_init(w, rank, alpha, init)
        got_a, got_b = a[index].reshape(fan_in, rank).T, b[index].reshape(rank, -1).T
        # A singular pair's sign is LAPACK's choice (torch's and XLA's calls may differ):
        # flipping row i of A with column i of B leaves B·A, the residual and training alike.
        sign = np.sign(np.sum(got_a * want_a, axis=1))
        np.testing.assert_allclose(sign[:, None] * got_a, want_a, atol=FACTOR_TOLERANCE)
        np.testing.assert_allclose(got_b * sign[None, :], want_b, atol=FACTOR_TOLERANCE)
        np.testing.assert_allclose(residual[index].reshape(fan_in, -1).T, want_w, atol=TOLERANCE)


class EinsumBlock(nn.Module):
    """Raw einsum weights, as the gemma library writes them; ``gating`` stacks two matrices."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (16, 2, 8))
        gating = self.param("gating", nn.initializers.normal(), (2, 16, 32))
        q = jnp.einsum("btd,dnh->btnh", x, w).reshape(*x.shape[:2], 16)
        return jnp.einsum("btd,df->btf", q, gating[0]) * jnp.einsum("btd,df->btf", x, gating[1])


LINEN_CASES = {
    # name: (model, inputs, targets, {weight path: (stack axes, input axes)})
    "dense": (peft_models.Net(), IDS, ["q_proj"], {"layers_0/q_proj/kernel": (0, 1)}),
    "einsum_densegeneral": (
        models.FlaxAttentionModel(),
        jnp.ones((2, 3, 16)),
        ["proj", "merge_heads"],
        {"proj/kernel": (0, 1), "merge_heads/kernel": (0, 2)},
    ),
    "scanned": (
        models.ScannedLM(layers=2),
        jnp.zeros((2, 6), jnp.int32),
        ["up"],
        {"layers/block/up/kernel": (1, 1)},
    ),
    "custom_einsum_stacked": (EinsumBlock(), X, ["w", "gating"], {"w": (0, 1), "gating": (1, 1)}),
}


def _at(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _adapter(params, path):
    module, _, weight = path.rpartition("/")
    layer = _at(params, module) if module else params
    return layer["lora" if weight in ("kernel", "embedding") else f"lora_{weight}"]


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("case", sorted(LINEN_CASES))
def test_linen_matches_peft_and_is_identity(case, init):
    model, x, targets, weights = LINEN_CASES[case]
    variables = model.init(KEY, x)
    params = variables["params"]
    cfg = jaxlora.LoraConfig(rank=2, alpha=4, targets=targets, init=init)
    lora_model, lora_vars = jaxlora.lorafy(model, variables, cfg, x, key=KEY)
    lora_params = lora_vars["params"]
    for path, (stack, n_in) in weights.items():
        adapter = _adapter(lora_params, path)
        assert adapter.a.ndim == stack + n_in + 1
        _check_against_peft(
            _at(params, path),
            _at(lora_params, path),
            adapter.a,
            adapter.b,
            stack=stack,
            n_in=n_in,
            rank=2,
            alpha=4,
            init=init,
        )
    # identity at init: the adapted model is the base model (measured 6e-8 on Net)
    want = model.apply(variables, x)
    chex.assert_trees_all_close(lora_model.apply(lora_vars, x), want, atol=1e-5)
    chex.assert_trees_all_close(jaxlora.merge(lora_vars), variables, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_nnx_matches_peft_and_is_identity(init):
    model = models.NnxModel(nnx.Rngs(0))
    base = nnx.clone(model)
    ids = jnp.asarray(IDS % 32)
    cfg = jaxlora.LoraConfig(
        rank=2, alpha=4, targets=["layers/*", "split_heads", "merge_heads"], init=init
    )
    model = jaxlora.lorafy(model, cfg, rngs=nnx.Rngs(1))
    for name, n_in in (("layers/0", 1), ("split_heads", 1), ("merge_heads", 2)):
        path = tuple(int(p) if p.isdigit() else p for p in name.split("/"))
        wrapper, old = model, base
        for p in path:
            wrapper = wrapper[p] if isinstance(p, int) else getattr(wrapper, p)
            old = old[p] if isinstance(p, int) else getattr(old, p)
        _check_against_peft(
            old.kernel[...],
            wrapper.base.kernel[...],
            wrapper.lora_a[...],
            wrapper.lora_b[...],
            stack=0,
            n_in=n_in,
            rank=2,
            alpha=4,
            init=init,
        )
    chex.assert_trees_all_close(model(ids), base(ids), atol=1e-5)


def test_pissa_niter_approximates_the_svd_and_is_reproducible():
    # a weight with a clear gap after its 2 leading singular values
    u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 16)))
    v, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))
    s = np.array([4.0, 3.0, 0.1, 0.08, 0.05, 0.03, 0.02, 0.01])
    kernel = jnp.asarray((u[:, :8] * s) @ v.T, jnp.float32)  # (in=16, out=8)
    params = {"dense": {"kernel": kernel, "bias": jnp.zeros(8)}}
    model = nn.Dense(8)
    x = jnp.ones((2, 16))
    results = {}
    for init in ("pissa", "pissa_niter_4", "pissa_niter_4 again"):
        cfg = jaxlora.LoraConfig(rank=2, alpha=4, init=init.split()[0])
        _, p = jaxlora.lorafy(model, params["dense"], cfg, x, key=jax.random.key(len(init)))
        results[init] = p
    exact, approx, again = results.values()
    chex.assert_trees_all_close(approx, again)  # seeded from the layer's name, not the key
    chex.assert_trees_all_close(approx["kernel"], exact["kernel"], atol=1e-4)
    chex.assert_trees_all_close(jaxlora.merge(approx), params["dense"], atol=1e-5)


class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), name="conv")(x)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_embeddings_and_convs_are_refused_by_name(init):
    model = peft_models.Net()
    params = model.init(KEY, IDS)["params"]
    cfg = jaxlora.LoraConfig(targets=["q_proj", "embed"], rank=2, init=init)
    with pytest.raises(ValueError, match=r"cannot initialise layer 'embed': PEFT defines it"):
        jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    x = jnp.ones((1, 6, 6, 3))
    conv_params = Conv().init(KEY, x)["params"]
    with pytest.raises(
        ValueError, match=r"layer 'conv': PEFT defines it for linear layers only \(its Conv layers"
    ):
        jaxlora.lorafy(Conv(), conv_params, jaxlora.LoraConfig(rank=2, init=init), x, key=KEY)
    with pytest.raises(ValueError, match=r"cannot initialise layer 'embed'"):
        nnx_model = models.NnxModel(nnx.Rngs(0))
        jaxlora.lorafy(
            nnx_model, jaxlora.LoraConfig(targets=["embed"], rank=2, init=init), rngs=nnx.Rngs(0)
        )


@pytest.mark.parametrize("bad", ["svd", "pissa_niter_", "pissa_niter_0", "pissa_niter_x", "OLoRA"])
def test_unknown_inits_are_refused(bad):
    with pytest.raises(ValueError, match=r"unknown init=.*'pissa_niter_<N>'"):
        jaxlora.LoraConfig(init=bad)


@pytest.mark.parametrize("init", INITS)
def test_sharded_kernels_decompose_in_place(init):
    mesh = jaxlora.parse_mesh("data=2,model=4")
    model = models.TinyLM()
    ids = jnp.zeros((2, 8), jnp.int32)
    params = model.init(KEY, ids)["params"]
    sharded = jaxlora.shard_params(params, mesh, [("re:.*(query|up)/kernel", P("data", "model"))])
    cfg = jaxlora.LoraConfig(rank=4, alpha=8, targets=["query", "up"], init=init)
    _, plain = jaxlora.lorafy(model, params, cfg, ids, key=KEY)
    _, placed = jaxlora.lorafy(model, sharded, cfg, ids, key=KEY)
    layer = placed["block_0"]["attn"]["query"]
    assert layer["kernel"].sharding == sharded["block_0"]["attn"]["query"]["kernel"].sharding
    assert layer["lora"].a.sharding.spec == P("data", None)
    assert layer["lora"].b.sharding.spec == P(None, "model")
    chex.assert_trees_all_close(jax.device_get(placed), plain, atol=1e-5)
