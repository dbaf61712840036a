"""The operations that consume a weight, and an adapter's share of each.

A contraction (``dot_general``: ``jnp.einsum``, ``jnp.dot``, ``@``; ``ragged_dot`` of a
mixture of experts; ``conv_general_dilated``) or an embedding lookup (``gather`` of whole
rows) is read in the weight's own axes as a `Use`: which weight axes meet the input,
which are batched (experts), which stay in the output. `adapted_output` adds
``scale · x A B`` in the form of the operation's own output, without forming ΔW: the
input meets A (or, for a transposed use such as a tied output head, Bᵀ) in one plain
2-D matmul where it can, then the rank-r result meets the other factor.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxlora import _layout
from jaxlora._views import Unsupported, View

CONTRACTIONS = ("dot_general", "ragged_dot_general", "conv_general_dilated", "gather")


@dataclasses.dataclass(frozen=True)
class Use:
    """One operation consuming a weight, in the weight's axes.

    Attributes:
      op: the primitive (``"dot_general"``, ``"gather"``, ...).
      contracted: weight axes contracted with the input (for a lookup: the vocabulary).
      batch: weight axes batched with the input (experts, groups).
      free: weight axes kept in the output.
      fixed: weight axes indexed away before the use (a scan step, ``W[0]``).
    """

    op: str
    contracted: tuple[int, ...]
    batch: tuple[int, ...]
    free: tuple[int, ...]
    fixed: frozenset[int]


def _free(ndim: int, *used: Sequence[int]) -> tuple[int, ...]:
    taken = {d for dims in used for d in dims}
    return tuple(d for d in range(ndim) if d not in taken)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """A use's axes on the weight operand (array axes of the view) and on the input."""

    w_contract: tuple[int, ...]
    w_batch: tuple[int, ...]
    w_free: tuple[int, ...]
    x_contract: tuple[int, ...]
    x_batch: tuple[int, ...]
    weight_first: bool


def _dot_geometry(eqn_params: dict, weight_pos: int, w_ndim: int) -> _Geometry:
    (lc, rc), (lb, rb) = eqn_params["dimension_numbers"]
    if weight_pos == 1:
        wc, wb, xc, xb = rc, rb, lc, lb
    else:
        wc, wb, xc, xb = lc, lb, rc, rb
    wc, wb, xc, xb = (tuple(int(d) for d in dims) for dims in (wc, wb, xc, xb))
    return _Geometry(wc, wb, _free(w_ndim, wc, wb), xc, xb, weight_pos == 0)


def _ragged_geometry(eqn_params: dict, weight_pos: int, w_ndim: int) -> _Geometry:
    dims = eqn_params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dims.dot_dimension_numbers
    standard = (
        weight_pos == 1
        and w_ndim == 3
        and tuple(dims.rhs_group_dimensions) == (0,)
        and tuple(lc) == (1,)
        and tuple(rc) == (1,)
        and not lb
        and not rb
        and tuple(dims.lhs_ragged_dimensions) == (0,)
        and eqn_params.get("group_offset") is None
    )
    if not standard:
        raise Unsupported("it is used by a ragged_dot other than (tokens, in) x (groups, in, out)")
    return _Geometry((1,), (0,), (2,), (1,), (), False)


def _conv_geometry(eqn_params: dict, weight_pos: int, w_ndim: int) -> _Geometry:
    if weight_pos != 1:
        raise Unsupported("it is the input of a convolution, not its kernel")
    if eqn_params["feature_group_count"] != 1 or eqn_params["batch_group_count"] != 1:
        raise Unsupported("grouped convolutions (feature_group_count > 1) are not supported")
    rhs_spec = eqn_params["dimension_numbers"].rhs_spec
    out_dim = rhs_spec[0]
    return _Geometry(tuple(d for d in rhs_spec if d != out_dim), (), (out_dim,), (), (), False)


def _gather_geometry(eqn_params: dict, weight_pos: int, w_ndim: int, out_ndim: int) -> _Geometry:
    dn = eqn_params["dimension_numbers"]
    lookup = (
        weight_pos == 0
        and w_ndim == 2
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and tuple(dn.offset_dims) == (out_ndim - 1,)
        and not dn.operand_batching_dims
    )
    if not lookup:
        raise Unsupported("it is gathered other than row by row (an embedding lookup)")
    return _Geometry((0,), (), (1,), (), (), True)


def geometry(op: str, eqn_params: dict, weight_pos: int, w_ndim: int, out_ndim: int) -> _Geometry:
    """How the weight operand (at position ``weight_pos``) of one operation is used."""
    if op == "dot_general":
        return _dot_geometry(eqn_params, weight_pos, w_ndim)
    if op == "ragged_dot_general":
        return _ragged_geometry(eqn_params, weight_pos, w_ndim)
    if op == "conv_general_dilated":
        return _conv_geometry(eqn_params, weight_pos, w_ndim)
    if op == "gather":
        return _gather_geometry(eqn_params, weight_pos, w_ndim, out_ndim)
    raise Unsupported(f"it is used by {op}")


def use_of(op: str, geo: _Geometry, view: View) -> Use:
    """The `Use` of ``view``'s weight by one operation."""
    return Use(
        op=op,
        contracted=view.atoms(geo.w_contract),
        batch=view.atoms(geo.w_batch),
        free=view.atoms(geo.w_free),
        fixed=view.fixed,
    )


def _first_second(view: View, geo: _Geometry) -> tuple[str, str]:
    """Which factor meets the input first: A normally, B for a transposed use (``x @ Wᵀ``)."""
    contracted = set(view.atoms(geo.w_contract))
    if contracted == set(view.factors.input_axes):
        return "a", "b"
    if contracted == set(view.factors.output_axes):
        return "b", "a"
    raise Unsupported(
        f"this use contracts weight axes {sorted(contracted)}, the adapter was laid out for "
        f"{sorted(view.factors.input_axes)}"
    )


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape, out_sharding=jax.typeof(x).sharding)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _dot_delta(x, first, second, *, geo: _Geometry, scale: float):
    """``scale · x·first·second`` laid out as ``dot_general(x, W)`` (or ``(W, x)``) lays it out."""
    nb = len(geo.w_batch)
    if not nb:
        y = _layout.linear_delta(x, first, second, geo.x_contract, scale)
    else:
        nc = len(geo.w_contract)
        dims = ((geo.x_contract, tuple(range(nb, nb + nc))), (geo.x_batch, tuple(range(nb))))
        h = lax.dot_general(x.astype(first.dtype), first, dims)
        h = h * jnp.asarray(scale, h.dtype)
        batch = tuple(range(nb))
        y = lax.dot_general(h, second, (((h.ndim - 1,), (nb,)), (batch, batch)))
    if geo.weight_first:  # dot_general puts the weight's free axes before the input's
        n_x = y.ndim - nb - len(geo.w_free)
        y = jnp.moveaxis(y, tuple(range(nb, nb + n_x)), tuple(range(y.ndim - n_x, y.ndim)))
    return y


def _grouped_delta(x, first, second, group_sizes, *, scale: float):
    h = lax.ragged_dot(x.astype(first.dtype), first, group_sizes)
    return lax.ragged_dot(h * jnp.asarray(scale, h.dtype), second, group_sizes)


def _expert_mask_delta(x, first, second, group_sizes, *, scale: float):
    """``_grouped_delta`` as two dense dots: ``x`` times every group's A side by side, each
    row keeping its own group's ``r`` columns, times the groups' B stacked."""
    (m, _), (groups, k, r) = x.shape, first.shape
    end = jnp.cumsum(group_sizes)
    row = jnp.arange(m)[:, None]
    mask = (row >= end - group_sizes) & (row < end)  # (rows, groups); rows past the end: none
    h = x.astype(first.dtype) @ jnp.moveaxis(first, 0, 1).reshape(k, groups * r)
    h = h.reshape(m, groups, r) * (mask[:, :, None] * jnp.asarray(scale, h.dtype))
    return h.reshape(m, groups * r) @ second.reshape(groups * r, -1)


def _ragged_delta(x, first, second, group_sizes, *, scale: float):
    # XLA:CPU lowers ragged_dot as a dense dot over every group of a masked copy of its
    # input: each of the adapter's ragged_dots (and their gradients) costs such a copy, which
    # made an expert adapter 1.6x its frozen layer (experiments/moe_adapter_cost.py). The
    # dense form has the same FLOP multiple there without the copies. Where ragged_dot is a
    # grouped kernel (GPU, TPU) the grouped form does `groups`x fewer FLOPs.
    return lax.platform_dependent(
        x,
        first,
        second,
        group_sizes,
        cpu=functools.partial(_expert_mask_delta, scale=scale),
        default=functools.partial(_grouped_delta, scale=scale),
    )


def _gather_delta(ids, first, second, *, eqn_params: dict, scale: float):
    params = {**eqn_params, "slice_sizes": (1, first.shape[-1])}
    rows = lax.gather(first, ids, **params)
    return (rows * jnp.asarray(scale, rows.dtype)) @ second


def _conv_delta(x, first, second, *, eqn_params: dict, scale: float):
    out_feature = eqn_params["dimension_numbers"].out_spec[1]
    params = {**eqn_params, "preferred_element_type": None}
    h = lax.conv_general_dilated_p.bind(x.astype(first.dtype), first, **params)
    h = jnp.moveaxis(h, out_feature, -1) * jnp.asarray(scale, h.dtype)
    return jnp.moveaxis(h @ second, -1, out_feature)


def _placed(g: jax.Array, positions: Sequence[int], ndim: int) -> jax.Array:
    """``g`` with its axes at ``positions`` of an ``ndim``-axis array, size 1 elsewhere."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    g = jnp.transpose(g, order)
    return jnp.expand_dims(g, tuple(d for d in range(ndim) if d not in set(positions)))


def _dora_output(op, geo, y, x, view, first_name, first, second, fn, rebind, dropout, key):
    """DoRA's output for one use, as PEFT's ``DoraLinearVariant.forward`` computes it.

    ``y + (g - 1) · base + g · scale · x' A B`` with ``g = m / ‖W + scale · A ⊗ B‖`` per
    output feature, ``x'`` the input after LoRA dropout and ``base`` the frozen weight's
    output on ``x'``: ``y`` itself without dropout (then ``g · y + g · scale · x A B``), one
    more contraction with it (PEFT's ``F.linear(dropout(x), W)``). ``g`` multiplies B
    (rank x out) rather than the adapter's output (tokens x out): the same product, one pass
    over the activations fewer each way. A lookup has no dropout. A transposed use (a tied
    head, ``x @ Wᵀ``) contracts the output features: there the merged weight's ``g`` scales
    the input, ``W' x = (W + ΔW)(g · x)``.
    """
    nb = len(geo.w_batch)
    if first_name == "b":
        g = jnp.squeeze(view.factor_array("g", geo.w_batch + geo.w_contract, nb), nb)
        x = x * _placed(g, geo.x_batch + geo.x_contract, x.ndim).astype(x.dtype)
        return _layout.add_delta(rebind(x), fn, _dropout(x, dropout, key), first, second)
    g_b = view.factor_array("g", geo.w_batch + geo.w_free, nb)  # laid out like ``second``
    n_free = len(geo.w_free)
    if op == "gather":
        free = tuple(range(y.ndim - n_free, y.ndim))
    elif geo.weight_first:  # dot_general: batch, the weight's free axes, then the input's
        free = tuple(range(nb, nb + n_free))
    else:
        free = tuple(range(y.ndim - n_free, y.ndim))
    g_y = _placed(jnp.squeeze(g_b, nb), (*range(nb), *free), y.ndim)
    dropped = op != "gather" and dropout > 0.0 and key is not None
    x_lora = _dropout(x, dropout, key) if dropped else x

    def output(y, x, first, second, g_b, g_y, base):
        lora = fn(x, first, second * g_b.astype(second.dtype)).astype(jnp.float32)
        y32 = y.astype(jnp.float32)
        frozen = g_y * y32 if base is None else y32 + (g_y - 1.0) * base.astype(jnp.float32)
        return frozen + lora

    base = rebind(x_lora) if dropped else None
    return _layout.replace_output(y, output, x_lora, first, second, g_b, g_y, base)


def adapted_output(
    op: str,
    eqn_params: dict,
    y: jax.Array,
    operands: Sequence[Any],
    weight_pos: int,
    view: View,
    *,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    rebind: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``y`` (the operation's output on the frozen weight) plus the adapter's share.

    Args:
      op: the primitive's name.
      eqn_params: the primitive's parameters.
      y: its output.
      operands: its operands (the weight view at ``weight_pos``).
      weight_pos: the weight operand's position.
      view: the weight's view, with factors.
      dropout: LoRA dropout rate on the input (not for lookups).
      key: PRNG key for dropout.
      rebind: the operation again on another input (same weight): DoRA needs it for
        LoRA dropout and for transposed uses.

    Returns:
      ``y + scale · x A B`` (or its equivalent for the operation), like ``y``; with DoRA
      (``view.factors.g``) see `_dora_output`.
    """
    w = operands[weight_pos]
    geo = geometry(op, eqn_params, weight_pos, w.ndim, y.ndim)
    first_name, second_name = _first_second(view, geo)
    scale = view.factors.scale
    nb = len(geo.w_batch)
    if op == "conv_general_dilated":
        # A is a kernel like W with r output channels; B mixes them (PEFT's Conv LoRA).
        spec = eqn_params["dimension_numbers"].rhs_spec
        order = [d for d in range(w.ndim) if d != spec[0]]
        first = view.factor_array(first_name, order, spec[0])
        second = view.factor_array(second_name, geo.w_free, 0)
        fn = functools.partial(_conv_delta, eqn_params=eqn_params, scale=scale)
        x = _dropout(operands[0], dropout, key)
        return _layout.add_delta(y, fn, x, first, second)
    first = view.factor_array(first_name, geo.w_batch + geo.w_contract, nb + len(geo.w_contract))
    second = view.factor_array(second_name, geo.w_batch + geo.w_free, nb)
    dora = view.factors.g is not None
    if op == "gather":
        fn = functools.partial(_gather_delta, eqn_params=eqn_params, scale=scale)
        if dora:
            args = (view, first_name, first, second, fn, rebind, 0.0, None)
            return _dora_output(op, geo, y, operands[1], *args)
        return _layout.add_delta(y, fn, operands[1], first, second)
    if op == "ragged_dot_general":
        fn = functools.partial(_ragged_delta, scale=scale)
        x = _dropout(operands[1 - weight_pos], dropout, key)
        return _layout.add_delta(y, fn, x, first, second, operands[2])
    fn = functools.partial(_dot_delta, geo=geo, scale=scale)
    if dora:
        args = (view, first_name, first, second, fn, rebind, dropout, key)
        return _dora_output(op, geo, y, operands[1 - weight_pos], *args)
    x = _dropout(operands[1 - weight_pos], dropout, key)
    return _layout.add_delta(y, fn, x, first, second)
