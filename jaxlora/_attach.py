"""Saved adapters re-attached to a base tree.

`to_residual` turns base weights into the residuals an adapter initialised from the
weights was trained on; `layer_shardings` and `leaf_sharding` say where each restored
array goes; `attach` builds the adapted tree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax.core import meta
from jax.sharding import Sharding

from jaxlora import _init_from_weights, _sharding
from jaxlora._records import LayerSpec, LeafSpec, unmark
from jaxlora._tree import (
    LoraAdapter,
    PyTree,
    Trainable,
    adapter_key,
    params_of,
    rebox,
    replace_at,
    subtree,
)


def to_residual(params: PyTree, layers: Sequence[LayerSpec], init: str) -> PyTree:
    """``params`` whose base weights under ``layers`` are their residuals for ``init``.

    For an init from the weight (PiSSA, OLoRA: see `jaxlora._init_from_weights`) the
    adapter was trained on ``W - scale · A0 ⊗ B0``, not on ``W``; as PEFT does when it loads
    such an adapter, the residual is recomputed from the untouched base, layer by layer and
    where each weight lives. Layers that already hold an adapter keep their weight (an
    adapted tree's base is already the residual); other inits change nothing.
    """
    if not _init_from_weights.is_from_weights(init):
        return params
    inner, rebuild = params_of(params)

    def residual(spec: LayerSpec, layer: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(layer.get(adapter_key(spec.weight_key)), LoraAdapter):
            return dict(layer)
        weight = layer[spec.weight_key]
        raw = unmark(weight)
        shardings = _sharding.factor_shardings(
            f"layer {spec.path!r}", raw, spec.delta_eq, spec.rank, None
        )
        _, _, value = _init_from_weights.initial_factors(
            spec.path,
            raw,
            spec.delta_eq,
            spec.rank,
            spec.scale,
            init,
            dtype=spec.dtype,
            shardings=shardings,
        )
        return {**layer, spec.weight_key: rebox(weight, value)}

    for spec in layers:
        inner = replace_at(inner, spec.module, functools.partial(residual, spec))
    return rebuild(inner)


def default_sharding() -> Sharding:
    """Where arrays with no base counterpart go: the first local device."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _sharding_of(x: Any) -> Sharding | None:
    return getattr(x, "sharding", None)


def layer_shardings(
    params: PyTree, spec: LayerSpec, sharding: Sharding | None
) -> tuple[Sharding, Sharding]:
    """Where A and B of ``spec`` go: ``sharding`` if given, else following the base kernel.

    A NamedSharding kernel passes each axis's mesh axes on to the factor axes with the
    same einsum label, stacked axes too (`_sharding.factor_shardings`, as `lorafy`); the
    rank axis is replicated. Replicated or single-device kernels give their sharding; a
    layer missing from ``params`` or a kernel without one goes to the first local device.
    """
    if sharding is not None:
        return sharding, sharding
    node = subtree(params_of(params)[0], spec.module)
    weight = node.get(spec.weight_key) if isinstance(node, Mapping) else None
    kernel = None if weight is None else meta.unbox(weight)
    layer = f"layer {spec.path!r}"
    named = _sharding.factor_shardings(layer, kernel, spec.delta_eq, spec.rank, None)
    if named is not None:
        return named
    kernel_sharding = _sharding_of(kernel)
    if kernel_sharding is None:
        return default_sharding(), default_sharding()
    if not kernel_sharding.is_fully_replicated:
        raise ValueError(
            f"{layer}: its kernel has a {type(kernel_sharding).__name__} that jaxlora cannot "
            "map onto the adapter factors; place the base with a NamedSharding "
            "(jaxlora.shard_params) or pass sharding=NamedSharding(mesh, PartitionSpec())."
        )
    return kernel_sharding, kernel_sharding


def leaf_sharding(params: PyTree, leaf: LeafSpec, sharding: Sharding | None) -> Sharding:
    """Where a trainable leaf goes: ``sharding`` if given, else like the base leaf."""
    if sharding is not None:
        return sharding
    node = subtree(params_of(params)[0], leaf.path)
    found = None if node is None or isinstance(node, Mapping) else _sharding_of(unmark(node))
    return found or default_sharding()


def attach(
    params: PyTree, adapters: Mapping[LayerSpec, LoraAdapter], leaves: Mapping[str, Any]
) -> PyTree:
    """``params`` with ``adapters`` set on their layers and ``leaves`` marked `Trainable`.

    Existing adapters and trainable leaves at those paths are replaced (keeping their
    metadata boxes); everything else is left as it is.

    Args:
      params: a base or adapted tree (params collection or variables dict), already
        checked with `plan`.
      adapters: the saved layer -> its adapter.
      leaves: leaf path -> new value.

    Returns:
      The adapted tree, in the form of ``params``.
    """
    inner, rebuild = params_of(params)
    for spec, adapter in adapters.items():
        inner = replace_at(
            inner, spec.module, functools.partial(_with_adapter, spec.weight_key, adapter)
        )
    for path, value in leaves.items():
        inner = replace_at(inner, path, functools.partial(_as_trainable, value))
    return rebuild(inner)


def _with_adapter(weight: str, adapter: LoraAdapter, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The layer with ``adapter``: factors boxed like the old ones, else like the weight."""
    key = adapter_key(weight)
    old = layer.get(key)
    m = adapter.magnitude
    if isinstance(old, LoraAdapter):
        a, b = rebox(old.a, adapter.a), rebox(old.b, adapter.b)
        m = m if m is None or old.magnitude is None else rebox(old.magnitude, m)
    else:
        a, b = _sharding.box_factors(layer[weight], adapter.a, adapter.b, adapter.delta_eq, None)
        m = m if m is None else _sharding.box_magnitude(layer[weight], m, adapter.delta_eq)
    return {**layer, key: dataclasses.replace(adapter, a=a, b=b, magnitude=m)}


def _as_trainable(value: Any, old: Any) -> Trainable:
    return Trainable(rebox(old.value if isinstance(old, Trainable) else old, value))
