"""A small GPT-2-style decoder, written twice: Flax linen and Flax NNX.

The linen model is written the way a third-party codebase would write it (plain ``nn.Dense``
layers named ``query``, ``key``, ``value``, ``out`` in attention and ``up``, ``down`` in the MLP);
it is what ``jaxlora.lorafy`` adapts. The NNX model mirrors it layer for layer and swaps the
targeted layers for ``nnx.LoRALinear``. The PyTorch mirror lives in ``gpt2_torch.py``.

Both are pre-LayerNorm decoders with token and learned position embeddings and a separate
(untied, bias-free) LM head that is never a LoRA target.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Model dimensions.

    Attributes:
        vocab: Vocabulary size.
        d_model: Residual stream width.
        layers: Number of decoder blocks.
        heads: Attention heads; must divide ``d_model``.
        mlp: MLP hidden width.
        seq: Maximum sequence length (size of the position table).
        attention: ``"causal"``, or ``"none"`` to skip the softmax attention: each block's
            attention output is then ``out(value(x))`` (query and key go unused), a diagnostic
            that leaves only the layers LoRA touches, to tell their cost from attention's.
    """

    vocab: int = 8192
    d_model: int = 512
    layers: int = 6
    heads: int = 8
    mlp: int = 2048
    seq: int = 128
    attention: str = "causal"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Multi-head causal self-attention on already projected inputs.

    Args:
        q: Queries, shape ``(batch, seq, d_model)``.
        k: Keys, shape ``(batch, seq, d_model)``.
        v: Values, shape ``(batch, seq, d_model)``.
        heads: Number of heads to split ``d_model`` into.

    Returns:
        The attended values, shape ``(batch, seq, d_model)``.
    """
    b, t, d = q.shape
    q, k, v = (x.reshape(b, t, heads, d // heads) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)


def mix_tokens(q: jax.Array, k: jax.Array, v: jax.Array, config: GPT2Config) -> jax.Array:
    """:func:`causal_attention`, or just ``v`` when ``config.attention == "none"``."""
    return causal_attention(q, k, v, config.heads) if config.attention == "causal" else v


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy.

    Args:
        logits: Shape ``(batch, seq, vocab)``.
        targets: Integer token ids, shape ``(batch, seq)``.

    Returns:
        A scalar.
    """
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


# --------------------------------------------------------------------------------------------
# Flax linen
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal self-attention with separate ``query``/``key``/``value``/``out`` projections."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.config.d_model
        q, k, v = (nn.Dense(d, name=name)(x) for name in ("query", "key", "value"))
        return nn.Dense(d, name="out")(mix_tokens(q, k, v, self.config))


class MLP(nn.Module):
    """Two-layer GELU MLP with ``up``/``down`` projections."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(nn.Dense(self.config.mlp, name="up")(x))
        return nn.Dense(self.config.d_model, name="down")(h)


class Block(nn.Module):
    """Pre-LayerNorm decoder block."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.config, name="attn")(nn.LayerNorm(LAYER_NORM_EPS, name="ln1")(x))
        return x + MLP(self.config, name="mlp")(nn.LayerNorm(LAYER_NORM_EPS, name="ln2")(x))


def embed(c: GPT2Config, tokens: jax.Array) -> jax.Array:
    """Token plus position embeddings (``wte``, ``wpe``) of ``tokens`` ``(batch, seq)``.

    Called inside a compact ``__call__``, whose module holds the two ``nn.Embed``.
    """
    x = nn.Embed(c.vocab, c.d_model, name="wte")(tokens)
    return x + nn.Embed(c.seq, c.d_model, name="wpe")(jnp.arange(tokens.shape[1]))


class GPT2(nn.Module):
    """GPT-2-style decoder: ``tokens`` ``(batch, seq)`` -> logits ``(batch, seq, vocab)``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        x = embed(c, tokens)
        for i in range(c.layers):
            x = Block(c, name=f"block_{i}")(x)
        x = nn.LayerNorm(LAYER_NORM_EPS, name="ln_f")(x)
        return nn.Dense(c.vocab, use_bias=False, name="lm_head")(x)


# --------------------------------------------------------------------------------------------
# Flax NNX mirror; layers named in `targets` become nnx.LoRALinear
# --------------------------------------------------------------------------------------------


def nnx_linear(
    name: str, d_in: int, d_out: int, targets: tuple[str, ...], rank: int, rngs: nnx.Rngs
) -> nnx.Linear:
    """An ``nnx.Linear``, or an ``nnx.LoRALinear`` of rank ``rank`` if ``name`` is a target.

    Note ``nnx.LoRA`` has no ``alpha / rank`` scaling; the update is ``x @ A @ B``.
    """
    if name in targets:
        return nnx.LoRALinear(d_in, d_out, lora_rank=rank, rngs=rngs)
    return nnx.Linear(d_in, d_out, rngs=rngs)


class NNXAttention(nnx.Module):
    """Mirror of :class:`Attention`."""

    def __init__(self, c: GPT2Config, targets: tuple[str, ...], rank: int, rngs: nnx.Rngs):
        d = c.d_model
        self.config = c
        self.query = nnx_linear("query", d, d, targets, rank, rngs)
        self.key = nnx_linear("key", d, d, targets, rank, rngs)
        self.value = nnx_linear("value", d, d, targets, rank, rngs)
        self.out = nnx_linear("out", d, d, targets, rank, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.query(x), self.key(x), self.value(x)
        return self.out(mix_tokens(q, k, v, self.config))


class NNXMLP(nnx.Module):
    """Mirror of :class:`MLP`."""

    def __init__(self, c: GPT2Config, targets: tuple[str, ...], rank: int, rngs: nnx.Rngs):
        self.up = nnx_linear("up", c.d_model, c.mlp, targets, rank, rngs)
        self.down = nnx_linear("down", c.mlp, c.d_model, targets, rank, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class NNXBlock(nnx.Module):
    """Mirror of :class:`Block`."""

    def __init__(self, c: GPT2Config, targets: tuple[str, ...], rank: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(c.d_model, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.attn = NNXAttention(c, targets, rank, rngs)
        self.ln2 = nnx.LayerNorm(c.d_model, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.mlp = NNXMLP(c, targets, rank, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NNXGPT2(nnx.Module):
    """Mirror of :class:`GPT2`; ``targets`` names the layers that get rank-``rank`` LoRA.

    Args:
        c: Model dimensions.
        targets: Layer names (``"query"``, ``"up"``, ...) to build as ``nnx.LoRALinear``;
            empty for the plain model.
        rank: LoRA rank.
        rngs: Initialisation RNGs.
    """

    def __init__(self, c: GPT2Config, targets: tuple[str, ...], rank: int, rngs: nnx.Rngs):
        self.wte = nnx.Embed(c.vocab, c.d_model, rngs=rngs)
        self.wpe = nnx.Embed(c.seq, c.d_model, rngs=rngs)
        self.blocks = nnx.List([NNXBlock(c, targets, rank, rngs) for _ in range(c.layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, epsilon=LAYER_NORM_EPS, rngs=rngs)
        self.lm_head = nnx.Linear(c.d_model, c.vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
