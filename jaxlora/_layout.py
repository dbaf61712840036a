"""Adapter shapes and math for each kind of adapted layer, shared by linen and NNX.

A layer's kernel axes are either contracted with the input (``in``), kept in the output
(``out``), or both (``batch``, e.g. a per-head Einsum). A has axes ``batch + in + (r,)``,
B has ``batch + (r,) + out``; ``delta_eq`` is the einsum that builds the kernel-shaped
ΔW from them, with ``...`` standing for the stacked-layer axes of scanned modules.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

LINEAR, EINSUM, EMBED = "linear", "einsum", "embed"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one layer's adapter is shaped.

    Attributes:
      kind: ``"linear"`` (Dense, DenseGeneral, Linear, LinearGeneral), ``"einsum"`` or
        ``"embed"``.
      kernel_shape: the kernel (or embedding table) of one layer, without stack axes.
      a_shape: A without stack axes; its last axis is the rank.
      b_shape: B without stack axes.
      fan_in: product of the contracted kernel axes (vocabulary size for embeddings).
      fan_out: product of the output kernel axes.
      delta_eq: einsum ``"...A,...B->...kernel"`` building ΔW.
    """

    kind: str
    kernel_shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    delta_eq: str


def delta_labels(delta_eq: str) -> tuple[str, str, str]:
    """The A, B and kernel labels of a ``delta_eq`` (stack axes ``...`` dropped).

    Example:
      >>> delta_labels("...ar,...rb->...ab")
      ('ar', 'rb', 'ab')
    """
    operands, kernel = delta_eq.replace("...", "").split("->")
    a, b = operands.split(",")
    return a, b, kernel


def linear_layout(in_shape: tuple[int, ...], out_shape: tuple[int, ...], rank: int) -> Layout:
    """Layout of a kernel ``(*in_shape, *out_shape)`` contracted over ``in_shape``."""
    letters = iter(string.ascii_letters.replace("r", ""))
    ins = "".join(next(letters) for _ in in_shape)
    outs = "".join(next(letters) for _ in out_shape)
    return Layout(
        kind=LINEAR,
        kernel_shape=(*in_shape, *out_shape),
        a_shape=(*in_shape, rank),
        b_shape=(rank, *out_shape),
        fan_in=math.prod(in_shape),
        fan_out=math.prod(out_shape),
        delta_eq=f"...{ins}r,...r{outs}->...{ins}{outs}",
    )


def embed_layout(num_embeddings: int, features: int, rank: int) -> Layout:
    """Layout of an embedding table ``(num_embeddings, features)``."""
    layout = linear_layout((num_embeddings,), (features,), rank)
    return dataclasses.replace(layout, kind=EMBED)


@dataclasses.dataclass(frozen=True)
class _EinsumLabels:
    lhs: str
    rhs: str
    out: str
    batch: str
    ins: str
    outs: str
    rank: str


def _einsum_labels(einsum_str: str) -> _EinsumLabels:
    spec = einsum_str.replace(" ", "")
    try:
        operands, out = spec.split("->")
        lhs, rhs = operands.split(",")
    except ValueError:
        raise ValueError(
            f"Einsum {einsum_str!r}: jaxlora adapts einsums of the form 'inputs,kernel->out'."
        ) from None
    summed = [c for c in rhs if c not in lhs and c not in out]
    if summed or "." in rhs:
        raise ValueError(
            f"Einsum {einsum_str!r}: kernel axes {summed or '...'} are neither contracted "
            "with the input nor kept in the output, so the layer cannot carry a LoRA adapter; "
            "exclude it from the targets."
        )
    rank = next(c for c in string.ascii_letters if c not in spec)
    return _EinsumLabels(
        lhs=lhs,
        rhs=rhs,
        out=out,
        batch="".join(c for c in rhs if c in lhs and c in out),
        ins="".join(c for c in rhs if c in lhs and c not in out),
        outs="".join(c for c in rhs if c in out and c not in lhs),
        rank=rank,
    )


def einsum_layout(einsum_str: str, kernel_shape: tuple[int, ...], rank: int) -> Layout:
    """Layout of an ``Einsum`` layer's kernel, read from its equation."""
    lab = _einsum_labels(einsum_str)
    size = dict(zip(lab.rhs, kernel_shape, strict=True))
    a_labels = lab.batch + lab.ins + lab.rank
    b_labels = lab.batch + lab.rank + lab.outs
    return Layout(
        kind=EINSUM,
        kernel_shape=tuple(kernel_shape),
        a_shape=(*(size[c] for c in a_labels[:-1]), rank),
        b_shape=(*(size[c] for c in lab.batch), rank, *(size[c] for c in lab.outs)),
        fan_in=math.prod(size[c] for c in lab.ins),
        fan_out=math.prod(size[c] for c in lab.outs),
        delta_eq=f"...{a_labels},...{b_labels}->...{lab.rhs}",
    )


def init_factors(
    key: jax.Array,
    layout: Layout,
    stack: tuple[int, ...],
    *,
    init: str,
    dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array]:
    """Fresh ``(A, B)`` for one layer: B is zero, so the adapter starts as a no-op.

    Args:
      key: PRNG key for A.
      layout: the layer's layout.
      stack: leading stacked-layer axes (``()`` unless the layer is scanned).
      init: ``"kaiming"`` (He-uniform with PEFT's bound ``1/sqrt(fan_in)``) or
        ``"gaussian"`` (std ``1/rank``). Embedding adapters draw A from N(0, 1).
      dtype: parameter dtype.

    Returns:
      ``A`` of shape ``stack + layout.a_shape`` and ``B`` of ``stack + layout.b_shape``.
    """
    a_shape = (*stack, *layout.a_shape)
    rank = layout.a_shape[-1]
    if layout.kind == EMBED:
        a = jax.random.normal(key, a_shape, dtype)
    elif init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / rank
    else:
        bound = 1.0 / math.sqrt(layout.fan_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return a, jnp.zeros((*stack, *layout.b_shape), dtype)


def delta_weight(a: jax.Array, b: jax.Array, delta_eq: str, scale: float) -> jax.Array:
    """``scale · A ⊗ B`` in the kernel's layout, accumulated in float32."""
    return scale * jnp.einsum(delta_eq, a.astype(jnp.float32), b.astype(jnp.float32))


def linear_delta(
    x: jax.Array, a: jax.Array, b: jax.Array, axis: tuple[int, ...], scale: float
) -> jax.Array:
    """``scale · x @ A @ B`` for a Dense-like layer contracting ``x`` over ``axis``.

    The input is flattened to ``(tokens, fan_in)`` so both adapter matmuls are plain 2-D
    GEMMs: on 3-D activations XLA transposes large buffers in the backward pass.

    Args:
      x: input ``(..., *in_shape)`` (contracted axes anywhere, given by ``axis``).
      a: ``(*in_shape, r)``.
      b: ``(r, *out_shape)``.
      axis: the contracted axes of ``x``, in kernel order.
      scale: LoRA scale.

    Returns:
      ``(*rest_of_x, *out_shape)``, in the adapter dtype.
    """
    n_in = a.ndim - 1
    axis = tuple(ax % x.ndim for ax in axis)
    x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n_in, x.ndim)))
    lead = x.shape[: x.ndim - n_in]
    rank = a.shape[-1]
    h = x.reshape(-1, math.prod(a.shape[:-1])).astype(a.dtype) @ a.reshape(-1, rank)
    y = (h * jnp.asarray(scale, h.dtype)) @ b.reshape(rank, -1)
    return y.reshape(*lead, *b.shape[1:])


def einsum_delta(
    x: jax.Array, a: jax.Array, b: jax.Array, einsum_str: str, scale: float
) -> jax.Array:
    """``scale · einsum(x, A ⊗ B)`` for an Einsum layer, without forming ΔW."""
    lab = _einsum_labels(einsum_str)
    kept = "".join(c for c in lab.lhs if c not in lab.ins)
    h = jnp.einsum(
        f"{lab.lhs},{lab.batch}{lab.ins}{lab.rank}->{kept}{lab.rank}", x.astype(a.dtype), a
    )
    h = h * jnp.asarray(scale, h.dtype)
    return jnp.einsum(f"{kept}{lab.rank},{lab.batch}{lab.rank}{lab.outs}->{lab.out}", h, b)


def embed_delta(ids: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale · A[ids] @ B``: the adapter's share of an embedding lookup."""
    return (jnp.take(a, ids, axis=0) * jnp.asarray(scale, a.dtype)) @ b


def attend_delta(query: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale · query @ (A @ B)ᵀ``: the adapter's share of ``Embed.attend``."""
    h = query.astype(b.dtype) @ b.T
    return (h * jnp.asarray(scale, h.dtype)) @ a.T


def add_delta(y: jax.Array, delta: Callable[..., jax.Array], *operands: jax.Array) -> jax.Array:
    """``y + delta(*operands)``, in ``y``'s dtype and, under explicit sharding, its sharding.

    With `jax.sharding.AxisType.Explicit` mesh axes, shardings are part of the types: the
    adapter matmuls contract axes that may be sharded (a row-parallel A) and a sum needs
    equal shardings. There the delta is computed with those axes ``Auto`` (XLA picks
    the collectives, as in classic ``jit``) and resharded to ``y``'s sharding, so the
    base layer decides the layout and the adapter follows. Otherwise this is plain math.

    Args:
      y: the base layer's output.
      delta: the adapter's contribution, e.g. ``functools.partial(linear_delta, ...)``.
      *operands: the arrays ``delta`` takes (input, A, B).

    Returns:
      ``y + delta(*operands)``, shaped, typed and sharded like ``y``.
    """
    return y + _like(y, delta)(*operands).astype(y.dtype)


def replace_output(y: jax.Array, output: Callable[..., jax.Array], *operands: Any) -> jax.Array:
    """``output(y, *operands)`` in ``y``'s dtype and, under explicit sharding, its sharding
    (as `add_delta`; DoRA rescales ``y`` as well as adding to it)."""
    return _like(y, output)(y, *operands).astype(y.dtype)


def _like(y: jax.Array, fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``fn`` computed with ``y``'s explicit mesh axes ``Auto`` and resharded like ``y``."""
    sharding = jax.typeof(y).sharding
    explicit = getattr(getattr(sharding, "mesh", None), "explicit_axes", ())
    if explicit:
        return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=sharding)
    return fn
