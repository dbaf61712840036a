"""The NNX modules jaxlora puts in a user's model: adapter variables and the two wrappers.

`LoraLayer` wraps one of Flax's own layers (its delta computed from the layer's
attributes); `LoraModule` wraps a module of the user's whose own weights are adapted,
running its methods through jaxlora's rewrite of their traced program (`_rewrite`).
Adapter factors are `LoraParam` variables and fully trained parameters `TrainableParam`,
so NNX filters select them.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import _dora, _init_from_weights, _layout, _rewrite, _sharding
from jaxlora._config import LoraConfig, adapter_name
from jaxlora._quantize import is_quantized
from jaxlora._views import Factors, factors_for


class TrainableParam(nnx.Param):
    """A parameter that trains: a LoRA factor, or a ``modules_to_save``/bias leaf."""


class LoraParam(TrainableParam):
    """A LoRA factor (A or B) of an NNX `LoraLayer`."""


def layer_weight(layer: nnx.Module) -> nnx.Variable:
    """The adapted variable of one of Flax's layers: its embedding table or kernel."""
    return layer.embedding if isinstance(layer, nnx.Embed) else layer.kernel


def _initial_factors(
    weight: nnx.Variable,
    layout: _layout.Layout,
    stack: tuple[int, ...],
    scale: float,
    key: jax.Array,
    config: LoraConfig,
    shardings: Any,
    name: str,
) -> tuple[jax.Array, jax.Array]:
    """Fresh A and B for ``weight``; an init from the weight (PiSSA, OLoRA) also sets the
    weight to its residual, in place."""
    if not _init_from_weights.is_from_weights(config.init):
        return _sharding.init_factors(
            key, layout, stack, init=config.init, dtype=jnp.dtype(config.dtype), shardings=shardings
        )
    rank = layout.a_shape[-1]
    a, b, residual = _init_from_weights.initial_factors(
        name,
        weight.get_value(),
        layout.delta_eq,
        rank,
        scale,
        config.init,
        dtype=config.dtype,
        shardings=shardings,
    )
    weight.set_value(residual)
    return a, b


def _magnitude(
    weight: nnx.Variable,
    a: jax.Array,
    b: jax.Array,
    layout: _layout.Layout,
    scale: float,
    config: LoraConfig,
    b_meta: dict[str, Any],
) -> LoraParam | None:
    """DoRA's magnitude (``config.use_dora``), placed like B without its rank, else None."""
    if not config.use_dora:
        return None
    m = _dora.initial_magnitude(
        weight.get_value(), a, b, layout.delta_eq, scale, jnp.dtype(config.dtype)
    )
    if b_meta.get("out_sharding"):
        names = _sharding.magnitude_names(b_meta["out_sharding"], layout.delta_eq)
        b_meta = {**b_meta, "out_sharding": names}
    return LoraParam(m, **b_meta)


def adapter_factors(adapter: Any, weight: nnx.Variable) -> Factors:
    """The `Factors` of a `LoraLayer` or `WeightAdapter` on its ``weight`` (with DoRA's
    output scale when it has a magnitude)."""
    a, b = adapter.lora_a[...], adapter.lora_b[...]
    g = None
    if adapter.lora_magnitude is not None:
        m = adapter.lora_magnitude[...]
        g = _dora.output_scale(weight.get_value(), a, b, m, adapter.delta_eq, adapter.scale)
    return factors_for(a, b, adapter.delta_eq, weight.ndim, adapter.scale, g)


class _Fold:
    """ΔW and folding, shared by `LoraLayer` and `WeightAdapter`."""

    def delta_weight(self) -> jax.Array:
        """``scale · A ⊗ B`` in the weight's layout (float32)."""
        return _layout.delta_weight(self.lora_a[...], self.lora_b[...], self.delta_eq, self.scale)

    def folded(self, weight: jax.Array, sign: float, base: jax.Array | None = None) -> jax.Array:
        """``weight`` with the adapter folded in (``sign=+1``: ``W + ΔW``, DoRA's
        ``m / ‖W + ΔW‖ · (W + ΔW)``) or out (``-1``; DoRA's norm is then taken on ``base``,
        the weight it was folded into), in float32."""
        if self.lora_magnitude is None:
            return weight.astype(jnp.float32) + sign * self.delta_weight()
        args = (self.lora_a[...], self.lora_b[...], self.lora_magnitude[...], self.delta_eq)
        if sign > 0:
            return _dora.merged_weight(weight, *args, self.scale)
        return _dora.unmerged_weight(weight, base, *args, self.scale)


def _dropout_key(dropout: nnx.Dropout | None) -> jax.Array | None:
    if dropout is None or dropout.deterministic:
        return None
    rngs = dropout.rngs
    return rngs[dropout.rng_collection]() if isinstance(rngs, nnx.Rngs) else rngs()


class LoraLayer(_Fold, nnx.Module):
    """An NNX layer plus a LoRA adapter: ``base(x) + scale · dropout(x) @ A @ B``.

    Attributes:
      base: the original layer (its kernel stays at ``base.kernel``).
      lora_a: `LoraParam` ``(*stack, *a_shape)``.
      lora_b: `LoraParam` ``(*stack, *b_shape)``, zero at creation.
      scale: alpha / rank (or alpha / sqrt(rank)).
      delta_eq: einsum building the kernel-shaped ΔW from A and B.
      lora_magnitude: DoRA's magnitude (`LoraParam`, ``LoraConfig(use_dora=True)``), else
        None; a DoRA layer runs through jaxlora's rewrite like a `LoraModule`.

    With an init from the weight (``LoraConfig(init="pissa")``), A and B come from the
    kernel (``name``, the adapter's name, seeds a randomised SVD) and the kernel becomes
    the residual.

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
        name: str = "",
    ):
        weight = layer_weight(base)
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
        a, b = _initial_factors(weight, layout, stack, scale, key, config, shardings, name)
        a_meta, b_meta = _sharding.nnx_factor_metadata(weight, layout.delta_eq, rank_axis)
        self.base = base
        self.lora_a = LoraParam(a, **a_meta)
        self.lora_b = LoraParam(b, **b_meta)
        self.lora_magnitude = _magnitude(weight, a, b, layout, scale, config, b_meta)
        self.scale = scale
        self.delta_eq = layout.delta_eq
        self.dropout = (
            nnx.Dropout(config.dropout, rng_collection=config.dropout_rng, rngs=rngs)
            if config.dropout
            else None
        )

    def _dora_call(self, method: str, args: tuple, kwargs: dict, dropout: bool) -> Any:
        weight = "embedding" if isinstance(self.base, nnx.Embed) else "kernel"
        factors = {weight: adapter_factors(self, layer_weight(self.base))}
        rate = self.dropout.rate if dropout and self.dropout is not None else 0.0
        key = _dropout_key(self.dropout) if rate else None
        return rewritten_call(self.base, method, args, kwargs, factors, dropout=rate, key=key)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The base layer's output plus the adapter's; same arguments as the base."""
        if self.lora_magnitude is not None:
            return self._dora_call("__call__", (x, *args), kwargs, dropout=True)
        if holds_quantized(self.base):  # its kernel is dequantized where it is used
            y = rewritten_call(self.base, "__call__", (x, *args), kwargs, {})
        else:
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
        if self.lora_magnitude is not None:
            return self._dora_call("attend", (query,), {}, dropout=False)
        y = self.base.attend(query)
        delta = functools.partial(_layout.attend_delta, scale=self.scale)
        return _layout.add_delta(y, delta, query, self.lora_a[...], self.lora_b[...])


# While lorafy checks a wrapped module, LoraModules count the uses they adapt here.
APPLIED_USES: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "jaxlora_applied", default=None
)


class WeightAdapter(_Fold, nnx.Module):
    """The LoRA factors of one weight of a `LoraModule`.

    Attributes:
      lora_a: `LoraParam` A, ``(*stack, *in, r)`` (see `jaxlora.LoraAdapter`).
      lora_b: `LoraParam` B, ``(*stack, r, *out)``, zero at creation.
      scale: alpha / rank (or alpha / sqrt(rank)).
      delta_eq: einsum building the weight-shaped ΔW from A and B.
      lora_magnitude: DoRA's magnitude (`LoraParam`), else None.
    """

    def __init__(
        self,
        weight: nnx.Variable,
        layout: _layout.Layout,
        *,
        scale: float,
        key: jax.Array,
        config: LoraConfig,
        rank_axis: str | None = None,
        name: str = "",
    ):
        stored = tuple(weight.shape)
        stack = stored[: len(stored) - len(layout.kernel_shape)]
        rank = layout.a_shape[-1]
        shardings = _sharding.factor_shardings(
            f"the weight {stored}", weight.get_value(), layout.delta_eq, rank, rank_axis
        )
        a, b = _initial_factors(weight, layout, stack, scale, key, config, shardings, name)
        a_meta, b_meta = _sharding.nnx_factor_metadata(weight, layout.delta_eq, rank_axis)
        self.lora_a = LoraParam(a, **a_meta)
        self.lora_b = LoraParam(b, **b_meta)
        self.lora_magnitude = _magnitude(weight, a, b, layout, scale, config, b_meta)
        self.scale = scale
        self.delta_eq = layout.delta_eq


class LoraModule(nnx.Module):
    """A module of the user's whose own weights carry LoRA, applied wherever it uses them.

    The module (``base``) is kept as it is. Each of its methods, called through the
    wrapper (``wrapper(x)``, ``wrapper.decode(x)``), runs through jaxlora's rewrite of its
    traced program (see `jaxlora.lorafy`), which adds ``scale · x @ A @ B`` after every
    contraction or lookup of an adapted weight. Other attributes read through to ``base``.

    Attributes:
      base: the original module.
      adapters: ``nnx.Dict`` weight name -> `WeightAdapter`.
      tokens: ``nnx.Dict`` weight name -> its trained token rows (a `_tokens_nnx.TokenAdapter`).
    """

    def __init__(
        self,
        base: nnx.Module,
        adapters: dict[str, WeightAdapter],
        *,
        config: LoraConfig,
        rngs: nnx.Rngs,
        path: str = "",
        tokens: dict[str, nnx.Module] | None = None,
    ):
        self.base = base
        self.adapters = nnx.Dict(adapters)
        self.tokens = nnx.Dict(tokens or {})
        self.jaxlora_path = path
        self.dropout = (
            nnx.Dropout(config.dropout, rng_collection=config.dropout_rng, rngs=rngs)
            if config.dropout
            else None
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The base module's ``__call__`` with its adapters active."""
        return self.call_method("__call__", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in (
            "base",
            "adapters",
            "tokens",
            "dropout",
            "jaxlora_path",
        ):
            raise AttributeError(name)
        attr = getattr(self.base, name)
        if inspect.ismethod(attr) and attr.__self__ is self.base:
            return functools.partial(self.call_method, name)
        return attr

    def call_method(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``base.<method>(*args, **kwargs)`` with the adapters active."""
        counts = APPLIED_USES.get()
        applied: dict[str, int] = {}
        factors = {
            weight: adapter_factors(adapter, getattr(self.base, weight))
            for weight, adapter in self.adapters.items()
        }
        factors.update({w: t.factors(getattr(self.base, w)) for w, t in self.tokens.items()})
        out = rewritten_call(
            self.base,
            method,
            args,
            kwargs,
            factors,
            dropout=0.0 if self.dropout is None else self.dropout.rate,
            key=_dropout_key(self.dropout),
            applied=applied,
        )
        if counts is not None:
            for weight, n in applied.items():
                counts[adapter_name(self.jaxlora_path, weight)] += n
        return out


def holds_quantized(module: nnx.Module) -> bool:
    """Whether a variable of ``module``'s own (not a submodule's) is stored quantized."""
    return any(
        isinstance(v, nnx.Variable) and is_quantized(v.get_value()) for v in vars(module).values()
    )


def rewritten_call(
    base: nnx.Module,
    method: str,
    args: tuple,
    kwargs: dict,
    factors: dict[str, Any],
    *,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    applied: dict[str, int] | None = None,
) -> Any:
    """``base.<method>(*args, **kwargs)`` through jaxlora's rewrite of its traced program:
    ``factors`` added where their weights are used, weights stored quantized dequantized
    there (see `_rewrite.call`)."""
    graphdef, state = nnx.split(base)

    def run(state, *call_args, **call_kwargs):
        module = nnx.merge(graphdef, state)
        out = getattr(module, method)(*call_args, **call_kwargs)
        return out, nnx.state(module)

    out, new_state = _rewrite.call(
        run, state, factors, args, kwargs, dropout=dropout, key=key, applied=applied
    )
    # Write back only what the method changed (a cache, a counter): an unchanged
    # variable may belong to an outer trace that must not be written from this one.
    old = jax.tree.leaves(state, is_leaf=is_quantized)
    new = jax.tree.leaves(new_state, is_leaf=is_quantized)
    if any(a is not b for a, b in zip(old, new, strict=True)):
        nnx.update(base, new_state)
    return out
