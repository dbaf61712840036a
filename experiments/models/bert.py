"""A BERT encoder in plain ``flax.linen``, laid out like Hugging Face's ``BertModel``.

Submodules carry the Hugging Face module names, so a parameter path maps mechanically onto the
torch state-dict name: ``bert/encoder/layer_0/attention/self/query/kernel`` is
``bert.encoder.layer.0.attention.self.query.weight`` (transposed). Every linear layer is a plain
``nn.Dense`` with a ``(in, out)`` kernel; nothing here knows about LoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder, named as in Hugging Face's ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
        """Builds a config from a Hugging Face ``config.json`` dict; unknown keys are ignored.

        Args:
            config: the parsed ``config.json`` of a ``model_type: "bert"`` checkpoint.

        Returns:
            The matching ``BertConfig``.

        Raises:
            ValueError: if the checkpoint uses an activation or position embedding type this
                encoder does not implement.
        """
        if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(
                f"BERT hidden_act {config['hidden_act']!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}."
            )
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"BERT position_embedding_type {config['position_embedding_type']!r} is not "
                "supported; only 'absolute' position embeddings are implemented."
            )
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


def _normal(config: BertConfig) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=config.initializer_range)


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_normal(config), name=name)


def _layer_norm(config: BertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, name="LayerNorm")


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, input_ids: Array, token_type_ids: Array, position_ids: Array, deterministic: bool
    ) -> Array:
        """Embeds tokens.

        Args:
            input_ids: ``(batch, seq)`` int token ids.
            token_type_ids: ``(batch, seq)`` int segment ids.
            position_ids: ``(batch, seq)`` or ``(seq,)`` int positions.
            deterministic: disables dropout when True.

        Returns:
            ``(batch, seq, hidden)`` embeddings.
        """
        config = self.config

        def embed(num: int, name: str) -> nn.Embed:
            return nn.Embed(num, config.hidden_size, embedding_init=_normal(config), name=name)

        hidden = (
            embed(config.vocab_size, "word_embeddings")(input_ids)
            + embed(config.type_vocab_size, "token_type_embeddings")(token_type_ids)
            + embed(config.max_position_embeddings, "position_embeddings")(position_ids)
        )
        hidden = _layer_norm(config)(hidden)
        return nn.Dropout(config.hidden_dropout_prob)(hidden, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with a key padding mask."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, deterministic: bool) -> Array:
        """Attends every position to every unmasked key.

        Args:
            hidden: ``(batch, seq, hidden)`` input states.
            attention_mask: ``(batch, seq)`` bool, True for real tokens, False for padding.
            deterministic: disables attention dropout when True.

        Returns:
            ``(batch, seq, hidden)`` attention context (before the output projection).
        """
        config = self.config
        batch, seq, _ = hidden.shape
        heads_shape = (batch, seq, config.num_attention_heads, config.head_dim)
        query, key, value = (
            _dense(config, config.hidden_size, name)(hidden).reshape(heads_shape)
            for name in ("query", "key", "value")
        )
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) * config.head_dim**-0.5
        scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(config.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
        return context.reshape(batch, seq, config.hidden_size)


class BertResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: HF's ``BertSelfOutput`` and ``BertOutput``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, residual: Array, deterministic: bool) -> Array:
        """Projects back to the model width and adds the residual.

        Args:
            hidden: ``(batch, seq, features)`` input of the dense layer.
            residual: ``(batch, seq, hidden)`` residual stream.
            deterministic: disables dropout when True.

        Returns:
            ``(batch, seq, hidden)`` normalised states.
        """
        hidden = _dense(self.config, self.config.hidden_size, "dense")(hidden)
        hidden = nn.Dropout(self.config.hidden_dropout_prob)(hidden, deterministic=deterministic)
        return _layer_norm(self.config)(hidden + residual)


class BertAttention(nn.Module):
    """Self-attention (``self``) followed by its output projection (``output``)."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, deterministic: bool) -> Array:
        """Applies attention and the residual output projection.

        Args:
            hidden: ``(batch, seq, hidden)`` input states.
            attention_mask: ``(batch, seq)`` bool, True for real tokens.
            deterministic: disables dropout when True.

        Returns:
            ``(batch, seq, hidden)`` output states.
        """
        context = BertSelfAttention(self.config, name="self")(hidden, attention_mask, deterministic)
        return BertResidualOutput(self.config, name="output")(context, hidden, deterministic)


class BertIntermediate(nn.Module):
    """The feed-forward expansion ``act(dense(x))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        """Expands to the intermediate width.

        Args:
            hidden: ``(batch, seq, hidden)`` input states.

        Returns:
            ``(batch, seq, intermediate)`` activations.
        """
        hidden = _dense(self.config, self.config.intermediate_size, "dense")(hidden)
        return _ACTIVATIONS[self.config.hidden_act](hidden)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block: ``attention``, ``intermediate``, ``output``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, deterministic: bool) -> Array:
        """Applies the block.

        Args:
            hidden: ``(batch, seq, hidden)`` input states.
            attention_mask: ``(batch, seq)`` bool, True for real tokens.
            deterministic: disables dropout when True.

        Returns:
            ``(batch, seq, hidden)`` output states.
        """
        attended = BertAttention(self.config, name="attention")(
            hidden, attention_mask, deterministic
        )
        expanded = BertIntermediate(self.config, name="intermediate")(attended)
        return BertResidualOutput(self.config, name="output")(expanded, attended, deterministic)


class BertEncoder(nn.Module):
    """The stack of ``layer_{i}`` blocks."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, deterministic: bool) -> Array:
        """Applies every block in order.

        Args:
            hidden: ``(batch, seq, hidden)`` embeddings.
            attention_mask: ``(batch, seq)`` bool, True for real tokens.
            deterministic: disables dropout when True.

        Returns:
            ``(batch, seq, hidden)`` last hidden state.
        """
        for i in range(self.config.num_hidden_layers):
            hidden = BertLayer(self.config, name=f"layer_{i}")(
                hidden, attention_mask, deterministic
            )
        return hidden


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the pooled ``[CLS]`` representation."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        """Pools the first token.

        Args:
            hidden: ``(batch, seq, hidden)`` last hidden state.

        Returns:
            ``(batch, hidden)`` pooled output.
        """
        return nn.tanh(_dense(self.config, self.config.hidden_size, "dense")(hidden[:, 0]))


class BertModel(nn.Module):
    """BERT body: ``embeddings``, ``encoder`` and (optionally) ``pooler``.

    Example:
        >>> config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=16)
        >>> model = BertModel(config)
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
        >>> params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].shape
        (8, 8)
        >>> hidden, pooled = jax.eval_shape(model.apply, {"params": params}, ids)
        >>> hidden.shape, pooled.shape
        ((2, 5, 8), (2, 8))
    """

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array | None]:
        """Encodes a batch of token sequences.

        Args:
            input_ids: ``(batch, seq)`` int token ids.
            attention_mask: ``(batch, seq)``, non-zero for real tokens and 0 for padding;
                defaults to all ones.
            token_type_ids: ``(batch, seq)`` int segment ids; defaults to zeros.
            position_ids: ``(batch, seq)`` int positions; defaults to ``0..seq-1``.
            deterministic: disables dropout when True; otherwise the ``"dropout"`` rng is used.

        Returns:
            ``(last_hidden_state, pooled_output)``: ``(batch, seq, hidden)`` and
            ``(batch, hidden)``, or None for ``pooled_output`` without a pooler.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[-1])
        hidden = BertEmbeddings(self.config, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic
        )
        hidden = BertEncoder(self.config, name="encoder")(
            hidden, attention_mask.astype(jnp.bool_), deterministic
        )
        if not self.add_pooling_layer:
            return hidden, None
        return hidden, BertPooler(self.config, name="pooler")(hidden)


def _classifier(config: BertConfig, num_labels: int) -> nn.Dense:
    return _dense(config, num_labels, "classifier")


class BertForSequenceClassification(nn.Module):
    """HF ``BertForSequenceClassification``: ``bert`` body, dropout, ``classifier`` on the pooler.

    Example:
        >>> config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
        ...                     num_attention_heads=2, intermediate_size=16)
        >>> model = BertForSequenceClassification(config, num_labels=3)
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
        >>> jax.jit(model.apply)({"params": params}, ids).shape
        (2, 3)
    """

    config: BertConfig
    num_labels: int

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Classifies a batch of token sequences.

        Args:
            input_ids: ``(batch, seq)`` int token ids.
            attention_mask: ``(batch, seq)``, non-zero for real tokens and 0 for padding.
            token_type_ids: ``(batch, seq)`` int segment ids; defaults to zeros.
            position_ids: ``(batch, seq)`` int positions; defaults to ``0..seq-1``.
            deterministic: disables dropout when True; otherwise the ``"dropout"`` rng is used.

        Returns:
            ``(batch, num_labels)`` logits.
        """
        _, pooled = BertModel(self.config, name="bert")(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic
        )
        rate = self.config.classifier_dropout
        rate = self.config.hidden_dropout_prob if rate is None else rate
        pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
        return _classifier(self.config, self.num_labels)(pooled)


def init_classification_params(
    config: BertConfig, bert_params: Mapping[str, Any], num_labels: int, key: Array
) -> dict[str, Any]:
    """Puts a freshly initialised ``classifier`` head on top of pretrained body parameters.

    Args:
        config: the body's config.
        bert_params: ``BertModel`` parameters (``embeddings``, ``encoder``, ``pooler``), e.g. from
            ``experiments.models.loading.load_hf_model``.
        num_labels: number of classes.
        key: PRNG key for the head, drawn as HF does (normal with ``initializer_range``, zero bias).

    Returns:
        Parameters for ``BertForSequenceClassification(config, num_labels)``:
        ``{"bert": bert_params, "classifier": {"kernel": (hidden, num_labels), "bias": ...}}``.

    Raises:
        ValueError: if ``bert_params`` has no pooler, which the classification head reads.
    """
    if "pooler" not in bert_params:
        raise ValueError(
            "bert_params has no 'pooler'; BertForSequenceClassification classifies the pooled "
            "[CLS] output, so load a checkpoint that includes pooler.dense.{weight,bias}."
        )
    head = _classifier(config, num_labels)
    head_params = head.init(key, jnp.zeros((1, config.hidden_size), jnp.float32))["params"]
    return {"bert": dict(bert_params), "classifier": head_params}
