"""New tokens for NNX modules: the trained rows of a weight, held by its module's `LoraModule`.

The module that holds the table (an ``nnx.Embed``, Tunix's ``Embedder``, a head) is
wrapped in a `LoraModule`, whose methods run through jaxlora's rewrite: every use of the
table in them — the lookup, ``attend``/``decode`` of a tied head — reads the trained rows
(see `_tokens`). The rows are a `LoraParam` ``values`` ``(n_tokens, features)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import _tokens
from jaxlora._config import adapter_name
from jaxlora._nnx_wrappers import LoraModule, LoraParam
from jaxlora._tokens import Choice, TrainableTokens
from jaxlora._views import Factors


class TokenAdapter(nnx.Module):
    """The trained rows of one weight of a `LoraModule` (PEFT's ``trainable_tokens_delta``).

    Attributes:
      values: `LoraParam` ``(n_tokens, features)``: the rows, starting as the base rows.
      indices: the token ids.
      axis: the weight axis they index.
      looked_up: whether the weight is an embedding looked up by row.
    """

    def __init__(self, weight: nnx.Variable, choice: Choice, *, dtype: Any):
        self.indices = choice.indices
        self.axis = choice.axis
        self.looked_up = choice.looked_up
        self.values = LoraParam(_tokens.rows(weight[...], self.node(None)).astype(dtype))

    def node(self, values: Any = ...) -> TrainableTokens:
        """The rows as the linen tree holds them (``values`` defaults to the current ones)."""
        values = self.values[...] if values is ... else values
        return TrainableTokens(values, self.indices, self.axis, self.looked_up)

    def factors(self, weight: nnx.Variable) -> Factors:
        """The rows as factors of ``weight`` (see `_tokens.factors`)."""
        return _tokens.factors(self.node(), weight[...])


def token_weights(module: nnx.Module) -> Iterator[tuple[str, nnx.Variable, TokenAdapter]]:
    """``(name, weight, TokenAdapter)`` of every weight with trained rows in ``module``."""
    for path, wrapper in nnx.iter_modules(module):
        if isinstance(wrapper, LoraModule):
            owner = "/".join(str(p) for p in path if p != "base")
            for weight, adapter in wrapper.tokens.items():
                yield adapter_name(owner, weight), getattr(wrapper.base, weight), adapter


def merge_rows(module: nnx.Module) -> None:
    """Writes every trained row into its weight, in place (exactly, like PEFT's merge)."""
    for _, weight, adapter in token_weights(module):
        weight[...] = _tokens.with_rows(weight[...], adapter.node(), adapter.values[...])


def restore_rows(out: nnx.Module, adapted: nnx.Module) -> None:
    """Sets the trained rows of ``out``'s weights (merged values) back to ``adapted``'s base.

    Raises:
      ValueError: a weight still has the base rows where the trained ones differ: the
        module was never merged.
    """
    pairs = zip(token_weights(out), token_weights(adapted), strict=True)
    for (name, weight, adapter), (_, base, _) in pairs:
        node = adapter.node()
        base_rows, given = _tokens.rows(base[...], node), _tokens.rows(weight[...], node)
        trained = jnp.asarray(node.values, base_rows.dtype)
        concrete = not any(isinstance(x, jax.core.Tracer) for x in (base_rows, given, trained))
        if concrete and bool(jnp.any(trained != base_rows)) and jnp.array_equal(given, base_rows):
            raise ValueError(
                f"unmerge: weight {name!r} of the first module still has the base rows at the "
                f"trained token ids {list(node.indices)}: it was never merged. Pass the output "
                "of jaxlora.merge(adapted)."
            )
        weight[...] = _tokens.with_rows(weight[...], node, base_rows)
