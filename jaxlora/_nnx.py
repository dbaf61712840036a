"""`lorafy` for Flax NNX: targeted layers are wrapped in place, like PEFT's ``base_layer``.

Adapter factors are `LoraParam` variables and fully trained parameters become
`TrainableParam`, so NNX filters select them: ``nnx.Optimizer(model, tx,
wrt=jaxlora.TrainableParam)``, ``nnx.DiffState(0, jaxlora.TrainableParam)``,
``nnx.state(model, jaxlora.LoraParam)``.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import _layout, _sharding
from jaxlora._config import ALL_LINEAR, LoraConfig, format_paths, path_matches

_SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed)


class TrainableParam(nnx.Param):
    """A parameter that trains: a LoRA factor, or a ``modules_to_save``/bias leaf."""


class LoraParam(TrainableParam):
    """A LoRA factor (A or B) of an NNX `LoraLayer`."""


def _layout_of(layer: nnx.Module, rank: int) -> _layout.Layout:
    if isinstance(layer, nnx.Embed):
        return _layout.embed_layout(layer.num_embeddings, layer.features, rank)
    if isinstance(layer, nnx.Einsum):
        return _layout.einsum_layout(layer.einsum_str, tuple(layer.kernel_shape), rank)
    if isinstance(layer, nnx.LinearGeneral):
        if layer.batch_axis:
            raise ValueError("LinearGeneral with batch_axis is not supported")
        return _layout.linear_layout(tuple(layer.in_features), tuple(layer.out_features), rank)
    return _layout.linear_layout((layer.in_features,), (layer.out_features,), rank)


def _weight(layer: nnx.Module) -> nnx.Variable:
    return layer.embedding if isinstance(layer, nnx.Embed) else layer.kernel


class LoraLayer(nnx.Module):
    """An NNX layer plus a LoRA adapter: ``base(x) + scale · dropout(x) @ A @ B``.

    Attributes:
      base: the original layer (its kernel stays at ``base.kernel``).
      lora_a: `LoraParam` ``(*stack, *a_shape)``.
      lora_b: `LoraParam` ``(*stack, *b_shape)``, zero at creation.
      scale: alpha / rank (or alpha / sqrt(rank)).
      delta_eq: einsum building the kernel-shaped ΔW from A and B.

    A and B are placed like the base kernel (see `jaxlora.lorafy`): a kernel value with a
    `NamedSharding` gives them derived shardings, its ``out_sharding`` metadata derived
    names; ``rank_axis`` optionally shards the rank axis over a mesh axis.
    """

    def __init__(
        self,
        base: nnx.Module,
        layout: _layout.Layout,
        *,
        scale: float,
        key: jax.Array,
        config: LoraConfig,
        rngs: nnx.Rngs,
        rank_axis: str | None = None,
    ):
        weight = _weight(base)
        stored = tuple(weight.shape)
        stack = stored[: len(stored) - len(layout.kernel_shape)]
        rank = layout.a_shape[-1]
        shardings = _sharding.factor_shardings(
            f"the {type(base).__name__} with kernel {stored}",
            weight.get_value(),
            layout.delta_eq,
            rank,
            rank_axis,
        )
        a, b = _sharding.init_factors(
            key, layout, stack, init=config.init, dtype=jnp.dtype(config.dtype), shardings=shardings
        )
        a_meta, b_meta = _sharding.nnx_factor_metadata(weight, layout.delta_eq, rank_axis)
        self.base = base
        self.lora_a = LoraParam(a, **a_meta)
        self.lora_b = LoraParam(b, **b_meta)
        self.scale = scale
        self.delta_eq = layout.delta_eq
        self.dropout = (
            nnx.Dropout(config.dropout, rng_collection=config.dropout_rng, rngs=rngs)
            if config.dropout
            else None
        )

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The base layer's output plus the adapter's; same arguments as the base."""
        y = self.base(x, *args, **kwargs)
        a, b = self.lora_a[...], self.lora_b[...]
        if isinstance(self.base, nnx.Embed):
            delta = functools.partial(_layout.embed_delta, scale=self.scale)
            return _layout.add_delta(y, delta, x, a, b)
        if self.dropout is not None:
            x = self.dropout(x)
        if isinstance(self.base, nnx.Einsum):
            einsum_str = kwargs.get("einsum_str", args[0] if args else None) or self.base.einsum_str
            delta = functools.partial(_layout.einsum_delta, einsum_str=einsum_str, scale=self.scale)
        else:
            axis = self.base.axis if isinstance(self.base, nnx.LinearGeneral) else -1
            axis = tuple(np.atleast_1d(axis).tolist())
            delta = functools.partial(_layout.linear_delta, axis=axis, scale=self.scale)
        return _layout.add_delta(y, delta, x, a, b)

    def attend(self, query: jax.Array) -> jax.Array:
        """``Embed.attend`` with the adapted table (embedding layers only)."""
        y = self.base.attend(query)
        delta = functools.partial(_layout.attend_delta, scale=self.scale)
        return _layout.add_delta(y, delta, query, self.lora_a[...], self.lora_b[...])

    def delta_weight(self) -> jax.Array:
        """``scale · A ⊗ B`` in the base kernel's layout (float32)."""
        return _layout.delta_weight(self.lora_a[...], self.lora_b[...], self.delta_eq, self.scale)


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _modules(root: nnx.Module, types: tuple) -> Iterator[tuple[tuple, nnx.Module]]:
    for path, module in nnx.iter_modules(root):
        if isinstance(module, types):
            yield path, module


def _inside_wrapper(path: tuple, wrapped: set[tuple]) -> bool:
    return any(path[: len(w)] == w for w in wrapped)


def _set_child(root: nnx.Module, path: tuple, child: Any) -> None:
    parent = root
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = child
    else:
        setattr(parent, path[-1], child)


def _retype(module: nnx.Module, name: str, cls: type[nnx.Variable]) -> None:
    var = getattr(module, name)
    if type(var) is not cls:
        setattr(module, name, cls(var.get_value(), **var.get_metadata()))


def _retype_all(module: nnx.Module, old: type, new: type[nnx.Variable]) -> None:
    for name, value in list(vars(module).items()):
        if isinstance(value, old):
            _retype(module, name, new)


def lorafy(
    module: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs, rank_axis: str | None = None
) -> nnx.Module:
    """Wraps the targeted layers of an NNX module in `LoraLayer` (see `jaxlora.lorafy`)."""
    if any(True for _ in _modules(module, (LoraLayer,))):
        raise ValueError(
            "lorafy: this module already holds LoRA layers. Adapt the base module once; "
            "jaxlora.merge(module) returns a plain copy."
        )
    layers = list(_modules(module, _SUPPORTED))
    selected = [
        (path, layer)
        for path, layer in layers
        if config.selects(_path_str(path), is_linear=not isinstance(layer, nnx.Embed))
    ]
    if not selected:
        raise ValueError(
            f"lorafy: targets {list(config.targets)} (exclude {list(config.exclude)}) match no "
            f"layer. Layers that can be adapted:\n{format_paths([_path_str(p) for p, _ in layers])}"
        )
    key = rngs.params()
    for path, layer in selected:
        name = _path_str(path)
        rank = config.rank_for(name)
        try:
            layout = _layout_of(layer, rank)
        except ValueError as e:
            if config.targets == (ALL_LINEAR,):
                continue
            raise ValueError(f"lorafy: layer {name!r} cannot be adapted: {e}.") from None
        if rank > min(layout.fan_in, layout.fan_out):
            raise ValueError(
                f"lorafy: rank {rank} for layer {name!r} exceeds min(fan_in={layout.fan_in}, "
                f"fan_out={layout.fan_out}) of its kernel {layout.kernel_shape}; use a smaller "
                "rank or a rank_pattern for this layer."
            )
        wrapper = LoraLayer(
            layer,
            layout,
            scale=config.scale_for(name),
            key=jax.random.fold_in(key, zlib.crc32(name.encode())),
            config=config,
            rngs=rngs,
            rank_axis=rank_axis,
        )
        _set_child(module, path, wrapper)
    _mark_full_training(module, config)
    return module


def _mark_full_training(module: nnx.Module, config: LoraConfig) -> None:
    wrapped = {path for path, _ in _modules(module, (LoraLayer,))}
    for pattern in config.modules_to_save:
        matched = [
            (p, m) for p, m in nnx.iter_modules(module) if p and path_matches(_path_str(p), pattern)
        ]
        if not matched:
            paths = [_path_str(p) for p, _ in nnx.iter_modules(module) if p]
            raise ValueError(
                f"lorafy: modules_to_save pattern {pattern!r} matches no module. Modules:\n"
                f"{format_paths(paths)}"
            )
        for path, target in matched:
            if _inside_wrapper(path, wrapped) or any(w[: len(path)] == path for w in wrapped):
                raise ValueError(
                    f"lorafy: {_path_str(path)!r} is both in modules_to_save and a LoRA target; "
                    "exclude it from targets or from modules_to_save."
                )
            for _, owner in nnx.iter_modules(target):
                _retype_all(owner, nnx.Param, TrainableParam)
    if config.bias == "none":
        return
    for path, layer in nnx.iter_modules(module):
        is_wrapped_base = path[-1:] == ("base",) and path[:-1] in wrapped
        if (config.bias == "all" or is_wrapped_base) and isinstance(
            getattr(layer, "bias", None), nnx.Param
        ):
            _retype(layer, "bias", TrainableParam)


def merge(module: nnx.Module) -> nnx.Module:
    """A copy of ``module`` with each `LoraLayer` folded back into a plain base layer."""
    merged = nnx.clone(module)
    wrappers = list(_modules(merged, (LoraLayer,)))
    if not wrappers:
        raise ValueError(
            "merge: this module holds no LoRA layers. Pass the module adapted by jaxlora.lorafy."
        )
    for path, wrapper in wrappers:
        weight = _weight(wrapper.base)
        w = weight[...]
        weight[...] = (w.astype(jnp.float32) + wrapper.delta_weight()).astype(w.dtype)
        _set_child(merged, path, wrapper.base)
    for _, layer in nnx.iter_modules(merged):
        _retype_all(layer, TrainableParam, nnx.Param)
    return merged


def _merged_path(path: tuple, wrapped: set[tuple]) -> tuple:
    for w in wrapped:
        if path[: len(w) + 1] == (*w, "base"):
            return (*w, *path[len(w) + 1 :])
    return path


def unmerge(merged: nnx.Module, adapted: nnx.Module) -> nnx.Module:
    """A copy of ``adapted`` whose weights come from ``merged`` minus each adapter's ΔW."""
    out = nnx.clone(adapted)
    wrappers = dict(_modules(out, (LoraLayer,)))
    merged_vars = {path: var for path, var in nnx.iter_graph(merged) if isinstance(var, nnx.Param)}
    for path, var in nnx.iter_graph(out):
        if isinstance(var, nnx.Param) and not isinstance(var, LoraParam):
            source = merged_vars.get(_merged_path(path, set(wrappers)))
            if source is None:
                raise ValueError(
                    f"unmerge: merged module has no variable at {_path_str(path)!r}; pass the "
                    "module that jaxlora.merge returned for this adapted module."
                )
            var[...] = source[...]
    for wrapper in wrappers.values():
        weight = _weight(wrapper.base)
        w = weight[...]
        weight[...] = (w.astype(jnp.float32) - wrapper.delta_weight()).astype(w.dtype)
    return out


def lora_layers(module: nnx.Module) -> list[tuple[str, LoraLayer]]:
    """``(path, layer)`` of every `LoraLayer` in ``module``."""
    return [(_path_str(p), m) for p, m in _modules(module, (LoraLayer,))]
