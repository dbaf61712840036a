"""`lorafy` for Flax linen: adapters in the params tree, applied by method interception.

The user's modules are never edited. `lorafy` traces the model once, abstractly, on
example inputs to find every Dense/DenseGeneral/Einsum/Embed layer, its path and the
layout of its kernel (including the stacked axes of ``nn.scan``); `LoraModel.apply`
runs the original ``model.apply`` with an interceptor that adds ``scale · x @ A @ B``
to the output of each layer whose params hold a `LoraAdapter`. Because the adapter
lives in the layer's own params, it follows the layer through ``nn.scan``,
``nn.remat`` and ``nn.vmap`` untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxlora import _layout, _sharding
from jaxlora._config import ALL_LINEAR, LoraConfig, format_paths, path_matches
from jaxlora._tree import (
    ADAPTER_KEY,
    LoraAdapter,
    Trainable,
    has_adapters,
    kernel_key,
    module_paths,
    params_of,
    replace_at,
    subtree,
    unwrap_trainable,
)

_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed)


@dataclasses.dataclass(frozen=True)
class _Found:
    """A layer seen while tracing: a layout for a given rank, or why it can't be adapted."""

    layout: Callable[[int], _layout.Layout] | None
    is_linear: bool
    unsupported: str = ""


def _call_einsum_str(module: nn.Einsum, args: tuple, kwargs: dict) -> str:
    override = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return override or module.einsum_str


def _layout_of(module: nn.Module, args: tuple, kwargs: dict) -> _Found:
    """How one layer is adapted, read from its attributes and its kernel as seen in the call."""
    if isinstance(module, nn.Embed):
        num, features = meta.unbox(module.get_variable("params", "embedding")).shape
        return _Found(functools.partial(_layout.embed_layout, num, features), is_linear=False)
    shape = tuple(meta.unbox(module.get_variable("params", "kernel")).shape)
    if isinstance(module, nn.Einsum):
        einsum_str = _call_einsum_str(module, args, kwargs)
        try:
            _layout.einsum_layout(einsum_str, shape, 1)
        except ValueError as e:
            return _Found(None, is_linear=True, unsupported=str(e))
        return _Found(functools.partial(_layout.einsum_layout, einsum_str, shape), True)
    if isinstance(module, nn.DenseGeneral) and module.batch_dims:
        return _Found(None, True, "DenseGeneral with batch_dims is not supported")
    n_out = len(np.atleast_1d(module.features))
    split = functools.partial(_layout.linear_layout, shape[:-n_out], shape[-n_out:])
    return _Found(split, is_linear=True)


def _split_static(tree: Any) -> tuple[Any, Any]:
    """Array-like leaves (traced by ``eval_shape``) and everything else (closed over)."""

    def is_array(x):
        return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)

    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [x if is_array(x) else None for x in leaves]
    static = [None if is_array(x) else x for x in leaves]
    return dynamic, (treedef, static)


def _join_static(dynamic: list, static: Any) -> Any:
    treedef, static_leaves = static
    leaves = [s if d is None else d for d, s in zip(dynamic, static_leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def _discover(model: nn.Module, variables: Any, args: tuple, kwargs: dict) -> dict[str, _Found]:
    """Traces ``model.apply`` abstractly and returns every adaptable layer by path."""
    found: dict[str, _Found] = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _SUPPORTED):
            path = "/".join(module.scope.path)
            if path not in found:
                found[path] = _layout_of(module, call_args, call_kwargs)
        return next_fun(*call_args, **call_kwargs)

    dynamic, static = _split_static((args, kwargs))

    def run(variables, dynamic):
        call_args, call_kwargs = _join_static(dynamic, static)
        return model.apply(variables, *call_args, **call_kwargs)

    with nn.intercept_methods(record):
        try:
            jax.eval_shape(run, variables, dynamic)
        except Exception as e:
            summary = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"lorafy: model.apply failed on these params and example inputs "
                f"({type(e).__name__}: {summary}). Pass the params from model.init and the "
                "inputs (and keyword arguments such as deterministic=True) that model.apply "
                "takes."
            ) from e
    return found


def _select(config: LoraConfig, found: dict[str, _Found]) -> list[str]:
    selected = []
    for path, f in found.items():
        if not config.selects(path, is_linear=f.is_linear):
            continue
        if f.layout is None:
            if config.targets != (ALL_LINEAR,):
                raise ValueError(f"lorafy: layer {path!r} cannot be adapted: {f.unsupported}.")
            continue
        selected.append(path)
    if not selected:
        raise ValueError(
            f"lorafy: targets {list(config.targets)} (exclude {list(config.exclude)}) match no "
            f"layer. Layers that can be adapted:\n{format_paths(sorted(found))}"
        )
    return selected


def _make_adapter(
    path: str,
    layer: Mapping,
    found: _Found,
    config: LoraConfig,
    key: jax.Array,
    rank_axis: str | None,
) -> LoraAdapter:
    """A layer's adapter, placed and boxed like its kernel (see `_sharding`)."""
    rank = config.rank_for(path)
    layout = found.layout(rank)
    kernel = layer[kernel_key(layer)]
    raw = kernel.value if isinstance(kernel, meta.Partitioned) else meta.unbox(kernel)
    stored = tuple(raw.shape)
    n_stack = len(stored) - len(layout.kernel_shape)
    if n_stack < 0 or stored[n_stack:] != layout.kernel_shape:
        raise ValueError(
            f"lorafy: layer {path!r} holds a kernel of shape {stored} but computes with "
            f"{layout.kernel_shape}; only leading stacked axes (nn.scan) are supported."
        )
    if rank > min(layout.fan_in, layout.fan_out):
        raise ValueError(
            f"lorafy: rank {rank} for layer {path!r} exceeds min(fan_in={layout.fan_in}, "
            f"fan_out={layout.fan_out}) of its kernel {layout.kernel_shape}; use a smaller "
            f"rank, or rank_pattern={{{path.rsplit('/', 1)[-1]!r}: ...}} for this layer."
        )
    a, b = _sharding.init_factors(
        jax.random.fold_in(key, zlib.crc32(path.encode())),
        layout,
        stored[:n_stack],
        init=config.init,
        dtype=jnp.dtype(config.dtype),
        shardings=_sharding.factor_shardings(
            f"layer {path!r}", raw, layout.delta_eq, rank, rank_axis
        ),
    )
    a, b = _sharding.box_factors(kernel, a, b, layout.delta_eq, rank_axis)
    return LoraAdapter(a=a, b=b, scale=config.scale_for(path), delta_eq=layout.delta_eq)


def _mark_trainable(tree: Any) -> Any:
    return jax.tree.map(Trainable, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def _with_adapter(adapter: LoraAdapter, layer: Mapping[str, Any]) -> dict[str, Any]:
    return {**layer, ADAPTER_KEY: adapter}


def _with_trainable_bias(layer: Mapping[str, Any]) -> dict[str, Any]:
    return {**layer, "bias": _mark_trainable(layer["bias"])}


def _mark_full_training(params: dict, config: LoraConfig, adapted: list[str]) -> dict:
    """Wraps the leaves of ``modules_to_save`` and of trainable biases in `Trainable`."""
    for pattern in config.modules_to_save:
        paths = list(module_paths(params))
        matched = [p for p in paths if path_matches(p, pattern)]
        if not matched:
            raise ValueError(
                f"lorafy: modules_to_save pattern {pattern!r} matches no module. Modules:\n"
                f"{format_paths(paths)}"
            )
        for path in matched:
            clash = [a for a in adapted if a == path or a.startswith(path + "/")]
            if clash:
                raise ValueError(
                    f"lorafy: {path!r} is both in modules_to_save and a LoRA target "
                    f"({clash[0]!r}); exclude it from targets or from modules_to_save."
                )
            params = replace_at(params, path, _mark_trainable)
    bias_layers = {
        "none": [],
        "lora_only": adapted,
        "all": list(module_paths(params)),
    }[config.bias]
    for path in bias_layers:
        if isinstance(subtree(params, path).get("bias"), jax.Array | meta.AxisMetadata):
            params = replace_at(params, path, _with_trainable_bias)
    return params


def lorafy(
    model: nn.Module,
    params: Any,
    config: LoraConfig,
    *inputs: Any,
    key: jax.Array,
    rank_axis: str | None = None,
    **kwargs: Any,
) -> tuple[LoraModel, Any]:
    """Adds LoRA adapters to a linen model's params (see `jaxlora.lorafy`)."""
    inner, rebuild = params_of(params)
    if has_adapters(inner):
        raise ValueError(
            "lorafy: these params already hold LoRA adapters. Adapt the base params once; "
            "to start over, jaxlora.merge(params) (keeps the learned update) or reload the base."
        )
    variables = params if inner is not params else {"params": inner}
    found = _discover(model, variables, inputs, kwargs)
    selected = _select(config, found)
    adapted = dict(inner)
    for path in selected:
        layer = subtree(adapted, path)
        adapter = _make_adapter(path, layer, found[path], config, key, rank_axis)
        adapted = replace_at(adapted, path, functools.partial(_with_adapter, adapter))
    adapted = _mark_full_training(adapted, config, selected)
    return LoraModel(model, config), rebuild(adapted)


def _dropout(module: nn.Module, x: jax.Array, rate: float, stream: str) -> jax.Array:
    if rate == 0.0 or not module.scope.has_rng(stream):
        return x
    sharding = jax.typeof(x).sharding  # as nnx.Dropout: the mask must match x's sharding type
    keep = jax.random.bernoulli(module.make_rng(stream), 1.0 - rate, x.shape, out_sharding=sharding)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _adapted_output(module, method, y, args, kwargs, adapter, config):
    """``y = module.method(*args, **kwargs)`` plus the adapter's contribution."""
    a, b = meta.unbox(adapter.a), meta.unbox(adapter.b)
    x = args[0] if args else next(iter(kwargs.values()))
    scale = adapter.scale
    if isinstance(module, nn.Embed):
        delta = _layout.attend_delta if method == "attend" else _layout.embed_delta
        return _layout.add_delta(y, functools.partial(delta, scale=scale), x, a, b)
    x = _dropout(module, x, config.dropout, config.dropout_rng)
    if isinstance(module, nn.Einsum):
        einsum_str = _call_einsum_str(module, args, kwargs)
        delta = functools.partial(_layout.einsum_delta, einsum_str=einsum_str, scale=scale)
    else:
        axis = tuple(np.atleast_1d(module.axis if isinstance(module, nn.DenseGeneral) else -1))
        delta = functools.partial(_layout.linear_delta, axis=axis, scale=scale)
    return _layout.add_delta(y, delta, x, a, b)


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A linen model whose adapted layers add their LoRA update.

    ``apply`` takes exactly the arguments of ``model.apply`` (variables, inputs, rngs,
    mutable, method, flags); the params must be the adapted tree from `lorafy`.

    Attributes:
      model: the original, unmodified linen module.
      config: the `LoraConfig` used to adapt it.
    """

    model: nn.Module
    config: LoraConfig

    def _intercept(self, next_fun, args, kwargs, context):
        module = context.module
        method = context.method_name
        adapted = (
            isinstance(module, _SUPPORTED)
            and (method == "__call__" or (method == "attend" and isinstance(module, nn.Embed)))
            and module.has_variable("params", ADAPTER_KEY)
        )
        y = next_fun(*args, **kwargs)
        if not adapted:
            return y
        adapter = module.get_variable("params", ADAPTER_KEY)
        return _adapted_output(module, method, y, args, kwargs, adapter, self.config)

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.apply`` with the adapters active. Same arguments, same return value."""
        inner, rebuild = params_of(variables)
        with nn.intercept_methods(self._intercept):
            return self.model.apply(rebuild(unwrap_trainable(inner)), *args, **kwargs)
