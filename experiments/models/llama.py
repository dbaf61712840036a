"""A Llama decoder in plain ``flax.linen``, laid out like Hugging Face's ``LlamaForCausalLM``.

Submodules carry the Hugging Face module names, so a parameter path maps mechanically onto the
torch state-dict name: ``model/layers_0/self_attn/q_proj/kernel`` is
``model.layers.0.self_attn.q_proj.weight`` (transposed), ``model/norm/scale`` is
``model.norm.weight`` and ``model/embed_tokens/embedding`` is ``model.embed_tokens.weight``.
Every linear layer is a plain bias-free ``nn.Dense`` with a ``(in, out)`` kernel; nothing here
knows about LoRA.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder, named as in Hugging Face's ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs "
                "every key/value head to serve the same number of query heads."
            )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from a Hugging Face ``config.json`` dict; unknown keys are ignored.

        Reads ``rope_theta`` either at the top level (transformers 4) or from
        ``rope_parameters`` (transformers 5), and ``head_dim`` defaults to
        ``hidden_size // num_attention_heads``.

        Args:
            config: the parsed ``config.json`` of a ``model_type: "llama"`` checkpoint.

        Returns:
            The matching ``LlamaConfig``.

        Raises:
            ValueError: for features this decoder does not implement (RoPE scaling, biases,
                an activation other than SiLU).
        """
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"Llama rope type {rope_type!r} is not supported; only the default (unscaled) "
                "RoPE is implemented."
            )
        unsupported = [key for key in ("attention_bias", "mlp_bias") if config.get(key)]
        if config.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={config['hidden_act']!r}")
        if unsupported:
            raise ValueError(
                f"Llama config sets {', '.join(unsupported)}; this decoder implements the plain "
                "bias-free SiLU Llama only."
            )
        names = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in names}
        values.setdefault("num_key_value_heads", config["num_attention_heads"])
        if values.get("head_dim") is None:
            values["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        return cls(**values)


def _dense(config: LlamaConfig, features: int) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        kernel_init=nn.initializers.normal(stddev=config.initializer_range),
    )


def _rms_norm(config: LlamaConfig) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=config.rms_norm_eps)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """Cosine and sine tables of rotary position embeddings (HF ``rotate_half`` layout).

    Args:
        positions: ``(..., seq)`` int positions.
        head_dim: width of one attention head (even).
        theta: RoPE base frequency (``rope_theta``).

    Returns:
        ``(cos, sin)``, each float32 of shape ``(..., seq, head_dim)``; the two halves of the
        last axis repeat the same ``head_dim // 2`` frequencies.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates query or key heads: ``x * cos + rotate_half(x) * sin``.

    Args:
        x: ``(batch, seq, heads, head_dim)`` queries or keys.
        cos: ``(batch, seq, head_dim)`` or ``(seq, head_dim)`` from ``rope_tables``.
        sin: same shape as ``cos``.

    Returns:
        ``x`` rotated, same shape.
    """
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE: ``{q,k,v,o}_proj``."""

    config: LlamaConfig

    def setup(self) -> None:
        config = self.config
        self.q_proj = _dense(config, config.num_attention_heads * config.head_dim)
        self.k_proj = _dense(config, config.num_key_value_heads * config.head_dim)
        self.v_proj = _dense(config, config.num_key_value_heads * config.head_dim)
        self.o_proj = _dense(config, config.hidden_size)

    def __call__(self, hidden: Array, mask: Array, cos: Array, sin: Array) -> Array:
        """Attends each position to the allowed earlier positions.

        Args:
            hidden: ``(batch, seq, hidden)`` normalised input states.
            mask: ``(batch, seq, seq)`` bool, True where query ``q`` may attend to key ``k``.
            cos: RoPE cosines from ``rope_tables``, ``(batch, seq, head_dim)`` or
                ``(seq, head_dim)``.
            sin: RoPE sines, same shape as ``cos``.

        Returns:
            ``(batch, seq, hidden)`` attention output.
        """
        config = self.config
        batch, seq, _ = hidden.shape
        kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        groups = config.num_attention_heads // kv_heads
        query = self.q_proj(hidden).reshape(batch, seq, config.num_attention_heads, head_dim)
        key = self.k_proj(hidden).reshape(batch, seq, kv_heads, head_dim)
        value = self.v_proj(hidden).reshape(batch, seq, kv_heads, head_dim)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        # Query head j reads key/value head j // groups, as HF's repeat_kv does.
        query = query.reshape(batch, seq, kv_heads, groups, head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", query, key) * head_dim**-0.5
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        context = jnp.einsum("bkgqs,bskd->bqkgd", probs, value)
        return self.o_proj(context.reshape(batch, seq, config.num_attention_heads * head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    def setup(self) -> None:
        config = self.config
        self.gate_proj = _dense(config, config.intermediate_size)
        self.up_proj = _dense(config, config.intermediate_size)
        self.down_proj = _dense(config, config.hidden_size)

    def __call__(self, hidden: Array) -> Array:
        """Applies the feed-forward block.

        Args:
            hidden: ``(batch, seq, hidden)`` normalised input states.

        Returns:
            ``(batch, seq, hidden)`` output states.
        """
        return self.down_proj(nn.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``,
    ``mlp``."""

    config: LlamaConfig

    def setup(self) -> None:
        self.input_layernorm = _rms_norm(self.config)
        self.self_attn = LlamaAttention(self.config)
        self.post_attention_layernorm = _rms_norm(self.config)
        self.mlp = LlamaMLP(self.config)

    def __call__(self, hidden: Array, mask: Array, cos: Array, sin: Array) -> Array:
        """Applies the block with residual connections.

        Args:
            hidden: ``(batch, seq, hidden)`` residual stream.
            mask: ``(batch, seq, seq)`` bool attention mask.
            cos: RoPE cosines from ``rope_tables``.
            sin: RoPE sines from ``rope_tables``.

        Returns:
            ``(batch, seq, hidden)`` updated residual stream.
        """
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), mask, cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    """Decoder body: ``embed_tokens``, ``layers_{i}``, final ``norm``."""

    config: LlamaConfig

    def setup(self) -> None:
        config = self.config
        self.embed_tokens = nn.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=nn.initializers.normal(stddev=config.initializer_range),
        )
        self.layers = [LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = _rms_norm(config)

    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None
    ) -> Array:
        """Runs the decoder.

        Args:
            input_ids: ``(batch, seq)`` int token ids.
            attention_mask: ``(batch, seq)``, non-zero for real tokens and 0 for padding; keys
                at padded positions are masked out on top of the causal mask.
            positions: ``(batch, seq)`` or ``(seq,)`` int RoPE positions; defaults to
                ``0..seq-1`` (as HF does; pass them explicitly for left-padded batches).

        Returns:
            ``(batch, seq, hidden)`` final normalised hidden states.
        """
        seq = input_ids.shape[-1]
        if positions is None:
            positions = jnp.arange(seq)
        mask = jnp.tril(jnp.ones((seq, seq), jnp.bool_))[None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(jnp.bool_)[:, None, :]
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, mask, cos, sin)
        return self.norm(hidden)

    def attend(self, hidden: Array) -> Array:
        """Projects hidden states onto the vocabulary with the tied input embedding.

        Args:
            hidden: ``(batch, seq, hidden)`` final hidden states.

        Returns:
            ``(batch, seq, vocab)`` logits.
        """
        return self.embed_tokens.attend(hidden)


class LlamaForCausalLM(nn.Module):
    """HF ``LlamaForCausalLM``: the ``model`` body and an ``lm_head`` (absent when tied).

    Example:
        >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=4,
        ...                      num_key_value_heads=2, head_dim=4)
        >>> model = LlamaForCausalLM(config)
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
        >>> params["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape
        (16, 8)
        >>> jax.eval_shape(model.apply, {"params": params}, ids).shape
        (2, 5, 32)
    """

    config: LlamaConfig

    def setup(self) -> None:
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config, self.config.vocab_size)

    def __call__(
        self, input_ids: Array, attention_mask: Array | None = None, positions: Array | None = None
    ) -> Array:
        """Computes next-token logits.

        Args:
            input_ids: ``(batch, seq)`` int token ids.
            attention_mask: ``(batch, seq)``, non-zero for real tokens and 0 for padding.
            positions: ``(batch, seq)`` or ``(seq,)`` int RoPE positions; defaults to
                ``0..seq-1``.

        Returns:
            ``(batch, seq, vocab)`` logits; ``logits[:, t]`` predicts token ``t + 1``.
        """
        hidden = self.model(input_ids, attention_mask, positions)
        if self.config.tie_word_embeddings:
            return self.model.attend(hidden)
        return self.lm_head(hidden)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_id"))
def generate(
    model: LlamaForCausalLM,
    params: Mapping[str, Any],
    prompt_ids: Array,
    prompt_lengths: Array,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> Array:
    """Greedy decoding with a fixed output length, without a KV cache (for short samples).

    Each step reruns the whole ``(batch, prompt + max_new_tokens)`` buffer; the causal mask
    keeps the not-yet-written slots from influencing earlier positions, so right-padded prompts
    of different lengths decode correctly side by side.

    Args:
        model: the ``LlamaForCausalLM`` module (static: hashable).
        params: its parameters (the ``"params"`` collection content).
        prompt_ids: ``(batch, prompt)`` int token ids, right-padded with any id.
        prompt_lengths: ``(batch,)`` int number of real prompt tokens per row (at least 1).
        max_new_tokens: how many tokens to generate (static).
        eos_token_id: once a row emits it, the rest of that row is filled with it.

    Returns:
        ``(batch, max_new_tokens)`` int32 generated token ids.

    Example:
        >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=4,
        ...                      num_key_value_heads=2, head_dim=4)
        >>> model = LlamaForCausalLM(config)
        >>> prompt = jnp.array([[3, 4, 5], [6, 7, 0]])
        >>> params = jax.jit(model.init)(jax.random.key(0), prompt)["params"]
        >>> generate(model, params, prompt, jnp.array([3, 2]), max_new_tokens=4).shape
        (2, 4)
    """
    batch = prompt_ids.shape[0]
    rows = jnp.arange(batch)
    buffer = jnp.concatenate(
        [prompt_ids.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1
    )
    lengths = prompt_lengths.astype(jnp.int32)

    def step(i: Array, state: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        buffer, out, done = state
        logits = model.apply({"params": params}, buffer)
        token = jnp.argmax(logits[rows, lengths + i - 1], axis=-1).astype(jnp.int32)
        if eos_token_id is not None:
            token = jnp.where(done, eos_token_id, token)
            done = done | (token == eos_token_id)
        return buffer.at[rows, lengths + i].set(token), out.at[:, i].set(token), done

    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    _, out, _ = jax.lax.fori_loop(
        0, max_new_tokens, step, (buffer, out, jnp.zeros((batch,), jnp.bool_))
    )
    return out
