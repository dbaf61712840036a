"""The GPT-2 of ``gpt2.py`` written a second time with the model's own einsum modules, and a
mixture-of-experts variant of it.

This is how Tunix, MaxText and the ``gemma`` library write their transformers: no
``nn.Dense``, but a small :class:`Einsum` module holding ``self.param("w", ...)`` applied with
``jnp.einsum``, attention weights kept with their head axes (``(d_model, heads, head_dim)``
for query/key/value, ``(heads, head_dim, d_model)`` for the output). With ``experts=0`` the
model is :class:`gpt2.GPT2` in other clothes: same layer names, same sizes, same math (a
test checks the logits on copied weights), hence the same FLOPs. With ``experts > 0`` each
MLP becomes a mixture of experts in the MaxText/Mixtral "sparse" pattern: a bias-free
``router``, top-k routing with the gates a softmax over the chosen logits, tokens sorted by
expert and both expert weights ``(experts, d_model, f)``/``(experts, f, d_model)`` applied
with ``jax.lax.ragged_dot`` (no capacity limit, no dropped tokens, no load-balancing loss).
Each expert's hidden width is ``mlp // top_k``, so a token's active expert FLOPs equal the
dense MLP's.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from experiments.gpt2 import LAYER_NORM_EPS, GPT2Config, embed


def _labels(eq: str) -> tuple[str, str, str]:
    """``(input, weight, output)`` labels of a two-operand einsum such as ``"btd,dnh->btnh"``."""
    operands, out = eq.replace(" ", "").split("->")
    x, w = operands.split(",")
    return x, w, out


def lecun_normal(weight: str, x: str, batch: str = "") -> nn.initializers.Initializer:
    """``nn.Dense``'s kernel init (LeCun normal) for a weight with einsum labels ``weight``.

    The fan-in is the product of the weight axes that meet the input ``x``, the fan-out that
    of the axes kept in the output; axes labelled in ``batch`` (experts) are neither.
    """
    in_axis = tuple(i for i, c in enumerate(weight) if c in x and c not in batch)
    batch_axis = tuple(i for i, c in enumerate(weight) if c in batch)
    out_axis = tuple(i for i, c in enumerate(weight) if c not in x and c not in batch)
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis
    )


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts settings (``experts=0``: a dense MLP).

    Attributes:
        experts: Number of experts per MLP.
        top_k: Experts per token.
    """

    experts: int = 0
    top_k: int = 2


class Einsum(nn.Module):
    """A weight ``w`` applied with ``jnp.einsum(eq, x, w)``, plus an optional bias ``b``.

    Attributes:
        eq: The einsum of input and weight, e.g. ``"btd,dnh->btnh"``; the output ends with the
            weight's axes that are not contracted (the bias's shape).
        shape: Shape of ``w``, e.g. ``(d_model, heads, head_dim)``.
        use_bias: Whether to add a bias (zeros at init, as ``nn.Dense``'s).
    """

    eq: str
    shape: tuple[int, ...]
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x_labels, w_labels, _ = _labels(self.eq)
        w = self.param("w", lecun_normal(w_labels, x_labels), self.shape)
        y = jnp.einsum(self.eq, x, w)
        if not self.use_bias:
            return y
        kept = tuple(n for c, n in zip(w_labels, self.shape, strict=True) if c not in x_labels)
        return y + self.param("b", nn.initializers.zeros_init(), kept)


class Experts(nn.Module):
    """Expert-stacked weight ``w`` ``(experts, in, out)`` applied with ``jax.lax.ragged_dot``.

    Attributes:
        shape: ``(experts, in, out)``.
    """

    shape: tuple[int, int, int]

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """``x`` ``(tokens, in)`` sorted by expert into groups of ``group_sizes`` ``(experts,)``."""
        w = self.param("w", lecun_normal("eio", "ti", batch="e"), self.shape)
        return jax.lax.ragged_dot(x, w, group_sizes)


class Attention(nn.Module):
    """Causal self-attention; ``query``/``key``/``value``/``out`` keep their head axes."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        d, n = c.d_model, c.heads
        h = d // n
        q, k, v = (
            Einsum("btd,dnh->btnh", (d, n, h), name=name)(x) for name in ("query", "key", "value")
        )
        if c.attention == "causal":
            v = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return Einsum("btnh,nhd->btd", (n, h, d), name="out")(v)


class MLP(nn.Module):
    """Two-layer GELU MLP with ``up``/``down`` einsums."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.d_model, self.config.mlp
        h = jax.nn.gelu(Einsum("btd,df->btf", (d, f), name="up")(x))
        return Einsum("btf,fd->btd", (f, d), name="down")(h)


class MoE(nn.Module):
    """Mixture of experts: ``router``, top-k routing, ``up``/``down`` expert weights.

    Attributes:
        config: Model dimensions; each expert's hidden width is ``config.mlp // top_k``.
        experts: Number of experts.
        top_k: Experts per token.
    """

    config: GPT2Config
    experts: int
    top_k: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, e, k = self.config.d_model, self.experts, self.top_k
        f = self.config.mlp // k
        tokens = x.reshape(-1, d)  # (n, d)
        logits = Einsum("td,de->te", (d, e), use_bias=False, name="router")(tokens)
        gate_logits, chosen = jax.lax.top_k(logits, k)  # (n, k)
        gates = jax.nn.softmax(gate_logits, axis=-1)
        flat = chosen.reshape(-1)  # (n * k,): token i's j-th expert at i * k + j
        order = jnp.argsort(flat, stable=True)  # sorted by expert
        group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        xs = jnp.take(tokens, order // k, axis=0)  # (n * k, d)
        hs = jax.nn.gelu(Experts((e, d, f), name="up")(xs, group_sizes))
        ys = Experts((e, f, d), name="down")(hs, group_sizes)
        ys = jnp.take(ys, jnp.argsort(order), axis=0).reshape(-1, k, d)  # back to token order
        return jnp.einsum("tkd,tk->td", ys, gates.astype(ys.dtype)).reshape(x.shape)


class Block(nn.Module):
    """Pre-LayerNorm decoder block; the MLP is a :class:`MoE` when ``moe.experts > 0``."""

    config: GPT2Config
    moe: MoEConfig = MoEConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.config, name="attn")(nn.LayerNorm(LAYER_NORM_EPS, name="ln1")(x))
        if self.moe.experts:
            mlp = MoE(self.config, self.moe.experts, self.moe.top_k, name="mlp")
        else:
            mlp = MLP(self.config, name="mlp")
        return x + mlp(nn.LayerNorm(LAYER_NORM_EPS, name="ln2")(x))


class GPT2(nn.Module):
    """GPT-2-style decoder: ``tokens`` ``(batch, seq)`` -> logits ``(batch, seq, vocab)``.

    Attributes:
        config: Model dimensions (as :class:`gpt2.GPT2`'s).
        moe: Experts per MLP and per token; the default is the dense model.
    """

    config: GPT2Config
    moe: MoEConfig = MoEConfig()

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        x = embed(c, tokens)
        for i in range(c.layers):
            x = Block(c, self.moe, name=f"block_{i}")(x)
        x = nn.LayerNorm(LAYER_NORM_EPS, name="ln_f")(x)
        return Einsum("btd,dv->btv", (c.d_model, c.vocab), use_bias=False, name="lm_head")(x)
