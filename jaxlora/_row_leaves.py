"""Whole leaves per row in a mixed batch: each row meets its own adapter's copy of a leaf.

An adapter that trains a leaf in full (a ``modules_to_save`` copy such as a task's
classification head, or a trained bias) replaces the base's leaf for its rows only. In a
batch mixing adapters the leaf is a `RowWise` value: the copies of all ids stacked and
gathered per row, ``(batch, *leaf.shape)`` (id 0 and adapters that keep the base's leaf
get the base's). Every operation that takes a `RowWise` value runs once per row under
``jax.vmap``: the row's copy against that row's slice of the other operands (`_mixed.to_rows`,
found by `_rows`). Its result is `RowWise` again while no operand carries the batch rows (a
bias reshaped for broadcasting), and an ordinary value with its rows back in place once
one does (the bias added to the row's activations, the head's matmul). Gradients reach
each copy from its own rows only, through the gather.

Gathering per row copies the leaf ``batch`` times: cheap for what adapters train in full
(heads, biases, norms), and exact. An operation that would need the rows where they cannot
be followed is refused by name, as for LoRA factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxlora import _mixed, _rows


@dataclasses.dataclass(frozen=True)
class RowWise:
    """A value that differs per row: row ``r`` sees ``value[r]``.

    Attributes:
      leaf: the path of the leaf it comes from (for errors).
      value: ``(batch, *shape)``, the per-row values of a value of ``shape``.
    """

    leaf: str
    value: jax.Array


def any_row_wise(values: Sequence[Any]) -> bool:
    """Whether some of ``values`` is `RowWise`."""
    return any(isinstance(v, RowWise) for v in values)


def refuse(values: Sequence[Any], why: str) -> None:
    """Raises the error for a `RowWise` value reaching an operation it cannot take."""
    leaf = next(v.leaf for v in values if isinstance(v, RowWise))
    raise ValueError(
        f"A batch mixing adapters cannot give each row its own copy of {leaf!r} (a leaf "
        f"some adapter trains in full, modules_to_save or bias): {why}. Run such batches "
        "with one adapter id at a time (adapter=<one id>)."
    )


def bind(
    eqn: Any,
    invals: Sequence[Any],
    use: _rows.UseRows | None,
    batch: int,
    bind_fn: Callable[[Any, Sequence[Any]], list[Any]],
) -> list[Any]:
    """The outputs of ``eqn`` run once per row, some of its inputs being `RowWise`.

    Args:
      eqn: the equation.
      invals: its inputs; `RowWise` ones give each row its own value.
      use: where the batch rows are in its (other) inputs and its outputs.
      batch: the number of rows.
      bind_fn: ``bind_fn(eqn, invals)`` evaluates the equation.

    Returns:
      Its outputs: `RowWise` when no input carries the batch rows, else ordinary values.
    """
    leaf = next(v.leaf for v in invals if isinstance(v, RowWise))
    infos = [None] * len(invals) if use is None else list(use.operands)
    args, axes = [], []
    for x, info in zip(invals, infos, strict=True):
        if isinstance(x, RowWise):
            args.append(x.value)
            axes.append(0)
        elif isinstance(info, _rows.Rows):
            args.append(_mixed.to_rows(x, info, batch))
            axes.append(0)
        elif info is None:
            args.append(x)
            axes.append(None)
        else:
            refuse(
                invals,
                f"{eqn.primitive.name} takes it with values whose rows are lost "
                f"({_rows.why_lost(info)})",
            )
    with_rows = any(isinstance(i, _rows.Rows) for i in infos)
    out_rows = None if use is None else use.out
    if with_rows and not isinstance(out_rows, _rows.Rows):
        refuse(
            invals,
            f"the rows of {eqn.primitive.name}'s result cannot be followed "
            f"({_rows.why_lost(out_rows)})",
        )
    try:
        outs = jax.vmap(lambda *a: bind_fn(eqn, a), in_axes=axes)(*args)
    except (TypeError, ValueError) as e:
        refuse(invals, f"{eqn.primitive.name} cannot run row by row ({e})")
    results = []
    for out, var in zip(outs, eqn.outvars, strict=True):
        shape = tuple(var.aval.shape)
        if with_rows:
            want = list(shape)
            want[out_rows.axis] //= batch
            if tuple(out.shape[1:]) != tuple(want):
                refuse(
                    invals,
                    f"{eqn.primitive.name} gives each row a {tuple(out.shape[1:])} "
                    f"result where the row's share of {shape} was expected",
                )
            results.append(_mixed.from_rows(out, out_rows, batch))
        else:
            if tuple(out.shape[1:]) != shape:
                refuse(
                    invals,
                    f"{eqn.primitive.name} gives each row a {tuple(out.shape[1:])} "
                    f"result where {shape} was expected",
                )
            results.append(RowWise(leaf, out))
    return results
