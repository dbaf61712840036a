"""The adapted parameter tree: its node types and the pure functions over it.

An adapted linen tree is the base tree plus, inside each adapted layer's dict, a
`LoraAdapter` under the key ``"lora"`` (next to ``kernel``/``embedding``), and a
`Trainable` marker around every leaf trained in full (``modules_to_save``, biases).
The tree alone says what trains, so `split`, `optimizer`, `merge` and checkpoints need
nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import meta

from jaxlora import _dora, _layout, _quantize, _tokens
from jaxlora._config import adapter_name, node_key, weight_of_node
from jaxlora._tokens import TrainableTokens
from jaxlora._views import Factors, factors_for

ADAPTER_KEY = "lora"
PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One layer's LoRA factors.

    Attributes:
      a: ``(*stack, *layout.a_shape)``; the last axis is the rank.
      b: ``(*stack, *layout.b_shape)``.
      scale: alpha / rank (or alpha / sqrt(rank)); static.
      delta_eq: einsum building the kernel-shaped ΔW from ``(a, b)``; static.
      magnitude: DoRA's trainable magnitude ``(*stack, *b_shape without r)``, one per
        output feature (``LoraConfig(use_dora=True)``, see `jaxlora._dora`); None for
        plain LoRA.
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(metadata={"static": True})
    delta_eq: str = dataclasses.field(metadata={"static": True})
    magnitude: Any = None

    @property
    def rank(self) -> int:
        """The adapter rank r."""
        return meta.unbox(self.a).shape[-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a leaf that trains in full (``modules_to_save`` or a trainable bias)."""

    value: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Frozen:
    """Marks a subtree that does not train although it holds adapters (a bank's adapter
    that is not being trained, see `jaxlora.AdapterBank.train_only`)."""

    value: Any


def _is_marked(x: Any) -> bool:
    return isinstance(x, LoraAdapter | Trainable | TrainableTokens)


def _is_param_leaf(x: Any) -> bool:
    return _is_marked(x) or isinstance(x, meta.AxisMetadata | Frozen)


def params_of(tree: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """The ``params`` collection of a variables dict (or the tree itself) and a rebuilder."""
    if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
        return tree["params"], lambda params: {**tree, "params": params}
    return tree, lambda params: params


def has_adapters(tree: PyTree) -> bool:
    """Whether any `LoraAdapter` (or trained token rows) is in ``tree``."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_marked)
    return any(isinstance(x, LoraAdapter | TrainableTokens) for x in leaves)


def path_str(key_path: tuple[Any, ...]) -> str:
    """``/``-joined names of a JAX key path (dict keys, attributes, indices)."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _path_keys(path: str) -> tuple[str, ...]:
    """Dict keys of a ``/``-joined path; ``""`` is the root (a model that is one layer)."""
    return tuple(path.split("/")) if path else ()


def subtree(tree: Any, path: str) -> Any | None:
    """The subtree at a ``/``-joined path, or None if there is none."""
    for k in _path_keys(path):
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def replace_at(tree: Mapping, path: str, fn: Callable[[Any], Any]) -> Any:
    """A copy of ``tree`` (new dicts along ``path``) whose node at ``path`` is ``fn(node)``."""

    def go(node, keys):
        return fn(node) if not keys else {**node, keys[0]: go(node[keys[0]], keys[1:])}

    return go(tree, _path_keys(path))


def module_paths(tree: Any) -> Iterator[str]:
    """The ``/``-joined path of every dict (module) below the root of a params tree."""

    def go(node, path):
        if isinstance(node, Mapping):
            if path:
                yield "/".join(path)
            for k, v in node.items():
                yield from go(v, (*path, str(k)))

    return go(tree, ())


def adapter_key(weight: str) -> str:
    """The key of a weight's adapter (see `node_key`)."""
    return node_key(ADAPTER_KEY, weight)


def _adapted_weight(layer: Mapping[str, Any], key: str) -> str:
    return weight_of_node(ADAPTER_KEY, layer, key)


def _adapter_keys(node: Any) -> list[str]:
    if not isinstance(node, Mapping):
        return []
    return [k for k, v in node.items() if isinstance(v, LoraAdapter)]


def iter_adapters(tree: PyTree, path: tuple[str, ...] = ()):
    """Yields ``(name, module_path, weight_key, layer_dict)`` for every adapter of a tree.

    ``name`` is the adapter's name (see `jaxlora._config.adapter_name`): the module path
    for a layer's ``kernel``/``embedding``, the weight's own path otherwise.
    """
    if not isinstance(tree, Mapping):
        return
    module = "/".join(path)
    for key in _adapter_keys(tree):
        weight = _adapted_weight(tree, key)
        yield adapter_name(module, weight), module, weight, tree
    for k, v in tree.items():
        if not isinstance(v, LoraAdapter):
            yield from iter_adapters(v, (*path, str(k)))


def adapter_at(layer: Mapping[str, Any], weight: str) -> LoraAdapter:
    """The adapter of ``weight`` in the module dict ``layer``."""
    return layer[adapter_key(weight)]


def adapters_of(tree: PyTree) -> dict[str, Factors]:
    """``{weight path: Factors}`` of every adapter of a (marker-free) params tree."""
    out = {}
    for _, module, weight, layer in iter_adapters(tree):
        adapter = adapter_at(layer, weight)
        w = meta.unbox(layer[weight])
        path = f"{module}/{weight}" if module else weight
        a, b = meta.unbox(adapter.a), meta.unbox(adapter.b)
        g = None
        if adapter.magnitude is not None:
            m = meta.unbox(adapter.magnitude)
            g = _dora.output_scale(w, a, b, m, adapter.delta_eq, adapter.scale)
        out[path] = factors_for(a, b, adapter.delta_eq, w.ndim, adapter.scale, g)
    return {**out, **_tokens.factors_of(tree)}


def without_adapters(tree: PyTree) -> PyTree:
    """The tree with every adapter removed: the base params the model itself reads."""
    if not isinstance(tree, Mapping):
        return tree
    return {
        k: without_adapters(v)
        for k, v in tree.items()
        if not isinstance(v, LoraAdapter | TrainableTokens)
    }


def unwrap_trainable(tree: PyTree) -> PyTree:
    """Removes the `Trainable` markers, leaving the values in place."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, Trainable) else x, tree, is_leaf=_is_marked
    )


def trainable_mask(params: PyTree) -> PyTree:
    """A tree of Python bools, shaped like ``params``: True for the leaves that train.

    Args:
      params: an adapted tree from `lorafy`.

    Returns:
      The mask (static: built from the tree's structure, never from array values).
    """

    def node_mask(node):
        if isinstance(node, Trainable) and any(
            _quantize.is_quantized(x)
            for x in jax.tree.leaves(node.value, is_leaf=_quantize.is_quantized)
        ):
            raise ValueError(
                "a leaf marked jaxlora.Trainable is stored quantized: a quantized weight is "
                "frozen (its codes have no gradient). Keep the module in float with "
                "LoraConfig(quantize_exclude=[...]) to train it in full, or leave it out of "
                "modules_to_save."
            )
        return jax.tree.map(lambda _: _is_marked(node), node)

    return jax.tree.map(node_mask, params, is_leaf=_is_param_leaf)


def _check_mask(mask: PyTree) -> None:
    for key_path, m in jax.tree_util.tree_leaves_with_path(mask):
        if not isinstance(m, bool):
            raise TypeError(
                f"trainable mask at {path_str(key_path)!r} is a {type(m).__name__}, not a "
                "Python bool: masks must be static (build them outside jit, e.g. with "
                "jaxlora.trainable_mask(params)), never traced or array-valued."
            )


def split(params: PyTree, mask: PyTree | None = None) -> tuple[PyTree, PyTree]:
    """Splits an adapted tree into ``(trainable, frozen)``.

    Both keep the full structure, with None where a leaf belongs to the other part, so
    `combine` puts them back together and ``jax.grad`` over ``trainable`` never forms a
    gradient for a frozen leaf.

    Args:
      params: an adapted tree from `lorafy`.
      mask: optional static bool tree (default `trainable_mask(params)`).

    Returns:
      ``(trainable, frozen)``.
    """
    mask = trainable_mask(params) if mask is None else mask
    _check_mask(mask)
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen


def _leaf_paths(tree: PyTree) -> set[str]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)
    return {path_str(k) for k, _ in leaves}


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `split`.

    Raises:
      ValueError: the two trees are not the halves of one split (the message names the
        leaves only one of them has).
    """
    try:
        return jax.tree.map(
            lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
        )
    except ValueError as e:
        t_paths, f_paths = _leaf_paths(trainable), _leaf_paths(frozen)
        only = [f"{p}: only in trainable" for p in sorted(t_paths - f_paths)]
        only += [f"{p}: only in frozen" for p in sorted(f_paths - t_paths)]
        if not only:
            raise
        shown = "".join(f"\n  {line}" for line in only[:20])
        more = f"\n  ... and {len(only) - 20} more" if len(only) > 20 else ""
        raise ValueError(
            f"combine: trainable and frozen are not the two halves of one split:{shown}{more}"
            "\nPass the two trees jaxlora.split returned for the same params."
        ) from e


def rebox(old: Any, new: Any) -> Any:
    """``new`` in the metadata box of ``old`` (e.g. ``nn.Partitioned``), or bare if it has none."""
    return old.replace_boxed(new) if isinstance(old, meta.AxisMetadata) else new


def _merged_weight(
    layer: Mapping[str, Any], weight: str, sign: float, dtype: Any, base: Any = None
) -> Any:
    """``layer[weight]`` with its adapter folded in (``sign=+1``) or out (``-1``; ``base`` is
    then the adapted tree's weight, which DoRA's norm is taken on)."""
    adapter = adapter_at(layer, weight)
    w = meta.unbox(layer[weight])
    a, b = meta.unbox(adapter.a), meta.unbox(adapter.b)
    if adapter.magnitude is not None:
        m, eq, scale = meta.unbox(adapter.magnitude), adapter.delta_eq, adapter.scale
        if sign > 0:
            value = _dora.merged_weight(w, a, b, m, eq, scale)
        else:
            value = _dora.unmerged_weight(w, meta.unbox(base), a, b, m, eq, scale)
        return rebox(layer[weight], value.astype(w.dtype))
    delta = _layout.delta_weight(a, b, adapter.delta_eq, sign * adapter.scale)
    if _quantize.is_quantized(w):
        merged = _quantize.dequantize(w, jnp.float32) + delta
        return rebox(layer[weight], merged.astype(dtype))
    return rebox(layer[weight], (w.astype(jnp.float32) + delta).astype(w.dtype))


def dequantized(tree: PyTree, dtype: Any) -> PyTree:
    """``tree`` with every weight stored quantized replaced by its dense value in ``dtype``."""
    return jax.tree.map(
        lambda x: _quantize.dequantize(x, dtype) if _quantize.is_quantized(x) else x,
        tree,
        is_leaf=_quantize.is_quantized,
    )


def _map_layers(tree: PyTree, fn: Callable[[Mapping[str, Any]], PyTree]) -> PyTree:
    if not isinstance(tree, Mapping):
        return tree
    if _adapter_keys(tree) or _tokens.keys_of(tree):
        tree = fn(tree)
    return {k: _map_layers(v, fn) for k, v in tree.items()}


def merge(params: PyTree, dtype: Any = jnp.bfloat16) -> PyTree:
    """Plain params with every adapter folded into its kernel (see `jaxlora.merge`).

    Weights stored quantized come out dense in ``dtype``, adapted or not."""
    inner, rebuild = params_of(params)
    if not has_adapters(inner):
        raise ValueError(
            "merge: these params hold no LoRA adapters. Pass the tree returned by "
            "jaxlora.lorafy (or jaxlora.load_adapter), not the base params."
        )

    def fold(layer):
        out = dict(layer)
        for key in _adapter_keys(layer):
            weight = _adapted_weight(layer, key)
            out[weight] = _merged_weight(layer, weight, +1.0, dtype)
            del out[key]
        return _tokens.merge_layer(out)

    return rebuild(dequantized(unwrap_trainable(_map_layers(inner, fold)), dtype))


def _check_was_merged(merged: PyTree, adapted: PyTree) -> None:
    """Raises if a weight of ``merged`` still equals the adapted tree's base while its ΔW is not
    zero: subtracting ΔW from weights that never had it added would be silently wrong.
    Concrete arrays only (under ``jit`` nothing can be compared)."""
    for name, module, weight, layer in iter_adapters(unwrap_trainable(adapted)):
        m = subtree(merged, module)
        if not isinstance(m, Mapping) or weight not in m:
            continue  # reported by the restore below
        w_merged, w_base = meta.unbox(m[weight]), meta.unbox(layer[weight])
        b = meta.unbox(adapter_at(layer, weight).b)
        if any(isinstance(x, jax.core.Tracer) for x in (w_merged, w_base, b)):
            return
        if bool(jnp.any(b != 0)) and bool(jnp.array_equal(w_merged, w_base)):
            raise ValueError(
                f"unmerge: weight {name!r} of the first argument equals the adapted tree's "
                "base weight although its adapter is not zero: these params were never "
                "merged. Pass the output of jaxlora.merge(adapted)."
            )


def _check_restored(merged: PyTree, restored: PyTree, adapted: PyTree) -> None:
    """Raises if ``merged - ΔW`` is not, to float rounding, the adapted tree's base: the
    params were merged with other adapters (another run, another config), and subtracting
    these would silently give wrong weights. Concrete arrays only."""
    for name, module, weight, layer in iter_adapters(unwrap_trainable(adapted)):
        got, want = meta.unbox(subtree(restored, module)[weight]), meta.unbox(layer[weight])
        if isinstance(got, jax.core.Tracer) or isinstance(want, jax.core.Tracer):
            return
        got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
        given = jnp.asarray(meta.unbox(subtree(merged, module)[weight]), jnp.float32)
        # (W + ΔW) - ΔW is W up to a few roundings of numbers as large as W + ΔW; with DoRA
        # that is not the merged weight (m / ‖W + ΔW‖ times it) but at most |W| + |ΔW|
        size = float(jnp.max(jnp.abs(given)))
        adapter = adapter_at(layer, weight)
        if adapter.magnitude is not None:
            a, b = meta.unbox(adapter.a), meta.unbox(adapter.b)
            delta = _layout.delta_weight(a, b, adapter.delta_eq, adapter.scale)
            size = float(jnp.max(jnp.abs(want))) + float(jnp.max(jnp.abs(delta)))
        tolerance = 8 * jnp.finfo(layer[weight].dtype).eps * size
        error = float(jnp.max(jnp.abs(got - want)))
        if error > tolerance:
            raise ValueError(
                f"unmerge: weight {name!r} minus these adapters' ΔW is {error:.3g} away from "
                "the adapted tree's base weight: the first argument was merged with other "
                "adapters. Pass the adapted tree that was given to jaxlora.merge."
            )


def unmerge(merged: PyTree, adapted: PyTree) -> PyTree:
    """The adapted tree with kernels ``merged - scale · A ⊗ B`` (see `jaxlora.unmerge`)."""
    merged_inner, _ = params_of(merged)
    adapted_inner, rebuild = params_of(adapted)
    if has_adapters(merged_inner):
        raise ValueError(
            "unmerge: the first argument holds LoRA adapters, so it was never merged; pass "
            "the plain params that jaxlora.merge returned."
        )
    if not has_adapters(adapted_inner):
        raise ValueError(
            "unmerge: the second argument holds no LoRA adapters, so there is nothing to "
            "subtract; pass the adapted tree that was given to jaxlora.merge."
        )
    quantized = [
        path_str(k)
        for k, x in jax.tree_util.tree_leaves_with_path(
            adapted_inner, is_leaf=_quantize.is_quantized
        )
        if _quantize.is_quantized(x)
    ]
    if quantized:
        raise ValueError(
            f"unmerge: the adapted tree's base is stored quantized ({quantized[0]!r} and "
            f"{len(quantized) - 1} more), and merge returned it dequantized: subtracting the "
            "adapters would not give the stored codes back. merge is pure: keep using the "
            "adapted tree you merged."
        )
    _check_was_merged(merged_inner, adapted_inner)

    def restore(m, a, path):
        if isinstance(a, Trainable):
            return Trainable(m)
        if not isinstance(a, Mapping):
            return m
        if not isinstance(m, Mapping):
            raise ValueError(f"unmerge: merged params have a leaf at {path!r}, expected a dict.")
        keys, tokens = _adapter_keys(a), _tokens.keys_of(a)
        missing = sorted(set(a) - set(m) - set(keys) - set(tokens))
        if missing:
            raise ValueError(
                f"unmerge: merged params lack {missing} at {path!r}; pass the tree that "
                "jaxlora.merge returned for these adapters."
            )
        out = {
            k: restore(m[k], v, f"{path}/{k}")
            for k, v in a.items()
            if k not in keys and k not in tokens
        }
        for key in keys:
            out[key] = a[key]
        for key in keys:
            weight = _adapted_weight(a, key)
            out[weight] = _merged_weight(out, weight, -1.0, None, base=a[weight])
        return _tokens.restore_layer(out, a, m, path)

    restored = restore(merged_inner, adapted_inner, "")
    _check_restored(merged_inner, restored, adapted_inner)
    return rebuild(restored)
