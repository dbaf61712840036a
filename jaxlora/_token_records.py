"""Trained token rows in adapter files: their records, and re-attaching them on load.

`save_adapter` writes each `TrainableTokens`' values beside the LoRA factors, and a record
of where they belong (the weight, the ids, the axis they index, the base weight's shape);
`load_adapter` checks the record against the base it is given and puts the nodes back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import meta

from jaxlora._attach import default_sharding
from jaxlora._config import LoraConfig, adapter_name
from jaxlora._tokens import TrainableTokens, iter_tokens, tokens_key, values_sharding
from jaxlora._tokens_nnx import token_weights
from jaxlora._tree import PyTree, params_of, replace_at, subtree


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """The record of one weight's trained rows.

    Attributes:
      module: the path of the weight's module.
      weight: the weight's key in it.
      indices: the token ids.
      axis: the weight axis they index.
      looked_up: whether the weight is an embedding looked up by row.
      weight_shape: the base weight's shape.
      shape: ``(n_tokens, features)`` of the values.
      dtype: the values' dtype name.
    """

    module: str
    weight: str
    indices: tuple[int, ...]
    axis: int
    looked_up: bool
    weight_shape: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str

    @property
    def name(self) -> str:
        """The weight's name in messages (its layer's path for an ``embedding``)."""
        return adapter_name(self.module, self.weight)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `from_json` reads it back."""
        return {
            **dataclasses.asdict(self),
            "indices": list(self.indices),
            "weight_shape": list(self.weight_shape),
            "shape": list(self.shape),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TokenSpec:
        """The spec `to_json` wrote."""
        return cls(
            module=str(record["module"]),
            weight=str(record["weight"]),
            indices=tuple(int(i) for i in record["indices"]),
            axis=int(record["axis"]),
            looked_up=bool(record["looked_up"]),
            weight_shape=tuple(int(d) for d in record["weight_shape"]),
            shape=tuple(int(d) for d in record["shape"]),
            dtype=str(record["dtype"]),
        )


def nodes_of(adapted: PyTree | nnx.Module) -> list[tuple[str, TrainableTokens]]:
    """``(weight name, rows)`` of every weight with trained rows, linen tree or NNX module."""
    if isinstance(adapted, nnx.Module):
        return [(name, t.node()) for name, _, t in token_weights(adapted)]
    return [
        (adapter_name(module, weight), layer[tokens_key(weight)])
        for module, weight, layer in iter_tokens(params_of(adapted)[0])
    ]


def collect(params: PyTree, config: LoraConfig, *, who: str) -> list[tuple[TokenSpec, Any]]:
    """``[(spec, values)]`` of every `TrainableTokens` of an adapted tree.

    Raises:
      ValueError: the tree has trained rows but ``config`` names no token ids.
    """
    out = []
    for module, weight, layer in iter_tokens(params_of(params)[0]):
        node = layer[tokens_key(weight)]
        values = meta.unbox(node.values)
        spec = TokenSpec(
            module,
            weight,
            node.indices,
            node.axis,
            node.looked_up,
            tuple(meta.unbox(layer[weight]).shape),
            tuple(values.shape),
            jax.numpy.dtype(values.dtype).name,
        )
        out.append((spec, values))
    if out and config.trainable_token_indices is None:
        raise ValueError(
            f"{who}: weight {out[0][0].name!r} has trained token rows but the config has no "
            "trainable_token_indices. Pass the LoraConfig these params were adapted with."
        )
    return out


def check_base(params: PyTree, specs: Sequence[TokenSpec], *, source: str, who: str) -> None:
    """Raises unless every saved weight is in ``params`` with the saved shape."""
    inner, _ = params_of(params)
    for spec in specs:
        node = subtree(inner, spec.module)
        weight = node.get(spec.weight) if isinstance(node, Mapping) else None
        shape = None if weight is None else tuple(meta.unbox(weight).shape)
        if shape != spec.weight_shape:
            found = "no such weight" if shape is None else f"shape {shape}"
            raise ValueError(
                f"{who}: {source} trained token rows {list(spec.indices)} of weight "
                f"{spec.name!r} {spec.weight_shape}, but these params have {found} there. "
                "Load it onto the base model it was trained on (with the vocabulary resized "
                "as it was)."
            )


def abstract(
    params: PyTree, specs: Sequence[TokenSpec], sharding: jax.sharding.Sharding | None
) -> list[jax.ShapeDtypeStruct]:
    """The values as restore targets: on ``sharding`` if given, else placed like their
    table's features (see `_tokens.values_sharding`), else on the first local device."""
    inner, _ = params_of(params)
    out = []
    for s in specs:
        w = meta.unbox(subtree(inner, s.module)[s.weight])
        place = sharding or values_sharding(w, s.axis) or default_sharding()
        out.append(jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=place))
    return out


def placed(
    params: PyTree,
    specs: Sequence[TokenSpec],
    values: Sequence[Any],
    sharding: jax.sharding.Sharding | None,
) -> list[jax.Array]:
    """Rows read from a file, placed as `abstract` says."""
    places = abstract(params, specs, sharding)
    return [jax.device_put(v, p.sharding) for v, p in zip(values, places, strict=True)]


def attach(params: PyTree, specs: Sequence[TokenSpec], values: Sequence[Any]) -> PyTree:
    """``params`` with a `TrainableTokens` of the saved values beside each saved weight."""
    inner, rebuild = params_of(params)
    for spec, value in zip(specs, values, strict=True):
        node = TrainableTokens(value, spec.indices, spec.axis, spec.looked_up)
        inner = replace_at(
            inner, spec.module, functools.partial(_with_node, tokens_key(spec.weight), node)
        )
    return rebuild(inner)


def _with_node(key: str, node: TrainableTokens, layer: Mapping[str, Any]) -> dict[str, Any]:
    return {**layer, key: node}
