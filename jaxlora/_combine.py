"""Combining adapters of a bank into a new one, as PEFT's ``add_weighted_adapter``.

With weights ``w_i`` and each adapter's scale ``s_i`` (the new adapter has scale 1:
``alpha = rank``, as PEFT makes it):

- ``"cat"``: A and B concatenated along the rank, A's blocks scaled by ``w_i s_i``: the new
  ΔW is exactly ``Σ w_i ΔW_i``; ranks add up.
- ``"linear"``: ``A = Σ ±√|w_i s_i| A_i``, ``B = Σ √|w_i s_i| B_i`` (the sign on A): same
  rank and same layers required; not ``Σ w_i ΔW_i`` (cross terms), as in PEFT.
- ``"svd"``: the truncated SVD of ``Σ w_i ΔW_i`` at the given rank, computed layer by layer
  so no more than one layer's ΔW exists at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax.core import meta

from jaxlora import _layout
from jaxlora._bank import AdapterBank, _replaced
from jaxlora._bank_nnx import LoraBank
from jaxlora._bank_nnx_trees import as_adapter_bank, put_tree
from jaxlora._config import LoraConfig
from jaxlora._tree import LoraAdapter, adapter_key, iter_adapters, rebox

HOW = ("linear", "cat", "svd")


def _adapters(own: Any) -> dict[tuple[str, str], tuple[str, LoraAdapter]]:
    """``{(module, key): (name, adapter)}`` of one adapter's own tree."""
    return {
        (module, adapter_key(weight)): (name, layer[adapter_key(weight)])
        for name, module, weight, layer in iter_adapters(own)
    }


def _labels(delta_eq: str) -> tuple[str, str, str, str]:
    """``(stack, ins, rank, outs)`` labels of a ``delta_eq`` whose A is ``stack ins rank``
    and B ``stack rank outs`` (the layouts `lorafy` makes)."""
    a, b, kernel = _layout.delta_labels(delta_eq)
    (rank,) = set(a) & set(b) - set(kernel)
    stack = a[: a.index(rank)].rstrip("".join(c for c in a if c not in b))
    ins, outs = a[len(stack) : -1], b[len(stack) + 1 :]
    if a != f"{stack}{ins}{rank}" or b != f"{stack}{rank}{outs}":
        raise ValueError(
            f"add_weighted_adapter: adapters laid out as {delta_eq!r} cannot be combined."
        )
    return stack, ins, rank, outs


def _rank_axis(adapter: LoraAdapter) -> tuple[int, int]:
    """Where the rank axis is in A and in B (leading stack axes count)."""
    *_, outs = _labels(adapter.delta_eq)
    b = meta.unbox(adapter.b)
    return meta.unbox(adapter.a).ndim - 1, b.ndim - len(outs) - 1


def _pad_rank(x: Any, axis: int, rank: int) -> Any:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, pad)


def _cat(parts: list[tuple[float, LoraAdapter]], rank: int) -> tuple[Any, Any]:
    a_axis, b_axis = _rank_axis(parts[0][1])
    a = jnp.concatenate(
        [meta.unbox(p.a) * jnp.asarray(w * p.scale, meta.unbox(p.a).dtype) for w, p in parts],
        a_axis,
    )
    b = jnp.concatenate([meta.unbox(p.b) for _, p in parts], b_axis)
    return _pad_rank(a, a_axis, rank), _pad_rank(b, b_axis, rank)


def _linear(parts: list[tuple[float, LoraAdapter]]) -> tuple[Any, Any]:
    a = sum(
        math.copysign(math.sqrt(abs(w * p.scale)), w * p.scale) * meta.unbox(p.a) for w, p in parts
    )
    b = sum(math.sqrt(abs(w * p.scale)) * meta.unbox(p.b) for w, p in parts)
    return a, b


def _svd(parts: list[tuple[float, LoraAdapter]], rank: int) -> tuple[Any, Any]:
    """Rank-``rank`` factors of ``Σ w_i ΔW_i``, from its SVD over (inputs, outputs)."""
    ref = parts[0][1]
    stack, ins, r, outs = _labels(ref.delta_eq)
    a_labels, b_labels = f"{stack}{ins}{r}", f"{stack}{r}{outs}"
    a0, b0 = meta.unbox(ref.a), meta.unbox(ref.b)
    lead = a0.shape[: a0.ndim - len(a_labels)]
    in_shape = a0.shape[a0.ndim - 1 - len(ins) : a0.ndim - 1]
    out_shape = b0.shape[b0.ndim - len(outs) :]
    stack_shape = a0.shape[len(lead) : len(lead) + len(stack)]
    eq = f"...{a_labels},...{b_labels}->...{stack}{ins}{outs}"
    delta = sum(
        w * p.scale * jnp.einsum(eq, meta.unbox(p.a).astype(jnp.float32), meta.unbox(p.b))
        for w, p in parts
    )
    matrix = delta.reshape(*lead, *stack_shape, math.prod(in_shape), math.prod(out_shape))
    u, s, vh = jnp.linalg.svd(matrix, full_matrices=False)
    # a rank above min(fan_in, fan_out) keeps every singular value and pads with zeros
    a = _pad_rank(u[..., :rank], u.ndim - 1, rank).reshape(*lead, *stack_shape, *in_shape, rank)
    b = _pad_rank(s[..., :rank, None] * vh[..., :rank, :], vh.ndim - 2, rank)
    b = b.reshape(*lead, *stack_shape, rank, *out_shape)
    return a.astype(a0.dtype), b.astype(b0.dtype)


def _set(tree: dict, module: str, key: str, value: Any) -> None:
    node = tree
    for k in module.split("/") if module else ():
        node = node.setdefault(k, {})
    node[key] = value


def add_weighted_adapter(
    bank: AdapterBank | LoraBank,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> AdapterBank | LoraBank:
    """A bank with a new adapter combining others, as PEFT's ``add_weighted_adapter``.

    Args:
      bank: an `AdapterBank` (linen; a new bank is returned) or an NNX `LoraBank` (the
        adapter is added in place and the bank returned).
      adapters: names of the adapters to combine.
      weights: one weight per adapter (negative allowed).
      adapter_name: the new adapter's name.
      combination_type: ``"cat"`` (ranks add; ΔW exactly ``Σ w_i ΔW_i``), ``"linear"``
        (same layers and rank; PEFT's weighted sum of A and of B) or ``"svd"`` (``Σ w_i
        ΔW_i`` truncated to ``svd_rank``, layer by layer).
      svd_rank: the rank for ``"svd"`` (default: the largest of the adapters').

    Returns:
      The bank with the new adapter (scale 1, ``alpha = rank``, as PEFT makes it) last.

    Example:
      >>> bank = jaxlora.add_weighted_adapter(bank, ["a", "b"], [0.7, 0.3], "ab", "cat")
    """
    if isinstance(bank, LoraBank):
        view = as_adapter_bank(bank)
        new = add_weighted_adapter(
            view, adapters, weights, adapter_name, combination_type, svd_rank
        )
        put_tree(bank, adapter_name, new.select(adapter_name), new.config(adapter_name))
        return bank
    how, rank, name = combination_type, svd_rank, adapter_name
    if how not in HOW:
        raise ValueError(f"add_weighted_adapter: combination_type={how!r}; use one of {HOW}.")
    if len(weights) != len(adapters) or not adapters:
        raise ValueError(
            f"add_weighted_adapter: give one weight per adapter ({len(adapters)} adapters, "
            f"{len(weights)} weights)."
        )
    owns = []
    for n in adapters:
        bank._check_name(n)
        own = bank.adapters[n]
        if _replaced(own):
            raise ValueError(
                f"add_weighted_adapter: adapter {n!r} trains whole modules (modules_to_save "
                "or biases); only LoRA factors can be combined."
            )
        owns.append(_adapters(own))
    layers = sorted(set().union(*owns))
    ranks = [{k: v[1].rank for k, v in own.items()} for own in owns]
    if how == "linear":
        for n, own, r in zip(adapters, owns, ranks, strict=True):
            if set(own) != set(owns[0]) or set(r.values()) != set(ranks[0].values()):
                raise ValueError(
                    f"add_weighted_adapter: adapters {adapters[0]!r} and {n!r} differ in their "
                    "layers or ranks; combination_type='linear' needs the same targets and "
                    "rank. Use 'cat' (exact) or 'svd'."
                )
        new_rank = max(ranks[0].values())
    elif how == "cat":
        new_rank = sum(max(r.values()) for r in ranks)
    else:
        new_rank = rank or max(max(r.values()) for r in ranks)
    new: dict = {}
    names = []
    for layer in layers:
        parts = [(w, own[layer][1]) for w, own in zip(weights, owns, strict=True) if layer in own]
        ref = parts[0][1]
        if how == "cat":
            a, b = _cat(parts, new_rank)
        elif how == "linear":
            a, b = _linear(parts)
        else:
            a, b = _svd(parts, new_rank)
        adapter = LoraAdapter(rebox(ref.a, a), rebox(ref.b, b), 1.0, ref.delta_eq)
        _set(new, *layer, adapter)
        names.append(next(own[layer][0] for own in owns if layer in own))
    targets = [f"re:{re.escape(n)}" for n in names]
    config = LoraConfig(rank=new_rank, alpha=new_rank, targets=targets)
    return _with(bank, name, new, config)


def _with(bank: AdapterBank, name: str, own: Mapping, config: LoraConfig) -> AdapterBank:
    if name in bank.adapters or name == AdapterBank.BASE:
        raise ValueError(
            f"add_weighted_adapter: an adapter named {name!r} is already in this bank."
        )
    configs = {n: bank.config(n) for n in bank.names}
    return AdapterBank(
        bank.base, {**bank.adapters, name: own}, {**configs, name: config}, bank.frozen
    )
