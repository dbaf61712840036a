"""The benchmark's custom-einsum GPT-2 and its MoE variant under jaxlora (tiny sizes).

Same math as ``gpt2.GPT2`` (logits on copied weights), every projection adapted (head-shaped
einsum weights, expert-stacked ``ragged_dot`` weights, the router), identity at
initialisation, and a compiled LoRA step without a weight-gradient dot.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import jaxlora
from experiments import bench_common, bench_jaxlora, gpt2, gpt2_einsum
from tests.support.steps import compiled_dot_shapes, full_finetune_step

# Dimensions chosen so that no activation or adapter-gradient dot has as many elements as a
# frozen weight (see `weight_gradient_dots`): d_model 20 = 2 heads x 10, MLP 36, 4 experts of
# width 36 // 2 = 18, 14 tokens (28 routed), rank 3.
CONFIG = gpt2.GPT2Config(vocab=52, d_model=20, layers=1, heads=2, mlp=36, seq=7)
MOE = gpt2_einsum.MoEConfig(experts=4, top_k=2)
RANK = 3
TOKENS = jax.random.randint(jax.random.key(0), (2, 7), 0, CONFIG.vocab)
MODELS = {"gpt2-einsum": gpt2_einsum.GPT2(CONFIG), "gpt2-moe": gpt2_einsum.GPT2(CONFIG, MOE)}


@functools.cache
def setup(name: str):
    """``(model, params, lora_model, lora_params)`` with the benchmark's ``all`` targets."""
    model = MODELS[name]
    params = jax.jit(model.init)(jax.random.key(0), TOKENS)["params"]
    w = bench_common.Workload(rank=RANK, model=name, experts=MOE.experts, top_k=MOE.top_k)
    cfg = bench_jaxlora.lora_config("all", w)
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, TOKENS, key=jax.random.key(1))
    return model, params, lora_model, lora_params


def loss_of(apply):
    def loss_fn(params, tokens):
        return gpt2.cross_entropy(apply({"params": params}, tokens), tokens)

    return loss_fn


def weight_gradient_dots(jitted, params, *args) -> set[tuple[int, ...]]:
    """Dots of the compiled step with as many elements as a contracted frozen weight.

    The HLO guard of ``tests/test_train.py``, by element count: XLA writes the gradient of a
    ``(d, heads, head_dim)`` weight as a ``(d, heads * head_dim)`` dot.
    """
    dots = compiled_dot_shapes(jitted, *args)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    sizes = {x.size for path, x in leaves if jax.tree_util.keystr(path).endswith("['w']")}
    return {d for d in dots if math.prod(d) in sizes}


def test_einsum_model_is_the_dense_model():
    """Weights of ``gpt2.GPT2`` reshaped into the einsum model give the same logits."""
    dense = gpt2.GPT2(CONFIG)
    p = jax.jit(dense.init)(jax.random.key(0), TOKENS)["params"]
    n, h, d = CONFIG.heads, CONFIG.d_model // CONFIG.heads, CONFIG.d_model
    q = {k: p[k] for k in ("wte", "wpe", "ln_f")} | {"lm_head": {"w": p["lm_head"]["kernel"]}}
    for i in range(CONFIG.layers):
        block, attn = p[f"block_{i}"], p[f"block_{i}"]["attn"]
        heads = {
            name: {
                "w": attn[name]["kernel"].reshape(d, n, h),
                "b": attn[name]["bias"].reshape(n, h),
            }
            for name in ("query", "key", "value")
        }
        out = {"w": attn["out"]["kernel"].reshape(n, h, d), "b": attn["out"]["bias"]}
        mlp = {k: {"w": v["kernel"], "b": v["bias"]} for k, v in block["mlp"].items()}
        q[f"block_{i}"] = {"ln1": block["ln1"], "ln2": block["ln2"], "mlp": mlp}
        q[f"block_{i}"]["attn"] = heads | {"out": out}
    chex.assert_trees_all_close(
        jax.jit(MODELS["gpt2-einsum"].apply)({"params": q}, TOKENS),
        jax.jit(dense.apply)({"params": p}, TOKENS),
        rtol=1e-5,
        atol=1e-5,
    )


def test_moe_routes_every_token_to_top_k_experts():
    params = jax.jit(MODELS["gpt2-moe"].init)(jax.random.key(0), TOKENS)["params"]
    mlp = params["block_0"]["mlp"]
    assert mlp["router"]["w"].shape == (20, 4)
    assert mlp["up"]["w"].shape == (4, 20, 18) and mlp["down"]["w"].shape == (4, 18, 20)
    # zero experts: the MLP adds nothing, whatever the routing
    zeroed = jax.tree.map(jnp.zeros_like, mlp)
    x = jax.random.normal(jax.random.key(2), (2, 7, 20))
    apply = jax.jit(gpt2_einsum.MoE(CONFIG, MOE.experts, MOE.top_k).apply)
    assert not apply({"params": zeroed}, x).any()
    assert apply({"params": mlp}, x).any()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_projection_is_adapted(name):
    _, _, _, lora_params = setup(name)
    layers = {row.path: row for row in jaxlora.summary(lora_params).layers}
    per_block = {"query", "key", "value", "out", "up", "down"}
    per_block |= {"router"} if name == "gpt2-moe" else set()
    assert {p.split("/")[-2] for p in layers} == per_block
    assert len(layers) == CONFIG.layers * len(per_block)
    q, out = layers["block_0/attn/query/w"], layers["block_0/attn/out/w"]
    assert (q.a_shape, q.b_shape) == ((20, RANK), (RANK, 2, 10))
    assert (out.a_shape, out.b_shape) == ((2, 10, RANK), (RANK, 20))
    if name == "gpt2-moe":
        up, router = layers["block_0/mlp/up/w"], layers["block_0/mlp/router/w"]
        assert (up.a_shape, up.b_shape) == ((4, 20, RANK), (4, RANK, 18))
        assert (router.a_shape, router.b_shape) == ((20, RANK), (RANK, 4))


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_at_init(name):
    """Bit-exact eagerly; under jit within float rounding (XLA may fuse ``+ x@A@0``)."""
    model, params, lora_model, lora_params = setup(name)
    base = model.apply({"params": params}, TOKENS)
    assert (lora_model.apply({"params": lora_params}, TOKENS) == base).all()
    jitted = jax.jit(lambda p: lora_model.apply({"params": p}, TOKENS))(lora_params)
    chex.assert_trees_all_close(jitted, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_no_weight_gradient_dot_in_the_lora_step(name):
    model, params, lora_model, lora_params = setup(name)
    tx = jaxlora.optimizer(optax.adamw(1e-3), lora_params)
    step = jaxlora.make_train_step(loss_of(lora_model.apply), tx, donate=False)
    opt_state = tx.init(lora_params)
    assert not weight_gradient_dots(step, params, lora_params, opt_state, TOKENS)
    # the detector does see full fine-tuning's weight gradients, expert weights included
    full_tx = optax.adamw(1e-3)
    full = full_finetune_step(loss_of(model.apply), full_tx)
    found = weight_gradient_dots(full, params, params, full_tx.init(params), TOKENS)
    assert (20, 20) in found  # query/key/value/out, as (d_model, heads * head_dim)
    if name == "gpt2-moe":
        assert {(4, 20, 18), (4, 18, 20)} <= found
    # and the LoRA step trains: the loss falls, the frozen weights stay as they were
    losses = []
    new = lora_params
    for _ in range(3):
        new, opt_state, loss = step(new, opt_state, TOKENS)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(jaxlora.split(new)[1], jaxlora.split(lora_params)[1])
