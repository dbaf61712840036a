"""LoRA on model code nobody here wrote: every transformer family of google-tunix (NNX).

Their projections are the families' own ``Einsum`` modules (``jnp.einsum(x, self.w)``),
tied heads are ``jnp.dot(x, E.T)``, MoE experts are bare params sliced per expert or fed
to ``ragged_dot``: jaxlora must adapt them all without touching their code.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from tests.support import tunix_zoo as zoo

# tunix's own code warns (deprecated JAX and flax APIs) on every call.
pytestmark = pytest.mark.filterwarnings(zoo.PYTEST_WARNINGS)
_DOT = re.compile(r"= f32\[([\d,]+)\]\S* (?:dot|convolution)\(")


def _frozen(module):
    """Every frozen param array, as a sorted multiset of (shape, bytes)."""
    state = nnx.state(module, nnx.All(nnx.Param, nnx.Not(jaxlora.TrainableParam)))
    return sorted((x.shape, np.asarray(x).tobytes()) for x in jax.tree.leaves(state))


def _with_random_b(module):
    for _, var in nnx.iter_graph(module):
        if isinstance(var, jaxlora.LoraParam) and not var[...].any():
            var[...] = 0.1 * jax.random.normal(jax.random.key(7), var.shape)


def _train_step(tx_wrt=jaxlora.TrainableParam):
    @nnx.jit
    def step(model, opt, tokens):
        loss, grads = nnx.value_and_grad(
            lambda m: zoo.next_token_loss(m, tokens), argnums=nnx.DiffState(0, tx_wrt)
        )(model)
        opt.update(model, grads)
        return loss

    return step


def _weight_gradient_dots(model, tokens, wrt):
    """Dots in the compiled step whose output has a frozen weight's shape (``dW``)."""
    graphdef, trained, rest = nnx.split(model, wrt, ...)

    def loss(trained, rest):
        return zoo.next_token_loss(nnx.merge(graphdef, trained, rest), tokens)

    def dots_of(fn):
        hlo = jax.jit(fn).lower(trained, rest).compile().as_text()
        return {tuple(int(d) for d in m.group(1).split(",")) for m in _DOT.finditer(hlo)}

    # a forward dot can share a weight's shape (gemma4_moe: 16 tokens x top-2 rows of 2F)
    dots = dots_of(jax.grad(loss)) - dots_of(loss)
    assert dots_of(loss), "no dots found: the HLO pattern is stale"
    frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(jaxlora.TrainableParam)))
    return dots & {x.shape for x in jax.tree.leaves(frozen) if x.ndim >= 2}


@pytest.mark.parametrize("name", zoo.FAMILIES)
def test_all_linear_on_every_tunix_family(name):
    z = zoo.build(name)
    base = z.logits()
    base_jit = nnx.jit(lambda m: z.logits(m))(z.module)
    frozen = _frozen(z.module)
    cfg = jaxlora.LoraConfig(rank=2, alpha=4, targets="all-linear")
    model = jaxlora.lorafy(z.module, cfg, *z.inputs, rngs=nnx.Rngs(1))
    report = jaxlora.summary(model)
    names = [layer.path for layer in report.layers]
    # every projection the family has, as the zoo lists it, carries an adapter
    expected = {
        site.path if site.param == "kernel" else f"{site.path}/{site.param}"
        for site in zoo.PROJECTIONS[name]
        if site.role not in ("embed", "bias") and "gather" not in site.op
    }
    # gemma4's KV-shared layer owns a kv_einsum it never calls: nothing uses it to adapt
    expected -= set(zoo.UNUSED.get(name, ()))
    assert expected <= set(names), expected - set(names)
    assert any(n.endswith("q_proj/w") or "q_einsum" in n or "qkv_einsum" in n for n in names)

    chex.assert_trees_all_equal(z.logits(model), base)  # eager: bit-exact
    chex.assert_trees_all_close(nnx.jit(lambda m: z.logits(m))(model), base_jit, atol=1e-6)

    tx = nnx.Optimizer(model, optax.adam(1e-2), wrt=jaxlora.TrainableParam)
    n_opt = sum(x.size for x in jax.tree.leaves(nnx.state(tx.opt_state)))
    assert n_opt == 2 * report.trainable_params + 1
    step = _train_step()
    losses = [float(step(model, tx, z.tokens)) for _ in range(4)]
    assert losses[-1] < losses[0], losses
    assert _frozen(model) == frozen  # the base did not move

    adapted = z.logits(model)
    merged = jaxlora.merge(model)
    chex.assert_trees_all_close(z.logits(merged), adapted, rtol=1e-5, atol=1e-5)
    assert not _weight_gradient_dots(model, z.tokens, jaxlora.TrainableParam)


def test_the_weight_gradient_detector_sees_full_fine_tuning():
    z = zoo.build("llama3")
    assert _weight_gradient_dots(z.module, z.tokens, nnx.Param)


@pytest.mark.parametrize("name", ["llama3", "gemma3", "gemma4_moe"])
def test_attention_only_targets_and_merge_with_a_learned_update(name):
    z = zoo.build(name)
    cfg = jaxlora.LoraConfig(rank=2, targets=["*/attn/*"])
    model = jaxlora.lorafy(z.module, cfg, *z.inputs, rngs=nnx.Rngs(1))
    report = jaxlora.summary(model)
    assert report.layers and all("/attn/" in layer.path for layer in report.layers)
    assert report.not_adapted and "seen, not adapted" in str(report)
    _with_random_b(model)
    adapted = z.logits(model)
    assert not np.allclose(adapted, z.logits(jaxlora.merge(model)) + 1.0)
    chex.assert_trees_all_close(z.logits(jaxlora.merge(model)), adapted, rtol=1e-5, atol=1e-5)
    restored = jaxlora.unmerge(jaxlora.merge(model), model)
    chex.assert_trees_all_close(z.logits(restored), adapted, rtol=1e-5, atol=1e-5)


def test_tied_embedding_is_adapted_when_named_and_the_head_follows():
    z = zoo.build("gemma3")
    cfg = jaxlora.LoraConfig(rank=2, targets=["input_embedding"])
    model = jaxlora.lorafy(z.module, cfg, *z.inputs, rngs=nnx.Rngs(1))
    assert [layer.path for layer in jaxlora.summary(model).layers] == ["embedder/input_embedding"]
    _with_random_b(model)
    # lookup (gather) and tied output head (x @ E.T) both see E + ΔE, as the merge does
    chex.assert_trees_all_close(
        z.logits(model), z.logits(jaxlora.merge(model)), rtol=1e-5, atol=1e-5
    )


def test_misspelt_target_on_a_tunix_model_lists_the_projections():
    z = zoo.build("qwen2")
    cfg = jaxlora.LoraConfig(targets=["q_proj", "v_porj"])
    with pytest.raises(ValueError, match=r"(?s)'v_porj' matches no layer.*attn/v_proj/w"):
        jaxlora.lorafy(z.module, cfg, *z.inputs, rngs=nnx.Rngs(1))


def test_without_example_inputs_nnx_says_what_it_did_not_examine():
    z = zoo.build("llama3")
    with pytest.warns(UserWarning, match=r"weights outside Flax's layers were not examined"):
        jaxlora.lorafy(z.module, jaxlora.LoraConfig(targets=["gate_proj"]), rngs=nnx.Rngs(1))


def test_moe_experts_get_per_expert_factors():
    z = zoo.build("gemma4_moe")
    cfg = jaxlora.LoraConfig(rank=2, targets=["*/moe/gating_einsum", "*/moe/linear"])
    model = jaxlora.lorafy(z.module, cfg, *z.inputs, rngs=nnx.Rngs(1))
    rows = {layer.path.split("/", 2)[-1]: layer for layer in jaxlora.summary(model).layers}
    gating = rows["moe/gating_einsum"]  # (E, 2, F, D) used as ragged_dot((E, D, 2F))
    assert gating.a_shape == (zoo.EXPERTS, zoo.EMBED, 2)
    assert gating.b_shape == (zoo.EXPERTS, 2, 2, zoo.EXPERT_HIDDEN)
    _with_random_b(model)
    chex.assert_trees_all_close(
        z.logits(model), z.logits(jaxlora.merge(model)), rtol=1e-5, atol=1e-5
    )
    assert jnp.isfinite(z.logits(model)).all()
