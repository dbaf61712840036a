"""The flax side of PEFT interop: a linen params tree or an NNX module, read the same way.

`adapted` lists an adapted model's adapters (as `_records.LayerSpec` plus factors) and its
fully trained leaves; `base_tree` gives the plain weights of a model as a nested dict, for
matching a PEFT file against; `set_nnx` puts imported factors and leaves into an NNX
module adapted by `lorafy`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlora import _attach, _nnx, _records
from jaxlora._config import adapter_name
from jaxlora._distributed import to_host
from jaxlora._tree import PyTree, module_paths, params_of, unwrap_trainable, without_adapters

_WRAPPERS = (_nnx.LoraLayer, _nnx.LoraModule)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One adapter as exported: its record, factors (host arrays), whether it is a conv, and
    DoRA's magnitude (None without DoRA)."""

    spec: _records.LayerSpec
    a: np.ndarray
    b: np.ndarray
    conv: bool = False
    magnitude: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Adapted:
    """What `export_peft` reads of an adapted model.

    Attributes:
      layers: every adapter.
      leaves: ``(LeafSpec, value)`` of every fully trained leaf (``modules_to_save``, bias).
      modules: the path of every module.
      weights: the adapter name (see `adapter_name`) of every weight of the model.
    """

    layers: list[Layer]
    leaves: list[tuple[_records.LeafSpec, np.ndarray]]
    modules: list[str]
    weights: list[str]


def _path(parts: tuple) -> str:
    return "/".join(str(p) for p in parts)


def _weight_names(tree: Mapping[str, Any], path: str = "") -> list[str]:
    names = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            names += _weight_names(value, f"{path}/{key}" if path else str(key))
        else:
            names.append(adapter_name(path, str(key)))
    return names


def weight_names(tree: Mapping[str, Any]) -> list[str]:
    """The adapter name of every leaf of a nested dict of weights (see `adapter_name`)."""
    return list(dict.fromkeys(_weight_names(tree)))


def adapted(model: PyTree | nnx.Module, *, who: str) -> Adapted:
    """The adapters and trained leaves of an adapted linen tree or NNX module."""
    if isinstance(model, nnx.Module):
        return _adapted_nnx(model, who=who)
    layers, leaves = _records.collect(model, who=who)
    inner = params_of(model)[0]
    return Adapted(
        layers=[
            Layer(spec, to_host(a), to_host(b), magnitude=None if m is None else to_host(m))
            for spec, a, b, m in layers
        ],
        leaves=[(spec, to_host(value)) for spec, value in leaves],
        modules=list(module_paths(inner)),
        weights=weight_names(without_adapters(unwrap_trainable(inner))),
    )


def _wrappers(module: nnx.Module) -> dict[str, nnx.Module]:
    return {_path(p): m for p, m in nnx.iter_modules(module) if isinstance(m, _WRAPPERS)}


def _unwrapped(path: str, wrappers: Mapping[str, nnx.Module]) -> str:
    """A path with every ``base`` step into a LoRA wrapper removed: the base model's path."""
    parts = path.split("/")
    kept = [p for i, p in enumerate(parts) if not (p == "base" and "/".join(parts[:i]) in wrappers)]
    return "/".join(kept)


def _layer_weights(wrapper: nnx.Module) -> list[tuple[str, nnx.Variable, Any]]:
    if isinstance(wrapper, _nnx.LoraLayer):
        key = "embedding" if isinstance(wrapper.base, nnx.Embed) else "kernel"
        return [(key, getattr(wrapper.base, key), wrapper)]
    return [(key, getattr(wrapper.base, key), ad) for key, ad in wrapper.adapters.items()]


def _adapted_nnx(module: nnx.Module, *, who: str) -> Adapted:
    wrappers = _wrappers(module)
    if not wrappers:
        raise ValueError(
            f"{who}: this module holds no LoRA layers. Pass the module adapted by jaxlora.lorafy "
            "(or jaxlora.import_peft)."
        )
    layers = []
    for path, wrapper in wrappers.items():
        for key, weight, adapter in _layer_weights(wrapper):
            a, b = to_host(adapter.lora_a[...]), to_host(adapter.lora_b[...])
            m = adapter.lora_magnitude
            m = None if m is None else to_host(m[...])
            spec = _records.LayerSpec(
                path=adapter_name(_unwrapped(path, wrappers), key),
                weight_key=key,
                kernel_shape=tuple(weight.shape),
                kernel_dtype=np.dtype(weight.dtype).name,
                a_shape=tuple(a.shape),
                b_shape=tuple(b.shape),
                dtype=a.dtype.name,
                scale=float(adapter.scale),
                delta_eq=adapter.delta_eq,
                magnitude_shape=None if m is None else tuple(m.shape),
            )
            conv = key == "kernel" and isinstance(wrapper.base, nnx.Conv)
            layers.append(Layer(spec, a, b, conv, m))
    leaves, weights = [], []
    for parts, var in nnx.iter_graph(module):
        if not isinstance(var, nnx.Param) or isinstance(var, _nnx.LoraParam):
            continue
        path = _unwrapped(_path(parts), wrappers)
        module_path, _, key = path.rpartition("/")
        weights.append(adapter_name(module_path, key))
        if isinstance(var, _nnx.TrainableParam):
            value = to_host(var[...])
            leaves.append((_records.LeafSpec(path, value.shape, value.dtype.name), value))
    modules = [_unwrapped(_path(p), wrappers) for p, _ in nnx.iter_modules(module) if p]
    return Adapted(layers, leaves, list(dict.fromkeys(modules)), weights)


def base_tree(model: PyTree | nnx.Module, *, who: str) -> dict[str, Any]:
    """The weights of a model as a nested dict: a linen tree's params, an NNX module's Params.

    Raises:
      ValueError: an NNX module that already holds LoRA layers.
    """
    if not isinstance(model, nnx.Module):
        return params_of(model)[0]
    if _wrappers(model):
        raise ValueError(
            f"{who}: this NNX module already holds LoRA layers; import into the base module "
            "(as built or loaded, before jaxlora.lorafy)."
        )
    tree: dict[str, Any] = {}
    for parts, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            node = tree
            for part in parts[:-1]:
                node = node.setdefault(str(part), {})
            node[str(parts[-1])] = var[...]
    return tree


def set_nnx(
    module: nnx.Module,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    leaves: Mapping[str, np.ndarray],
    sharding: jax.sharding.Sharding | None,
) -> None:
    """Puts imported factors (by adapter name) and leaves (by path) into an adapted module.

    Each array is placed where the variable it replaces is (or on ``sharding``), in its dtype.
    """

    def put(var: nnx.Variable, value: np.ndarray) -> None:
        old = var.get_value()
        target = sharding or getattr(old, "sharding", None) or _attach.default_sharding()
        var.set_value(jax.device_put(np.asarray(value, old.dtype), target))

    wrappers = _wrappers(module)
    for path, wrapper in wrappers.items():
        for key, _, adapter in _layer_weights(wrapper):
            a, b, m = factors[adapter_name(_unwrapped(path, wrappers), key)]
            put(adapter.lora_a, a)
            put(adapter.lora_b, b)
            if m is not None:
                put(adapter.lora_magnitude, m)
    for parts, var in nnx.iter_graph(module):
        if isinstance(var, _nnx.TrainableParam) and not isinstance(var, _nnx.LoraParam):
            path = _unwrapped(_path(parts), wrappers)
            if path in leaves:
                put(var, leaves[path])
