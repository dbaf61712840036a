"""A batch whose rows use different adapters: each row meets its own adapter's factors.

At every use of an adapted weight the factors of all adapters are stacked along an axis
labelled `_views.ADAPTERS` (zero factors where an adapter does not target the weight and
for the base model, ranks zero-padded to the largest: both add exactly nothing). Each row
gathers its adapter's A and B, and the use's own single-adapter update
(`_uses.adapted_output`) runs once per row under ``jax.vmap``: batched matmuls of the
rank-r factors, every layer kind handled as for one adapter. The rows are found on the
input's and output's axes by `_rows`; a use whose input lost them is refused by name.

Why gather per row rather than group rows by adapter with ``jax.lax.ragged_dot`` (as
SkyRL-tx does): grouping sorts the activations (a copy of every token at every adapted
layer, and its inverse) to save gathering factors that are thousands of times smaller;
measured on a GPT-2-sized layer the gather is faster (README, "Many adapters on one
base").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import _rows, _uses
from jaxlora._views import ADAPTERS, Factors, View


@dataclasses.dataclass(frozen=True)
class MixedRows:
    """The adapter of each row of a mixed batch.

    Attributes:
      ids: ``(batch,)`` int adapter ids (0 = the base model).
      rates: LoRA dropout rate of each id (static).
    """

    ids: Any
    rates: tuple[float, ...]


def _input_position(op: str, weight_pos: int) -> int:
    return {"gather": 1, "conv_general_dilated": 0, "ragged_dot_general": 0}.get(op, 1 - weight_pos)


def to_rows(v: jax.Array, rows: _rows.Rows, batch: int) -> jax.Array:
    """``v`` with its rows gathered on a new leading axis of ``batch`` entries."""
    length, rest = v.shape[rows.axis], v.shape[: rows.axis] + v.shape[rows.axis + 1 :]
    outer = length // (batch * rows.inner)
    v = jnp.moveaxis(v, rows.axis, 0).reshape(outer, batch, rows.inner, *rest)
    v = jnp.swapaxes(v, 0, 1).reshape(batch, outer * rows.inner, *rest)
    return jnp.moveaxis(v, 1, rows.axis + 1)


def from_rows(v: jax.Array, rows: _rows.Rows, batch: int) -> jax.Array:
    """The inverse of `to_rows`."""
    v = jnp.moveaxis(v, rows.axis + 1, 1)
    rest = v.shape[2:]
    v = v.reshape(batch, -1, rows.inner, *rest)
    v = jnp.swapaxes(v, 0, 1).reshape(-1, *rest)
    return jnp.moveaxis(v, 0, rows.axis)


def _per_row(x: jax.Array, axes: Sequence[Any], ids: jax.Array) -> jax.Array:
    """Each row's slice of a stacked factor, rows first; an out-of-range id gives NaN."""
    pos = list(axes).index(ADAPTERS)
    fill = jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else 0
    return jnp.moveaxis(jnp.take(x, ids, axis=pos, mode="fill", fill_value=fill), pos, 0)


def _dropout(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))


def adapted_output(
    op: str,
    eqn_params: dict,
    y: jax.Array,
    operands: Sequence[Any],
    weight_pos: int,
    view: View,
    rows: _rows.UseRows | None,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """``y`` plus each row's own adapter update (see `_uses.adapted_output`).

    Args:
      op, eqn_params, y, operands, weight_pos: the operation, as for `_uses.adapted_output`.
      view: the weight's view; its factors are stacked and carry `MixedRows`.
      rows: where the rows are in the operands and output (`_rows.analyse`).
      key: PRNG key for LoRA dropout (None: none).

    Raises:
      ValueError: the input of this use does not keep the batch rows on one axis.
    """
    f = view.factors
    x_pos = _input_position(op, weight_pos)
    x_rows = None if rows is None else rows.operands[x_pos]
    y_rows = None if rows is None else rows.out
    bad = next((r for r in (x_rows, y_rows) if not isinstance(r, _rows.Rows)), False)
    if bad is not False:
        raise ValueError(
            f"A batch mixing adapters cannot apply per-row adapters to weight "
            f"{view.weight!r}: the batch rows cannot be followed to its use "
            f"({_rows.why_lost(bad)}). Run such batches with one adapter id at a time "
            "(adapter=<one id>), or leave this weight and those after the operation named "
            "out of the adapters' targets."
        )
    ids = f.mixed.ids
    batch = ids.shape[0]
    a = _per_row(f.a, f.a_axes, ids)
    b = _per_row(f.b, f.b_axes, ids)
    a_axes = tuple(x for x in f.a_axes if x != ADAPTERS)
    b_axes = tuple(x for x in f.b_axes if x != ADAPTERS)
    rates = jnp.asarray(f.mixed.rates, jnp.float32)[ids]
    use_dropout = key is not None and op != "gather" and any(f.mixed.rates)
    keys = jax.random.split(key, batch) if use_dropout else jnp.zeros((batch,), jnp.uint32)

    def one(x, y, a, b, rate, key):
        ops = list(operands)
        ops[x_pos] = _dropout(x, rate, key) if use_dropout else x
        row_view = dataclasses.replace(view, factors=Factors(a, b, a_axes, b_axes, f.scale))
        return _uses.adapted_output(op, eqn_params, y, ops, weight_pos, row_view)

    out = jax.vmap(one)(
        to_rows(operands[x_pos], x_rows, batch), to_rows(y, y_rows, batch), a, b, rates, keys
    )
    return from_rows(out, y_rows, batch)
