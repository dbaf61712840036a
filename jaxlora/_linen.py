"""`lorafy` for Flax linen: adapters in the params tree, applied where each weight is used.

The user's modules are never edited. `lorafy` traces ``model.apply`` once, abstractly,
on example inputs and finds every weight consumed by a contraction or an embedding
lookup, whichever module holds it and however it is applied (see `_rewrite`); the
targeted ones gain a `LoraAdapter` next to them in their module's params (key
``"lora"`` for a layer's ``kernel``/``embedding``, ``"lora_<name>"`` for another
weight). `LoraModel.apply` runs the traced program of ``model.apply`` with each
adapter's ``scale · x @ A @ B`` added where its weight is used.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import meta

from jaxlora import (
    _dora,
    _init_from_weights,
    _quantize,
    _quantized_base,
    _rewrite,
    _sharding,
    _targeting,
    _tokens,
)
from jaxlora._config import LoraConfig, format_paths, path_matches
from jaxlora._tree import (
    LoraAdapter,
    Trainable,
    adapter_key,
    adapters_of,
    has_adapters,
    module_paths,
    params_of,
    rebox,
    replace_at,
    subtree,
    unwrap_trainable,
    without_adapters,
)


def discover(model: Any, variables: Any, args: tuple, kwargs: dict) -> list[_targeting.Candidate]:
    """Every weight of ``variables["params"]`` that ``model.apply`` contracts or looks up."""
    try:
        seen = _rewrite.discover(model.apply, variables, args, kwargs)
    except Exception as e:
        summary = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"lorafy: model.apply failed on these params and example inputs "
            f"({type(e).__name__}: {summary}). Pass the params from model.init and the "
            "inputs (and keyword arguments such as deterministic=True) that model.apply "
            "takes."
        ) from e
    params = {p: s for p, s in seen.items() if p.startswith("params/")}
    return _targeting.candidates(params, root="params")


def make_adapter(
    c: _targeting.Candidate,
    weight: Any,
    config: LoraConfig,
    key: jax.Array,
    rank_axis: str | None,
) -> tuple[LoraAdapter, Any]:
    """The adapter of one weight, placed and boxed like it (see `_sharding`), and the
    weight to keep frozen: the residual for an init from the weight (PiSSA, OLoRA), else
    ``weight`` itself.

    Args:
      c: the weight, as discovered.
      weight: its value as stored (a linen box, or an array).
      config: the LoRA config.
      key: PRNG key, folded with the adapter's name.
      rank_axis: mesh axis to shard the rank over, or None.
    """
    layout = c.layout(config)
    rank = layout.a_shape[-1]
    scale = config.scale_for(c.paths())
    raw = weight.value if isinstance(weight, meta.Partitioned) else meta.unbox(weight)
    stack = tuple(raw.shape)[: raw.ndim - len(layout.kernel_shape)]
    shardings = _sharding.factor_shardings(
        f"layer {c.name!r}", raw, layout.delta_eq, rank, rank_axis
    )
    if _init_from_weights.is_from_weights(config.init):
        a, b, residual = _init_from_weights.initial_factors(
            c.name,
            raw,
            layout.delta_eq,
            rank,
            scale,
            config.init,
            dtype=config.dtype,
            shardings=shardings,
        )
        weight = rebox(weight, residual)
    else:
        a, b = _sharding.init_factors(
            jax.random.fold_in(key, zlib.crc32(c.name.encode())),
            layout,
            stack,
            init=config.init,
            dtype=jnp.dtype(config.dtype),
            shardings=shardings,
        )
    magnitude = None
    if config.use_dora:
        magnitude = _dora.initial_magnitude(
            meta.unbox(weight), a, b, layout.delta_eq, scale, jnp.dtype(config.dtype)
        )
        magnitude = _sharding.box_magnitude(weight, magnitude, layout.delta_eq)
    a, b = _sharding.box_factors(weight, a, b, layout.delta_eq, rank_axis)
    adapter = LoraAdapter(a=a, b=b, scale=scale, delta_eq=layout.delta_eq, magnitude=magnitude)
    return adapter, weight


def _mark_trainable(tree: Any) -> Any:
    return jax.tree.map(Trainable, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def _with_adapter(
    weight: str, adapter: LoraAdapter, value: Any, layer: Mapping[str, Any]
) -> dict[str, Any]:
    return {**layer, weight: value, adapter_key(weight): adapter}


def _with_trainable_bias(layer: Mapping[str, Any]) -> dict[str, Any]:
    return {**layer, "bias": _mark_trainable(layer["bias"])}


def _mark_full_training(params: dict, config: LoraConfig, adapted: list[str]) -> dict:
    """Wraps the leaves of ``modules_to_save`` and of trainable biases in `Trainable`.

    Args:
      params: the params with adapters.
      config: the LoRA config.
      adapted: module paths of the adapted weights.
    """
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
    for path in dict.fromkeys(bias_layers):
        if isinstance(subtree(params, path).get("bias"), jax.Array | meta.AxisMetadata):
            params = replace_at(params, path, _with_trainable_bias)
    return params


def lorafy(
    model: Any,
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
    found = discover(model, variables, inputs, kwargs)
    selected = _targeting.select(config, found)
    _init_from_weights.check_layers(
        config.init, [(c.name, c.embedding, c.conv) for c in selected], who="lorafy"
    )
    _dora.check_layers(
        config.use_dora,
        [(c.name, c.conv, c.experts) for c in selected],
        who="lorafy",
        quantized=[
            c.name
            for c in selected
            if _quantize.is_quantized(meta.unbox(subtree(inner, c.module)[c.weight]))
        ],
    )
    adapted = dict(inner)
    for c in selected:
        adapter, value = make_adapter(
            c, subtree(adapted, c.module)[c.weight], config, key, rank_axis
        )
        adapted = replace_at(
            adapted, c.module, functools.partial(_with_adapter, c.weight, adapter, value)
        )
    quantized = _quantized_base.chosen(config, found)
    for t in _tokens.choose(
        config.token_table(), found, [c.name for c in selected], config.modules_to_save
    ):
        _tokens.check_not_quantized(t, quantized)
        adapted = replace_at(
            adapted, t.module, functools.partial(_tokens.with_node, t, dtype=config.dtype)
        )
    adapted = _mark_full_training(adapted, config, [c.module for c in selected])
    adapted = _quantized_base.quantize_weights(
        adapted,
        quantized,
        config.quantize,
        double_quant=config.double_quant,
    )
    not_adapted = tuple(_targeting.not_adapted(found, selected).items())
    lora_model = LoraModel(model, config, not_adapted)
    return lora_model, rebuild(adapted)


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A linen model whose adapted weights add their LoRA update where they are used.

    ``apply`` takes exactly the arguments of ``model.apply`` (variables, inputs, rngs,
    mutable, method, flags); the params must be the adapted tree from `lorafy`.

    Attributes:
      model: the original, unmodified linen module.
      config: the `LoraConfig` used to adapt it.
      not_adapted: ``(name, why)`` of each weight consumed by a contraction or lookup that
        got no adapter, as `summary` reports them.
    """

    model: Any
    config: LoraConfig
    not_adapted: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        if not isinstance(self.config, LoraConfig):
            raise TypeError(
                f"LoraModel: config is a {type(self.config).__name__}, not a LoraConfig; pass "
                "the config the params were adapted with (load_adapter returns it)."
            )

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.apply`` with the adapters active. Same arguments, same return value."""
        inner, rebuild = params_of(variables)
        inner = unwrap_trainable(inner)
        root = "params/" if inner is not variables else ""
        adapters = {root + path: factors for path, factors in adapters_of(inner).items()}
        base = rebuild(without_adapters(inner))
        key = None
        rngs = kwargs.get("rngs")
        if self.config.dropout and isinstance(rngs, Mapping) and self.config.dropout_rng in rngs:
            key = _rewrite.stream_key(rngs[self.config.dropout_rng], "jaxlora.dropout")
        return _rewrite.call(
            self.model.apply, base, adapters, args, kwargs, dropout=self.config.dropout, key=key
        )
