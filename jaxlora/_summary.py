"""`summary`: which layers were adapted and how many parameters train."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import jax
from flax import nnx
from flax.core import meta

from jaxlora import _nnx, _token_records
from jaxlora._bank import AdapterBank, bank_of
from jaxlora._bank_nnx import LoraBank
from jaxlora._bank_nnx_trees import as_adapter_bank
from jaxlora._linen import LoraModel
from jaxlora._quantize import is_quantized
from jaxlora._tree import PyTree, adapter_at, iter_adapters, split


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One adapted layer: path, kernel/A/B shapes, rank, scale and adapter size (and, in a
    bank, the adapter's name)."""

    path: str
    kernel_shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    scale: float
    params: int
    adapter: str = ""


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `lorafy` did: adapted layers and trainable / total parameter counts.

    Attributes:
      layers: one row per adapter.
      trainable_params: parameters that train (adapters, ``modules_to_save``, biases).
      total_params: all parameters, adapters included.
      not_adapted: ``(name, why)`` of each weight the model contracts or looks up that got
        no adapter: not targeted, an embedding not named, or a use jaxlora cannot follow.
      base: how the frozen base is stored when part of it is quantized (its formats and
        bits per weight), else "".
      tokens: ``(weight, ids, (n_tokens, features))`` of each table with trained token rows.
    """

    layers: tuple[LayerSummary, ...]
    trainable_params: int
    total_params: int
    not_adapted: tuple[tuple[str, str], ...] = ()
    base: str = ""
    tokens: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    @property
    def trainable_fraction(self) -> float:
        """Trainable / total parameters."""
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        """The table, one row per layer pattern (layer numbers as ``*``) with its count."""
        named = any(l.adapter for l in self.layers)
        header = ("layer", "count", "kernel", "A", "B", "r", "scale", "params")
        header = ("adapter", *header) if named else header
        rows = [
            (
                *((l.adapter,) if named else ()),
                path,
                str(count),
                str(l.kernel_shape),
                str(l.a_shape),
                str(l.b_shape),
                str(l.rank),
                f"{l.scale:g}",
                f"{l.params * count:,}",
            )
            for (path, l), count in _grouped(
                (l.path, l, (l.adapter, l.kernel_shape, l.a_shape, l.b_shape, l.rank, l.scale))
                for l in self.layers
            )
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]
        ]
        if self.not_adapted:
            lines.append("seen, not adapted:")
            seen = _grouped((name, why, why) for name, why in self.not_adapted)
            lines += [
                f"  {name}: {why}" + (f" ({count} layers)" if count > 1 else "")
                for (name, why), count in seen
            ]
        lines += [f"token rows of {w}: ids {list(ids)}, {shape}" for w, ids, shape in self.tokens]
        if self.base:
            lines.append(self.base)
        lines.append(
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,}"
            f" || trainable%: {100 * self.trainable_fraction:.4f}"
        )
        return "\n".join(lines)


_LAYER_NUMBER = re.compile(r"(?<=[/._])\d+(?=[/.]|$)|^\d+(?=[/.])")


def _grouped(items: Iterable[tuple[str, Any, Any]]) -> list[tuple[tuple[str, Any], int]]:
    """``(path, value, key)`` items grouped by path pattern and ``key``, in first-seen order.

    The pattern writes each layer number in a path (a whole path step, or a ``_N`` suffix,
    e.g. ``layers_12`` or ``h/3``) as ``*``. A pattern that one path alone matches keeps
    that path.

    Returns:
      ``((pattern or path, first value), count)`` per group.
    """
    groups: dict[tuple[str, Any], list[tuple[str, Any]]] = {}
    for path, value, key in items:
        groups.setdefault((_LAYER_NUMBER.sub("*", path), key), []).append((path, value))
    return [
        ((pattern if len(members) > 1 else members[0][0], members[0][1]), len(members))
        for (pattern, _), members in groups.items()
    ]


def _size(tree: PyTree) -> int:
    """Parameters of ``tree``; a weight stored quantized counts its dense elements (a split
    tree's frozen side of it, codes None, counts none)."""
    leaves = jax.tree.leaves(meta.unbox(tree), is_leaf=is_quantized)
    return sum(math.prod(x.shape) for x in leaves if not is_quantized(x) or x.codes is not None)


def _base(tree: PyTree) -> str:
    """``"base: 12 weights stored nf4 (...), 4.13 bits per weight"``, or "" if none is."""
    stored = [x for x in jax.tree.leaves(meta.unbox(tree), is_leaf=is_quantized) if is_quantized(x)]
    if not stored:
        return ""
    bits = 8 * sum(q.nbytes for q in stored) / sum(math.prod(q.shape) for q in stored)
    formats = ", ".join(sorted({q.describe() for q in stored}))
    return f"base: {len(stored)} weights stored {formats}, {bits:.2f} bits per weight"


def _layer_summary(path, weight, a, b, scale, magnitude=None) -> LayerSummary:
    return LayerSummary(
        path=path,
        kernel_shape=tuple(weight.shape),
        a_shape=tuple(a.shape),
        b_shape=tuple(b.shape),
        rank=a.shape[-1],
        scale=scale,
        params=a.size + b.size + (0 if magnitude is None else magnitude.size),
    )


def _tokens(adapted: PyTree | nnx.Module) -> tuple:
    return tuple(
        (name, node.indices, tuple(node.values.shape))
        for name, node in _token_records.nodes_of(adapted)
    )


def _nnx_summary(module: nnx.Module) -> Summary:
    layers = tuple(
        _layer_summary(
            name, weight, adapter.lora_a, adapter.lora_b, adapter.scale, adapter.lora_magnitude
        )
        for name, weight, adapter in _nnx.adapted_weights(module)
    )
    trainable = nnx.state(module, _nnx.TrainableParam)
    params = nnx.state(module, nnx.Param)
    return Summary(
        layers,
        _size(trainable),
        _size(params),
        _nnx.not_adapted(module),
        _base(params),
        _tokens(module),
    )


def _bank_summary(bank: AdapterBank) -> Summary:
    rows = [
        dataclasses.replace(layer, adapter=name)
        for name in bank.names
        for layer in summary(bank.select(name)).layers
    ]
    order = list(dict.fromkeys(layer.path for layer in rows))
    rows.sort(key=lambda layer: order.index(layer.path))
    trainable, _ = split(bank)
    return Summary(tuple(rows), _size(trainable), _size(bank), (), _base(bank.base))


def summary(adapted: PyTree | nnx.Module, lora_model: LoraModel | None = None) -> Summary:
    """Per-layer adapter shapes and the trainable / total parameter counts.

    Args:
      adapted: an adapted linen tree (params collection or variables dict), an
        `AdapterBank` or NNX `LoraBank` (one row per adapter and layer, grouped by
        layer) or an NNX module.
      lora_model: linen: the `LoraModel` from `lorafy`, to list the weights seen and not
        adapted (NNX modules carry that list themselves).

    Returns:
      A `Summary`; ``print(summary)`` shows a table like PEFT's
      ``print_trainable_parameters``, per layer.
    """
    if isinstance(adapted, LoraBank):
        return _bank_summary(as_adapter_bank(adapted))
    if isinstance(adapted, nnx.Module):
        return _nnx_summary(adapted)
    inner, _ = bank_of(adapted)
    if isinstance(inner, AdapterBank):
        return _bank_summary(inner)
    layers = tuple(
        _layer_summary(
            name,
            meta.unbox(layer[weight]),
            meta.unbox(adapter_at(layer, weight).a),
            meta.unbox(adapter_at(layer, weight).b),
            adapter_at(layer, weight).scale,
            meta.unbox(adapter_at(layer, weight).magnitude),
        )
        for name, _, weight, layer in iter_adapters(inner)
    )
    trainable, _ = split(inner)
    not_adapted = () if lora_model is None else lora_model.not_adapted
    return Summary(
        layers, _size(trainable), _size(inner), not_adapted, _base(inner), _tokens(inner)
    )
