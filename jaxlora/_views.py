"""Which axes of a weight an array derived from it carries, through reshapes, transposes, slices.

A model may not contract a weight as stored: it transposes it (a tied output head,
``x @ E.T``), merges or splits its axes (``W.reshape(d, h * k)``), slices one part
(``W[0]``), or a scan hands one layer of a stacked weight to each step. A `View` records,
for each axis of the derived array, the weight axes behind it, so a contraction can be
read in the weight's own axes. In the forward pass the view also carries the adapter
factors, restricted the same way (a slice of the weight slices A or B), so every use
gets factors that match what it consumes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax

from jaxlora import _layout

# The label of the adapter axis of stacked factors in `Factors.a_axes` / ``b_axes``.
ADAPTERS = "adapters"


class Unsupported(Exception):
    """A derivation of a weight that jaxlora cannot follow (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Factors:
    """A weight's LoRA factors as a view sees them.

    Attributes:
      a: A, restricted like the view (one axis per entry of ``a_axes``).
      b: B, likewise.
      a_axes: for each axis of ``a``, the weight axis it follows, or None for the rank.
      b_axes: likewise for ``b``.
      scale: the LoRA scale.
      mixed: for a batch mixing adapters, the rows' adapter ids; ``a`` and ``b`` then stack
        every adapter's factors along the axis labelled `ADAPTERS` (see `_mixed`).
      dropout: whether LoRA dropout applies to the input (not for trained token rows).
      g: DoRA's output scale ``m / ‖W + scale · A ⊗ B‖`` (see `_dora`), laid out like ``b``
        with a rank axis of size 1 (so it follows ``b_axes`` and is restricted like B);
        None for plain LoRA.
    """

    a: Any
    b: Any
    a_axes: tuple[int | str | None, ...]
    b_axes: tuple[int | str | None, ...]
    scale: float
    mixed: Any = None
    dropout: bool = True
    g: Any = None

    @property
    def arrays(self) -> list[Any]:
        """A, B, and g when there is one: what a scan steps and a remat passes along."""
        return [self.a, self.b] if self.g is None else [self.a, self.b, self.g]

    def with_arrays(self, arrays: list[Any]) -> Factors:
        """The same factors with other `arrays` (e.g. one scan step's)."""
        a, b, *g = arrays
        return dataclasses.replace(self, a=a, b=b, g=g[0] if g else None)

    def restrict(self, axis: int, fn) -> Factors:
        """Factors with ``fn(array, position)`` applied where weight axis ``axis`` appears."""

        def one(x, axes):
            return fn(x, axes.index(axis)) if axis in axes else x

        g = None if self.g is None else one(self.g, self.b_axes)
        return dataclasses.replace(
            self, a=one(self.a, self.a_axes), b=one(self.b, self.b_axes), g=g
        )

    def drop(self, axis: int) -> Factors:
        """Factors after weight axis ``axis`` (of size 1 by now) is indexed away."""

        def one(x, axes):
            if axis not in axes:
                return x, axes
            pos = axes.index(axis)
            return jnp.squeeze(x, pos), axes[:pos] + axes[pos + 1 :]

        a, a_axes = one(self.a, self.a_axes)
        b, b_axes = one(self.b, self.b_axes)
        g = None if self.g is None else one(self.g, self.b_axes)[0]
        return dataclasses.replace(self, a=a, b=b, a_axes=a_axes, b_axes=b_axes, g=g)

    @property
    def input_axes(self) -> frozenset[int]:
        """Weight axes on A's side only (contracted with the input in the usual use)."""
        return frozenset(self.a_axes) - frozenset(self.b_axes) - {None}

    @property
    def output_axes(self) -> frozenset[int]:
        """Weight axes on B's side only."""
        return frozenset(self.b_axes) - frozenset(self.a_axes) - {None}


def factors_for(a: Any, b: Any, delta_eq: str, ndim: int, scale: float, g: Any = None) -> Factors:
    """`Factors` of a stored adapter on a weight of ``ndim`` axes, from its ``delta_eq``
    (with DoRA's output scale ``g``, laid out like ``b``, when given)."""
    a_labels, b_labels, kernel = _layout.delta_labels(delta_eq)
    n_stack = ndim - len(kernel)
    stack = tuple(range(n_stack))

    def axes(labels):
        own = tuple(kernel.index(c) + n_stack if c in kernel else None for c in labels)
        return stack + own

    return Factors(a, b, axes(a_labels), axes(b_labels), scale, g=g)


@dataclasses.dataclass(frozen=True)
class View:
    """An array derived from one weight, axis by axis.

    Attributes:
      weight: the weight's path.
      axes: for each axis of the array, the weight axes merged into it, in order.
      sizes: the current size of every weight axis (smaller after a slice).
      fixed: weight axes indexed away (a scan step, ``W[0]``).
      factors: the adapter's factors restricted like the array (forward pass only).
    """

    weight: str
    axes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    fixed: frozenset[int] = frozenset()
    factors: Factors | None = None

    @classmethod
    def of(cls, weight: str, shape: Sequence[int], factors: Factors | None = None) -> View:
        """The view of the weight itself."""
        return cls(weight, tuple((i,) for i in range(len(shape))), tuple(shape), factors=factors)

    @property
    def shape(self) -> tuple[int, ...]:
        """The derived array's shape."""
        return tuple(math.prod(self.sizes[a] for a in group) for group in self.axes)

    def with_factors(self, arrays: list[Any]) -> View:
        """The same view with other factor arrays (`Factors.arrays`, e.g. one scan step's)."""
        return dataclasses.replace(self, factors=self.factors.with_arrays(arrays))

    def scaled(self, factor: Any) -> View:
        """After multiplying the weight by a scalar: ``factor · (W + ΔW)``."""
        if self.factors is None:
            return self
        a = self.factors.a * factor.astype(self.factors.a.dtype)
        return dataclasses.replace(self, factors=dataclasses.replace(self.factors, a=a))

    def atoms(self, dims: Sequence[int]) -> tuple[int, ...]:
        """The weight axes behind the array axes ``dims``, in order."""
        return tuple(atom for d in dims for atom in self.axes[d])

    def _fix(self, atoms: Sequence[int]) -> View:
        factors = self.factors
        for atom in atoms:
            factors = None if factors is None else factors.drop(atom)
        return dataclasses.replace(self, fixed=self.fixed | set(atoms), factors=factors)

    def transpose(self, permutation: Sequence[int]) -> View:
        """After ``lax.transpose``."""
        return dataclasses.replace(self, axes=tuple(self.axes[p] for p in permutation))

    def reshape(self, new_shape: Sequence[int]) -> View:
        """After ``lax.reshape``: axes merge, or split where weight axes meet."""
        queue = [atom for group in self.axes for atom in group]
        groups: list[list[int]] = []
        for size in new_shape:
            group: list[int] = []
            while math.prod(self.sizes[a] for a in group) < size and queue:
                group.append(queue.pop(0))
            if math.prod(self.sizes[a] for a in group) != size:
                raise Unsupported(f"a reshape to {tuple(new_shape)} splits one of its axes")
            groups.append(group)
        leftover = [atom for atom in queue if self.sizes[atom] == 1]
        if len(leftover) != len(queue):
            raise Unsupported(f"a reshape to {tuple(new_shape)} splits one of its axes")
        view = dataclasses.replace(self, axes=tuple(tuple(g) for g in groups))
        return view._fix(leftover)

    def squeeze(self, dimensions: Sequence[int]) -> View:
        """After ``lax.squeeze``: the removed weight axes are indexed away."""
        gone = self.atoms(dimensions)
        kept = tuple(g for d, g in enumerate(self.axes) if d not in set(dimensions))
        return dataclasses.replace(self, axes=kept)._fix(gone)

    def expand(self, shape: Sequence[int], broadcast_dimensions: Sequence[int]) -> View:
        """After ``lax.broadcast_in_dim`` that only adds axes of size 1."""
        new = [()] * len(shape)
        for src, dst in enumerate(broadcast_dimensions):
            if shape[dst] != math.prod(self.sizes[a] for a in self.axes[src]):
                raise Unsupported("it is broadcast to a larger shape")
            new[dst] = self.axes[src]
        if any(not g and shape[d] != 1 for d, g in enumerate(new)):
            raise Unsupported("it is broadcast along a new axis")
        return dataclasses.replace(self, axes=tuple(new))

    def slice(self, starts: Sequence[int], limits: Sequence[int], strides: Sequence[int] | None):
        """After ``lax.slice``: the factors are sliced where the weight is."""
        view = self
        strides = strides or (1,) * len(starts)
        for d, (lo, hi, step) in enumerate(zip(starts, limits, strides, strict=True)):
            group = self.axes[d]
            full = math.prod(self.sizes[a] for a in group)
            if (lo, hi, step) == (0, full, 1):
                continue
            if len(group) != 1:
                raise Unsupported("a slice cuts across merged axes")
            (atom,) = group
            sizes = list(view.sizes)
            sizes[atom] = len(range(lo, hi, step))
            factors = view.factors
            if factors is not None:
                factors = factors.restrict(
                    atom,
                    lambda x, pos, lo=lo, hi=hi, step=step: lax.slice_in_dim(x, lo, hi, step, pos),
                )
            view = dataclasses.replace(view, sizes=tuple(sizes), factors=factors)
        return view

    def step(self) -> View:
        """The view one scan step sees: the leading axis is indexed away.

        The factors keep their arrays, which the scan replaces by each step's slice (see
        `leading_factors`); only their axis bookkeeping drops the stepped weight axis.
        """
        group = self.axes[0]
        if len(group) != 1:
            raise Unsupported("a scan steps over merged axes")
        (atom,) = group
        factors = self.factors
        if factors is not None:

            def drop(axes):
                return tuple(a for a in axes if a != atom)

            factors = dataclasses.replace(
                factors, a_axes=drop(factors.a_axes), b_axes=drop(factors.b_axes)
            )
        return dataclasses.replace(
            self, axes=self.axes[1:], fixed=self.fixed | {atom}, factors=factors
        )

    def leading_factors(self) -> list[Any]:
        """`Factors.arrays` with the weight axis a scan steps over moved to the front (where
        present)."""
        atom = self.axes[0][0]
        f = self.factors

        def one(x, axes):
            return jnp.moveaxis(x, axes.index(atom), 0) if atom in axes else x

        return [one(x, f.a_axes if i == 0 else f.b_axes) for i, x in enumerate(f.arrays)]

    def factor_array(self, which: str, dims: Sequence[int], rank_at: int) -> Any:
        """A or B laid out along the array axes ``dims`` (merged weight axes merged too).

        Args:
          which: ``"a"``, ``"b"`` or ``"g"`` (DoRA's output scale, on B's axes).
          dims: array axes in the order wanted; together their weight axes must be exactly
            the factor's weight axes.
          rank_at: where the rank axis goes among the result's axes.

        Returns:
          The factor, shaped ``[size of each dim]`` with the rank inserted at ``rank_at``.
        """
        f = self.factors
        x, axes = {"a": (f.a, f.a_axes), "b": (f.b, f.b_axes), "g": (f.g, f.b_axes)}[which]
        wanted = list(self.atoms(dims))
        if sorted(wanted) != sorted(a for a in axes if a is not None):
            raise Unsupported(
                f"its use contracts weight axes {sorted(wanted)} but the adapter's "
                f"{which.upper()} spans {sorted(a for a in axes if a is not None)}"
            )
        order = [axes.index(a) for a in wanted]
        order.insert(rank_at, axes.index(None))
        sizes = [math.prod(self.sizes[a] for a in self.axes[d]) for d in dims]
        sizes.insert(rank_at, x.shape[axes.index(None)])
        return jnp.transpose(x, order).reshape(sizes)
