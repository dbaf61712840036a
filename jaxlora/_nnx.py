"""`lorafy` for Flax NNX: targeted layers are wrapped in place, like PEFT's ``base_layer``.

Adapter factors are `LoraParam` variables and fully trained parameters become
`TrainableParam`, so NNX filters select them: ``nnx.Optimizer(model, tx,
wrt=jaxlora.TrainableParam)``, ``nnx.DiffState(0, jaxlora.TrainableParam)``,
``nnx.state(model, jaxlora.LoraParam)``.
"""

from __future__ import annotations

import collections
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import (
    _dora,
    _init_from_weights,
    _layout,
    _quantize,
    _quantized_base,
    _rewrite,
    _targeting,
    _tokens,
    _tokens_nnx,
)
from jaxlora._config import LoraConfig, adapter_name, format_paths, path_matches
from jaxlora._nnx_wrappers import (
    APPLIED_USES,
    LoraLayer,
    LoraModule,
    LoraParam,
    TrainableParam,
    WeightAdapter,
    layer_weight,
)

_SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed)


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


def _builtin_candidates(module: nnx.Module) -> list[_targeting.Candidate]:
    """Flax's own layers, laid out from their attributes (no trace needed)."""
    found = []
    for path, layer in _modules(module, _SUPPORTED):
        name = _path_str(path)
        weight = "embedding" if isinstance(layer, nnx.Embed) else "kernel"
        shape = tuple(layer_weight(layer).shape)
        try:
            roles, reason = _targeting.roles_of(_layout_of(layer, 1).delta_eq, len(shape)), ""
        except ValueError as e:
            roles, reason = None, str(e)
        embedding = isinstance(layer, nnx.Embed)
        found.append(_targeting.Candidate(name, name, weight, shape, embedding, roles, reason))
    return found


def _traced_candidates(
    module: nnx.Module, inputs: tuple, kwargs: dict, skip: set[str]
) -> list[_targeting.Candidate]:
    """Weights outside Flax's layers that ``module(*inputs, **kwargs)`` contracts or looks up."""
    graphdef, state = nnx.split(module)

    def run(state, *args, **kw):
        return nnx.merge(graphdef, state)(*args, **kw)

    try:
        seen = _rewrite.discover(run, state, inputs, kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"lorafy: the module failed on these example inputs ({type(e).__name__}: "
            f"{first}). Pass inputs (and keyword arguments) its __call__ takes."
        ) from e
    found = _targeting.candidates(seen)
    return [c for c in found if c.module not in skip]


def lorafy(
    module: nnx.Module,
    config: LoraConfig,
    *inputs: Any,
    rngs: nnx.Rngs,
    rank_axis: str | None = None,
    **kwargs: Any,
) -> nnx.Module:
    """Wraps the targeted layers of an NNX module in `LoraLayer` (see `jaxlora.lorafy`)."""
    if any(True for _ in _modules(module, (LoraLayer, LoraModule))):
        raise ValueError(
            "lorafy: this module already holds LoRA layers. Adapt the base module once; "
            "jaxlora.merge(module) returns a plain copy."
        )
    found = _builtin_candidates(module)
    builtin = {c.module for c in found}
    if inputs or kwargs:
        found += _traced_candidates(module, inputs, kwargs, builtin)
    else:
        _warn_untraced(module, builtin)
    selected = _targeting.select(config, found)
    _init_from_weights.check_layers(
        config.init, [(c.name, c.embedding, c.conv) for c in selected], who="lorafy"
    )
    rows: dict[str, list[_tokens.Choice]] = {}
    for t in _tokens.choose(
        config.token_table(), found, [c.name for c in selected], config.modules_to_save
    ):
        _tokens.check_not_quantized(t, _quantized_base.chosen(config, found))
        rows.setdefault(t.module, []).append(t)
    _dora.check_layers(
        config.use_dora, [(c.name, c.conv, c.experts) for c in selected], who="lorafy"
    )
    quantized = _quantize_weights(module, config, found)
    key = rngs.params()
    owners: dict[str, list[_targeting.Candidate]] = {}
    for c in selected:
        layout = c.layout(config)
        if c.module not in builtin:
            owners.setdefault(c.module, []).append(c)
            continue
        path = _path_of(module, c.module)
        wrapper = LoraLayer(
            _child(module, path),
            layout,
            scale=config.scale_for(c.paths()),
            key=jax.random.fold_in(key, zlib.crc32(c.name.encode())),
            config=config,
            rngs=rngs,
            rank_axis=rank_axis,
            name=c.name,
        )
        _set_child(module, path, wrapper)
    # deepest first: a wrapped module inside another wrapped one is replaced in its parent
    # before that parent is wrapped in turn
    for owner in sorted(owners.keys() | rows.keys(), key=lambda p: -p.count("/")):
        cands = owners.get(owner, [])
        names = [c.name for c in cands] + [t.name for t in rows.get(owner, [])]
        path = _path_of(module, owner)
        base = _child(module, path)
        if not isinstance(base, nnx.Module) or not path:
            raise ValueError(
                f"lorafy: weights {names} are held by "
                f"{type(base).__name__} at {owner or 'the root'!r}, which jaxlora cannot "
                "wrap; exclude them."
            )
        adapters = {
            c.weight: WeightAdapter(
                getattr(base, c.weight),
                c.layout(config),
                scale=config.scale_for(c.paths()),
                key=jax.random.fold_in(key, zlib.crc32(c.name.encode())),
                config=config,
                rank_axis=rank_axis,
                name=c.name,
            )
            for c in cands
        }
        tokens = {
            t.weight: _tokens_nnx.TokenAdapter(getattr(base, t.weight), t, dtype=config.dtype)
            for t in rows.get(owner, [])
        }
        wrapper = LoraModule(base, adapters, config=config, rngs=rngs, path=owner, tokens=tokens)
        _set_child(module, path, wrapper)
    adapted_layers = {c.module for c in selected if c.module in builtin}
    plain = set(quantized) - adapted_layers - set(owners) - set(rows)
    for owner in sorted(plain, key=lambda p: -p.count("/")):
        # a layer stored quantized and not adapted reads its weights through the rewrite too
        path = _path_of(module, owner)
        _set_child(
            module, path, LoraModule(_child(module, path), {}, config=config, rngs=rngs, path=owner)
        )
    token_names = {t.name for ts in rows.values() for t in ts}
    wrapped = [c for cs in owners.values() for c in cs] + [
        c for c in found if c.name in token_names
    ]
    if wrapped and (inputs or kwargs):
        _check_every_use_applied(module, inputs, kwargs, wrapped)
    _mark_full_training(module, config)
    module.jaxlora_not_adapted = tuple(_targeting.not_adapted(found, selected).items())
    return module


def _quantize_weights(
    module: nnx.Module, config: LoraConfig, found: list[_targeting.Candidate]
) -> list[str]:
    """Stores the weights ``config.quantize`` chooses quantized, in place; their modules' paths."""
    owners = []
    for owner, weight, contracted in _quantized_base.chosen(config, found):
        var = getattr(_child(module, _path_of(module, owner)), weight)
        if not _quantize.is_quantized(var.get_value()):
            name = adapter_name(owner, weight)
            var.set_value(
                _quantized_base.quantize_array(
                    var.get_value(),
                    config.quantize,
                    contracted,
                    double_quant=config.double_quant,
                    name=name,
                )
            )
        owners.append(owner)
    return owners


def _check_every_use_applied(
    module: nnx.Module, inputs: tuple, kwargs: dict, wrapped: list[_targeting.Candidate]
) -> None:
    """Raises if a wrapped weight is also used outside its own module's methods.

    A `LoraModule` adapts the uses in its module's methods; another module reading the
    weight directly (``jnp.dot(x, self.other.w.T)``) would see it without the adapter,
    silently unlike `merge`. One abstract call counts the adapted uses against the traced.
    """
    counts: collections.Counter = collections.Counter()
    token = APPLIED_USES.set(counts)
    try:
        graphdef, state = nnx.split(module)
        jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*inputs, **kwargs), state)
    finally:
        APPLIED_USES.reset(token)
    for c in wrapped:
        if counts[c.name] < c.uses:
            raise ValueError(
                f"lorafy: weight {c.name!r} is used {c.uses} times by the model but only "
                f"{counts[c.name]} of them in methods of its own module {c.module!r} (another "
                "module reads it directly, e.g. a tied head); jaxlora cannot adapt those uses. "
                "Exclude it, or call the owning module's method instead."
            )


def not_adapted(module: nnx.Module) -> tuple[tuple[str, str], ...]:
    """``(name, why)`` of the weights `lorafy` saw in ``module`` and left without adapter."""
    return getattr(module, "jaxlora_not_adapted", ())


def _warn_untraced(module: nnx.Module, builtin: set[str]) -> None:
    """Says which weights outside Flax's layers were not looked at (no example inputs)."""
    outside = [
        _path_str(path)
        for path, var in nnx.iter_graph(module)
        if isinstance(var, nnx.Param)
        and var.ndim >= 2
        and not any(_path_str(path).startswith(b + "/") for b in builtin)
    ]
    if outside:
        warnings.warn(
            f"lorafy: {len(outside)} weights outside Flax's layers were not examined, e.g. "
            f"{outside[0]!r}. Pass example inputs, lorafy(module, config, *inputs, "
            "rngs=...), so jaxlora can see how the module uses them.",
            UserWarning,
            stacklevel=3,
        )


def _path_of(root: nnx.Module, name: str) -> tuple:
    """The attribute/index path of a ``/``-joined module path."""
    if not name:
        return ()
    by_name = {_path_str(p): p for p, _ in nnx.iter_modules(root)}
    if name in by_name:
        return by_name[name]
    return tuple(int(k) if k.isdigit() else k for k in name.split("/"))


def _child(root: Any, path: tuple) -> Any:
    node = root
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _mark_full_training(module: nnx.Module, config: LoraConfig) -> None:
    wrapped = {
        path
        for path, w in _modules(module, (LoraLayer, LoraModule))
        if not isinstance(w, LoraModule) or w.adapters  # not a quantized layer's wrapper
    }
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


_WRAPPERS = (LoraLayer, LoraModule)


def adapted_weights(module: nnx.Module) -> list[tuple[str, nnx.Variable, Any]]:
    """``(name, weight, adapter)`` of every adapter in ``module``.

    ``adapter`` is the `LoraLayer` or `WeightAdapter` holding ``lora_a``, ``lora_b``,
    ``scale`` and ``delta_eq``; ``name`` the layer's path, or the weight's own path for a
    weight of a `LoraModule`.
    """
    out = []
    # a layer inside a LoraModule keeps the name lorafy gave it (no "base" step)
    owners = {path for path, _ in _modules(module, (LoraModule,))}
    for path, wrapper in _modules(module, _WRAPPERS):
        name = _path_str(_merged_path(path, owners))
        if isinstance(wrapper, LoraLayer):
            out.append((name, layer_weight(wrapper.base), wrapper))
        else:
            for weight, adapter in wrapper.adapters.items():
                out.append((adapter_name(name, weight), getattr(wrapper.base, weight), adapter))
    return out


def _fold(module: nnx.Module, sign: float, dtype: Any = None, bases: list | None = None) -> None:
    """Folds every adapter of ``module`` in (``sign=+1``) or out (``-1``, ``bases`` the
    adapted module's weights, on which DoRA's norm is taken), in place."""
    for i, (_, weight, adapter) in enumerate(adapted_weights(module)):
        w = weight.get_value()
        base = None if bases is None else bases[i]
        if _quantize.is_quantized(w):
            weight.set_value(
                adapter.folded(_quantize.dequantize(w, jnp.float32), sign).astype(dtype)
            )
        else:
            weight[...] = adapter.folded(w, sign, base).astype(w.dtype)


def merge(module: nnx.Module, dtype: Any = jnp.bfloat16) -> nnx.Module:
    """A copy of ``module`` with each adapter folded into its weight and the wrappers gone."""
    merged = nnx.clone(module)
    wrappers = list(_modules(merged, _WRAPPERS))
    if not wrappers:
        raise ValueError(
            "merge: this module holds no LoRA layers. Pass the module adapted by jaxlora.lorafy."
        )
    _fold(merged, +1.0, dtype)
    _tokens_nnx.merge_rows(merged)
    for path, wrapper in wrappers:
        _set_child(merged, path, wrapper.base)
    for _, layer in nnx.iter_modules(merged):
        _retype_all(layer, TrainableParam, nnx.Param)
    for _, var in nnx.iter_graph(merged):
        if isinstance(var, nnx.Variable) and _quantize.is_quantized(var.get_value()):
            var.set_value(_quantize.dequantize(var.get_value(), dtype))
    return merged


def _merged_path(path: tuple, wrapped: set[tuple]) -> tuple:
    for w in wrapped:
        if path[: len(w) + 1] == (*w, "base"):
            return (*w, *path[len(w) + 1 :])
    return path


def unmerge(merged: nnx.Module, adapted: nnx.Module) -> nnx.Module:
    """A copy of ``adapted`` whose weights come from ``merged`` minus each adapter's ΔW."""
    if any(True for _ in _modules(merged, _WRAPPERS)):
        raise ValueError(
            "unmerge: the first module holds LoRA layers, so it was never merged; pass the "
            "module that jaxlora.merge returned."
        )
    if any(
        isinstance(v, nnx.Variable) and _quantize.is_quantized(v.get_value())
        for _, v in nnx.iter_graph(adapted)
    ):
        raise ValueError(
            "unmerge: the adapted module's base is stored quantized, and merge returned it "
            "dequantized: subtracting the adapters would not give the stored codes back. "
            "merge is pure: keep using the adapted module you merged."
        )
    out = nnx.clone(adapted)
    wrapped = {path for path, _ in _modules(out, _WRAPPERS)}
    merged_vars = {path: var for path, var in nnx.iter_graph(merged) if isinstance(var, nnx.Param)}
    for path, var in nnx.iter_graph(out):
        if isinstance(var, nnx.Param) and not isinstance(var, LoraParam):
            source = merged_vars.get(_merged_path(path, wrapped))
            if source is None:
                raise ValueError(
                    f"unmerge: merged module has no variable at {_path_str(path)!r}; pass the "
                    "module that jaxlora.merge returned for this adapted module."
                )
            var[...] = source[...]
    for (name, weight, adapter), (_, base, _) in zip(
        adapted_weights(out), adapted_weights(adapted), strict=True
    ):
        if adapter.lora_b[...].any() and jnp.array_equal(weight[...], base[...]):
            raise ValueError(
                f"unmerge: weight {name!r} of the first module equals the adapted module's "
                "base weight although its adapter is not zero: it was never merged. Pass the "
                "output of jaxlora.merge(adapted)."
            )
    _fold(out, -1.0, bases=[base[...] for _, base, _ in adapted_weights(adapted)])
    _tokens_nnx.restore_rows(out, adapted)
    return out
