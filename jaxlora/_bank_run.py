"""Running a model with one of many adapters, or a mix of them per row: shared by linen and NNX.

The factors of all adapters are stacked per weight along `_views.ADAPTERS` (id 0, the
base model, and adapters that do not target a weight hold zeros; ranks are zero-padded;
each scale is folded into A), so which adapter runs is data: an int id indexes the stack
(one adapter for the whole call, plain matmuls), a ``(batch,)`` array of ids mixes them
row by row (`_mixed`). Neither recompiles when the ids change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxlora import _mixed, _rewrite
from jaxlora._config import LoraConfig
from jaxlora._views import ADAPTERS, Factors

BASE = "__base__"  # the name of id 0, the base model without adapter (PEFT's name for it)


def _stack_one(path: str, per: list[tuple[int, Factors]], names: Sequence[str]) -> Factors:
    """One weight's factors of every adapter (by id), stacked as the module docstring says."""
    (first, ref), *_ = per
    for i, f in per:
        if (f.a_axes, f.b_axes) != (ref.a_axes, ref.b_axes):
            raise ValueError(
                f"adapters {names[first - 1]!r} and {names[i - 1]!r} lay out weight {path!r} "
                "differently; make both with jaxlora.lorafy on the same model."
            )
    rank = max(f.a.shape[f.a_axes.index(None)] for _, f in per)
    dtype = jnp.result_type(*(f.a for _, f in per), *(f.b for _, f in per))

    def padded(x, axes):
        pad = [(0, 0)] * x.ndim
        pad[axes.index(None)] = (0, rank - x.shape[axes.index(None)])
        return jnp.pad(x.astype(dtype), pad)

    by_id = dict(per)
    a_zero = jnp.zeros(padded(ref.a, ref.a_axes).shape, dtype)
    b_zero = jnp.zeros(padded(ref.b, ref.b_axes).shape, dtype)
    a_list, b_list = [], []
    for i in range(len(names) + 1):
        f = by_id.get(i)
        a_list.append(
            a_zero if f is None else padded(f.a * jnp.asarray(f.scale, f.a.dtype), f.a_axes)
        )
        b_list.append(b_zero if f is None else padded(f.b, f.b_axes))
    return Factors(
        jnp.stack(a_list), jnp.stack(b_list), (ADAPTERS, *ref.a_axes), (ADAPTERS, *ref.b_axes), 1.0
    )


def stack(per_adapter: Sequence[Mapping[str, Factors]], names: Sequence[str]) -> dict[str, Factors]:
    """``{weight path: Factors}`` stacking every adapter's factors along `ADAPTERS`.

    Args:
      per_adapter: each adapter's ``{weight path: Factors}``, in id order (from id 1).
      names: the adapters' names, for errors.
    """
    per_path: dict[str, list[tuple[int, Factors]]] = {}
    for i, factors in enumerate(per_adapter, start=1):
        for path, f in factors.items():
            per_path.setdefault(path, []).append((i, f))
    return {p: _stack_one(p, per, names) for p, per in per_path.items()}


def _pick(x: jax.Array, axes: Sequence[Any], adapter: jax.Array) -> jax.Array:
    fill = jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else 0
    return jnp.take(x, adapter, axis=list(axes).index(ADAPTERS), mode="fill", fill_value=fill)


def pick(x: jax.Array, adapter: jax.Array) -> jax.Array:
    """Entry ``adapter`` of a stack along axis 0; NaN for an id out of range."""
    return _pick(x, [ADAPTERS], adapter)


def _one(f: Factors, adapter: jax.Array) -> Factors:
    """The factors of the one adapter ``adapter`` selects."""
    return Factors(
        _pick(f.a, f.a_axes, adapter),
        _pick(f.b, f.b_axes, adapter),
        tuple(x for x in f.a_axes if x != ADAPTERS),
        tuple(x for x in f.b_axes if x != ADAPTERS),
        1.0,
    )


def checked_ids(adapter: Any, names: Sequence[str], check: bool) -> jax.Array:
    """The adapter id(s) as int32, from a name, an int or a ``(batch,)`` int array.

    Concrete ids out of range are an error; traced ones are checked with ``checkify``
    when ``check``, and otherwise made out of range (NaN rows) when negative, since
    ``jnp.take`` would wrap them around to another adapter.
    """
    if isinstance(adapter, str):
        if adapter == BASE:
            return jnp.int32(0)
        if adapter not in names:
            raise KeyError(f"no adapter named {adapter!r}; the adapters are {list(names)}.")
        return jnp.int32(names.index(adapter) + 1)
    ids = adapter if isinstance(adapter, jax.Array) else np.asarray(adapter)
    if ids.ndim > 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"adapter= must be a name, one int id or a (batch,) int array of ids; got "
            f"{ids.dtype} of shape {tuple(ids.shape)}. Build ids with bank.ids(names)."
        )
    count = len(names)
    if not isinstance(ids, jax.core.Tracer):
        values = np.asarray(ids).reshape(-1)
        bad = np.flatnonzero((values < 0) | (values > count)).tolist()
        if bad:
            raise ValueError(
                f"adapter ids out of range at rows {bad[:10]} (values "
                f"{values[bad[:10]].tolist()}); ids go from 0 (the base) to {count}: "
                f"{dict(enumerate((BASE, *names)))}."
            )
    elif check:
        checkify.check(
            jnp.all((ids >= 0) & (ids <= count)),
            f"adapter ids must lie in [0, {count}] (0 = the base model)",
        )
    ids = jnp.asarray(ids, jnp.int32)
    return jnp.where(ids < 0, count + 1, ids)


def dropout_key(
    configs: Sequence[LoraConfig], stream_key: Callable[[str], jax.Array | None]
) -> jax.Array | None:
    """The LoRA dropout key of a call: from the adapters' one rng stream, if it is given."""
    streams = {c.dropout_rng for c in configs if c.dropout}
    if len(streams) > 1:
        raise ValueError(
            f"the adapters draw LoRA dropout from rng streams {sorted(streams)}; give them "
            "one dropout_rng."
        )
    key = stream_key(next(iter(streams))) if streams else None
    return None if key is None else _rewrite.stream_key(key, "jaxlora.dropout")


def run(
    fn: Callable[..., Any],
    weights: Any,
    stacked: Mapping[str, Factors],
    ids: jax.Array,
    args: tuple,
    kwargs: dict,
    configs: Sequence[LoraConfig],
    key: jax.Array | None,
    applied: dict[str, int] | None = None,
    leaf_stacks: Mapping[str, jax.Array] | None = None,
) -> Any:
    """``fn(weights, *args, **kwargs)`` with the adapter(s) ``ids`` selects (`_rewrite.call`).

    ``leaf_stacks`` (path -> each id's value of a weight some adapter trains in full,
    stacked) give a mixed batch's rows their own copies (`_row_leaves`); with one id,
    ``weights`` must already hold that id's copies.
    """
    rates = (0.0, *(c.dropout for c in configs))
    if ids.ndim == 0:
        if key is not None and len(set(rates[1:])) > 1:
            raise ValueError(
                "with one adapter id and LoRA dropout, the adapters must share one dropout "
                f"rate (they have {sorted(set(rates[1:]))}); pass the id per row (a (batch,) "
                "array) to give each adapter its own."
            )
        factors = {p: _one(f, ids) for p, f in stacked.items()}
        return _rewrite.call(
            fn, weights, factors, args, kwargs, dropout=rates[-1], key=key, applied=applied
        )
    mixed = _mixed.MixedRows(ids, rates)
    factors = {p: dataclasses.replace(f, mixed=mixed) for p, f in stacked.items()}
    row_leaves = {p: pick(s, ids) for p, s in (leaf_stacks or {}).items()}
    return _rewrite.call(
        fn,
        weights,
        factors,
        args,
        kwargs,
        key=key,
        batch_rows=ids.shape[0],
        applied=applied,
        row_leaves=row_leaves,
    )
