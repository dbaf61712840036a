"""Small models written the way third-party Flax code is written: nothing here knows LoRA."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nn.Module):
    """Dense stack, every layer a LoRA candidate."""

    features: tuple[int, ...] = (64, 64, 32)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = nn.gelu(x)
        return x


class Attention(nn.Module):
    """Hand-written causal self-attention with separate q/k/v/o projections."""

    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        b, t, _ = x.shape
        hd = self.d_model // self.heads

        def heads(y):
            return y.reshape(b, t, self.heads, hd)

        q = heads(nn.Dense(self.d_model, name="query")(x))
        k = heads(nn.Dense(self.d_model, name="key")(x))
        v = heads(nn.Dense(self.d_model, name="value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd)).astype(x.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        probs = nn.Dropout(0.1)(jax.nn.softmax(logits), deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.d_model)
        return nn.Dense(self.d_model, name="out")(out)


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = x + Attention(self.d_model, self.heads, name="attn")(nn.LayerNorm()(x), deterministic)
        h = nn.gelu(nn.Dense(4 * self.d_model, name="up")(nn.LayerNorm()(x)))
        return x + nn.Dense(self.d_model, name="down")(h)


class TinyLM(nn.Module):
    """Decoder LM with tied embeddings (``Embed.attend`` as the output layer)."""

    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    layers: int = 2

    @nn.compact
    def __call__(self, ids, deterministic: bool = True):
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        pos = self.param("pos", nn.initializers.normal(0.02), (ids.shape[-1], self.d_model))
        x = embed(ids) + pos
        for i in range(self.layers):
            x = Block(self.d_model, self.heads, name=f"block_{i}")(x, deterministic)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


class ScanBlock(nn.Module):
    """A block in the carry/output form ``nn.scan`` expects."""

    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x, _):
        return Block(self.d_model, self.heads, name="block")(x), None


class ScannedLM(nn.Module):
    """Decoder whose blocks are stacked with ``nn.scan`` over ``nn.remat`` (MaxText style)."""

    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    layers: int = 3

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(ids)
        stack = nn.scan(
            nn.remat(ScanBlock),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = stack(self.d_model, self.heads, name="layers")(x, None)
        return nn.Dense(self.vocab, name="head")(x)


class FlaxAttentionModel(nn.Module):
    """Flax's own attention (DenseGeneral q/k/v/out) plus an Einsum and BatchNorm."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="mha")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.Einsum((16, 2, 8), "btd,dnh->btnh", name="proj")(x)
        return nn.DenseGeneral(4, axis=(-2, -1), name="merge_heads")(x)

    def embed_only(self, x):
        return self.__call__(x)


class NnxModel(nnx.Module):
    """NNX model using every adaptable NNX layer and NNX's own attention."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = 32, d: int = 16):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=d, qkv_features=d, decode=False, rngs=rngs
        )
        self.layers = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(2)])
        self.split_heads = nnx.LinearGeneral(d, (2, 8), rngs=rngs)
        self.merge_heads = nnx.Einsum("btnh,nhd->btd", (2, 8, d), rngs=rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = self.attn(x)
        for layer in self.layers:
            x = nnx.gelu(layer(x))
        x = self.merge_heads(self.split_heads(x))
        return self.head(x), self.embed.attend(x)
