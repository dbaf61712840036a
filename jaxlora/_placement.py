"""Placing params on a mesh and inspecting where the adapters are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora import _nnx
from jaxlora._config import path_matches
from jaxlora._quantize import is_quantized
from jaxlora._sharding import (
    AxisEntry,
    concrete_sharding,
    divisible_spec,
    entry_axes,
    mesh_axes_size,
)
from jaxlora._tree import PyTree, adapter_at, iter_adapters, params_of, path_str

LogicalRules = Sequence[tuple[str, AxisEntry]]


def _check_rules(rules: LogicalRules, mesh: Mesh) -> None:
    for rule in rules:
        unknown = [ax for ax in entry_axes(rule[1]) if ax not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"shard_params: axis rule {tuple(rule)!r} names mesh axis {unknown[0]!r}, but "
                f"the mesh has axes {tuple(mesh.axis_names)}; map {rule[0]!r} to one of them "
                "or to None (replicated)."
            )


def _leaf_spec(path: str, leaf: Any, specs: Sequence, rules: LogicalRules | None) -> PartitionSpec:
    if isinstance(leaf, nn.LogicallyPartitioned):
        return PartitionSpec(*nn.logical_to_mesh_axes(leaf.names, rules or leaf.rules))
    if isinstance(leaf, meta.Partitioned):
        return PartitionSpec(*leaf.names)
    return next((PartitionSpec(*s) for p, s in specs if path_matches(path, p)), PartitionSpec())


def _check_spec(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(
            f"shard_params: {path!r} has {len(shape)} axes (shape {shape}) but its "
            f"PartitionSpec {spec} has {len(spec)} entries; give one entry per axis."
        )
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=False)):
        shards = mesh_axes_size(
            mesh,
            entry_axes(entry),
            where=f"shard_params: {path!r} is sharded as {spec}, but ",
            fix="fix its spec or axis rule.",
        )
        if size % shards:
            raise ValueError(
                f"shard_params: {path!r} of shape {shape} cannot be sharded as {spec}: "
                f"dimension {dim} (size {size}) is not divisible by mesh axis {entry!r} "
                f"(size {shards}). Leave that dimension unsharded (None), use a mesh axis "
                f"whose size divides {size}, or pad the layer."
            )


def shard_params(
    params: PyTree,
    mesh: Mesh,
    specs: Sequence[tuple[str, PartitionSpec]] = (),
    *,
    rules: LogicalRules | None = None,
) -> PyTree:
    """Places a params tree on a mesh, each leaf by its sharding metadata or a path rule.

    Shard the base params with this (or your own ``jit(..., out_shardings=...)`` init)
    *before* `lorafy`: adapters then take their kernels' shardings.

    Args:
      params: a params tree: plain or host (numpy) arrays, or linen ``nn.Partitioned`` /
        ``nn.LogicallyPartitioned`` boxes (kept, with their values placed).
      mesh: the device mesh.
      specs: ``(pattern, PartitionSpec)`` pairs for unboxed leaves, matched against the
        leaf's path (``"block_0/attn/query/kernel"``) like `LoraConfig` targets (glob,
        bare name, ``"re:<regex>"``); the first match wins, unmatched leaves are replicated.
      rules: logical axis rules ``((logical_name, mesh_axis_or_None), ...)`` for
        ``nn.LogicallyPartitioned`` boxes (default: each box's own rules, else the
        ``nn.logical_axis_rules`` context).

    Returns:
      The tree with every array placed with its `NamedSharding` (``jax.device_put``; host
      arrays go straight to their shards).

    Raises:
      ValueError: naming the leaf, dimension and sizes when a mesh axis does not divide a
        dimension, and the rule when it names an axis the mesh does not have.

    Example:
      >>> mesh = jaxlora.parse_mesh("data=2,model=4")
      >>> params = jaxlora.shard_params(params, mesh, [
      ...     ("re:.*(query|key|value|up)/kernel", P("data", "model")),  # FSDP + column TP
      ...     ("re:.*(out|down)/kernel", P("model", "data")),  # FSDP + row TP
      ... ])
    """
    if rules is not None:
        _check_rules(rules, mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, meta.Partitioned) or is_quantized(x)
    )
    placed = []
    for key_path, leaf in leaves:
        path = path_str(key_path)
        spec = _leaf_spec(path, leaf, specs, rules)
        value = leaf.value if isinstance(leaf, meta.Partitioned) else leaf
        _check_spec(path, tuple(value.shape), spec, mesh)
        value = _place(value, mesh, spec)
        placed.append(leaf.replace(value=value) if isinstance(leaf, meta.Partitioned) else value)
    return jax.tree.unflatten(treedef, placed)


def _place(value: Any, mesh: Mesh, spec: PartitionSpec) -> Any:
    """``value`` on ``mesh`` by ``spec``; a quantized weight's codes and scales by its spec,
    axes they are too short to split replicated."""
    if not is_quantized(value):
        return jax.device_put(value, NamedSharding(mesh, spec))
    full = (*spec, *(None,) * (value.ndim - len(spec)))
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, divisible_spec(x.shape, full, mesh))),
        value,
    )


def _spec(value: Any) -> PartitionSpec:
    """Where an adapter factor is: its `NamedSharding` spec, else its sharding names, else P()."""
    names = None
    if isinstance(value, meta.Partitioned):
        names, value = value.names, value.value
    elif isinstance(value, nnx.Variable):
        names, value = value.get_metadata().get("out_sharding"), value.get_value()
    sharding = concrete_sharding(value)
    entries = tuple(sharding.spec) if sharding is not None else tuple(names or ())
    return PartitionSpec(*entries, *(None,) * (value.ndim - len(entries)))


def adapter_partition_specs(
    adapted: PyTree | nnx.Module,
) -> dict[str, tuple[PartitionSpec, PartitionSpec]]:
    """The `PartitionSpec` of every adapter's A and B, by layer path, for inspection.

    For factors placed with a `NamedSharding` this is its spec (mesh axes). For factors
    not (yet) placed on a mesh it is the names `lorafy` gave their sharding metadata
    (linen boxes, NNX ``out_sharding``; logical names for logically partitioned models),
    else fully replicated.

    Args:
      adapted: an adapted linen tree (params collection or variables dict) or NNX module.

    Returns:
      ``{layer_path: (spec_a, spec_b)}``, each spec with one entry per axis of the factor:
      A ``(*stack, *in_axes, r)``, B ``(*stack, r, *out_axes)``.

    Example:
      >>> jaxlora.adapter_partition_specs(lora_params)["block_0/up"]
      (PartitionSpec('data', None), PartitionSpec(None, 'model'))
    """
    if isinstance(adapted, nnx.Module):
        return {
            name: (_spec(adapter.lora_a), _spec(adapter.lora_b))
            for name, _, adapter in _nnx.adapted_weights(adapted)
        }
    inner, _ = params_of(adapted)
    return {
        name: (_spec(adapter_at(layer, w).a), _spec(adapter_at(layer, w).b))
        for name, _, w, layer in iter_adapters(inner)
    }
