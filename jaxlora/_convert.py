"""PiSSA/OLoRA adapters as plain LoRA on the untouched base (PEFT's ``convert_pissa_to_lora``).

An adapter initialised from the base weight trained on the residual ``W - s·A0⊗B0``, so it
only works on a base changed the same way. Its net update is ``s·(A⊗B - A0⊗B0)``, which is a
plain LoRA adapter of rank 2r on ``W`` itself: ``A' = [A, A0]`` and ``B' = [B; -B0]`` stacked
along the rank (PEFT's ``path_initial_model_for_weight_conversion``). A0 and B0 are
recomputed from the base, exactly as `lorafy` computed them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import (
    _attach,
    _base_checks,
    _init_from_weights,
    _layout,
    _nnx,
    _records,
    _sharding,
    _token_records,
)
from jaxlora._config import LoraConfig
from jaxlora._nnx_wrappers import LoraLayer, LoraParam
from jaxlora._tree import LoraAdapter, PyTree, params_of, subtree

# how far the base given may be from the one the adapters were initialised on (relative
# to the weight's largest entry): float32 rounding of the SVD, not another base
_BASE_TOLERANCE = 1e-4


def plain_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: rank 2r at the same scale, default init (as PEFT)."""
    alpha_factor = math.sqrt(2.0) if config.rslora else 2.0
    return dataclasses.replace(
        config,
        init="kaiming",
        rank=2 * config.rank,
        alpha=alpha_factor * config.alpha,
        rank_pattern={k: 2 * r for k, r in config.rank_pattern.items()},
        alpha_pattern={k: alpha_factor * a for k, a in config.alpha_pattern.items()},
    )


def _rank_axis(delta_eq: str) -> tuple[int, int]:
    """The rank's axis in A and in B (counted from the end: stacked axes lead)."""
    a, b, kernel = _layout.delta_labels(delta_eq)
    rank = next(c for c in a if c not in kernel)
    return a.index(rank) - len(a), b.index(rank) - len(b)


def convert_to_lora(
    adapted: PyTree | nnx.Module, base: PyTree | nnx.Module, config: LoraConfig
) -> tuple[LoraConfig, PyTree | nnx.Module]:
    """Turns a PiSSA/OLoRA-initialised adapter into plain LoRA on the untouched base.

    ``scale·(A⊗B - A0⊗B0)`` is exactly the adapter's update of the untouched base weight;
    it is written as a rank-2r adapter ``A' = [A, A0]``, ``B' = [B; -B0]`` (PEFT's
    conversion, ``save_pretrained(path_initial_model_for_weight_conversion=...)``). The
    result loads anywhere plain LoRA does: `save_adapter`/`load_adapter` on the base as
    loaded, `export_peft` for PEFT with ``init_lora_weights=True``.

    Args:
      adapted: the trained linen tree (from ``lorafy`` with ``config``: residual bases), or
        the trained NNX module.
      base: the untouched base params it was made from (params collection or variables),
        or the untouched NNX module (e.g. an ``nnx.clone`` taken before `lorafy`).
      config: the `LoraConfig` it was adapted with (``init`` ``"pissa"``,
        ``"pissa_niter_<N>"`` or ``"olora"``).

    Returns:
      ``(plain_config, plain)``: rank doubled, alpha scaled to keep each scale (times 2,
      or sqrt(2) with rsLoRA), ``init="kaiming"``; linen: ``base`` with the converted
      adapters and the trained ``modules_to_save``/bias leaves of ``adapted``; NNX: a copy
      of ``adapted`` holding the untouched weights and the converted factors.

    Raises:
      ValueError: ``config`` does not initialise from the weights, or ``base`` is not the
        base ``adapted`` was initialised from (naming the layer).

    Example:
      >>> plain_cfg, plain = jaxlora.convert_to_lora(lora_params, base_params, cfg)
      >>> jaxlora.export_peft("out/peft", plain, plain_cfg, module_map=...)
    """
    if not _init_from_weights.is_from_weights(config.init):
        raise ValueError(
            f"convert_to_lora: config has init={config.init!r}; only adapters initialised "
            "from the base weights (init='pissa', 'pissa_niter_<N>', 'olora') need "
            "converting: save or export this one as it is."
        )
    if isinstance(adapted, nnx.Module):
        return plain_config(config), _convert_nnx(adapted, base, config.init)
    layers, leaves = _records.collect(adapted, who="convert_to_lora")
    _records.check_config([spec for spec, *_ in layers], config, who="convert_to_lora")
    _base_checks.plan(
        base,
        [spec for spec, *_ in layers],
        [spec for spec, _ in leaves],
        source="the adapted tree",
        who="convert_to_lora",
        allow_unmatched=False,
    )
    inner, adapted_inner = params_of(base)[0], params_of(adapted)[0]
    adapters = {}
    for spec, a, b, m in layers:
        weight = _records.unmark(subtree(inner, spec.module)[spec.weight_key])
        frozen = _records.unmark(subtree(adapted_inner, spec.module)[spec.weight_key])
        a2, b2 = _doubled(spec.path, weight, frozen, a, b, spec.delta_eq, spec.scale, config.init)
        # DoRA's norm is of W_res + s·A·B = W + s·A2·B2: the magnitude carries over as it is
        adapters[spec] = LoraAdapter(
            a=a2, b=b2, scale=spec.scale, delta_eq=spec.delta_eq, magnitude=m
        )
    trainable = {spec.path: value for spec, value in leaves}
    plain = _attach.attach(base, adapters, trainable)
    # trained token rows replace rows of the untouched base as they are: kept
    tokens = _token_records.collect(adapted, config, who="convert_to_lora")
    plain = _token_records.attach(plain, [s for s, _ in tokens], [v for _, v in tokens])
    return plain_config(config), plain


def _convert_nnx(adapted: nnx.Module, base: nnx.Module, init: str) -> nnx.Module:
    """A copy of ``adapted`` with ``base``'s weights and each adapter doubled (see above)."""
    out = nnx.clone(adapted)
    base_weights = {
        "/".join(str(p) for p in path): var
        for path, var in nnx.iter_graph(base)
        if isinstance(var, nnx.Param)
    }
    for name, weight, adapter in _nnx.adapted_weights(out):
        key = f"{name}/{_nnx_weight_key(adapter)}" if isinstance(adapter, LoraLayer) else name
        if key not in base_weights:
            raise ValueError(
                f"convert_to_lora: the base module has no weight {key!r} for adapter {name!r}; "
                "pass the untouched module the adapted one was made from (nnx.clone it "
                "before lorafy)."
            )
        untouched = base_weights[key][...]
        a, b = adapter.lora_a[...], adapter.lora_b[...]
        a2, b2 = _doubled(name, untouched, weight[...], a, b, adapter.delta_eq, adapter.scale, init)
        weight[...] = untouched
        adapter.lora_a = LoraParam(a2, **adapter.lora_a.get_metadata())
        adapter.lora_b = LoraParam(b2, **adapter.lora_b.get_metadata())
    return out


def _nnx_weight_key(layer: LoraLayer) -> str:
    return "embedding" if isinstance(layer.base, nnx.Embed) else "kernel"


def _doubled(
    name: str,
    weight: jax.Array,
    frozen: jax.Array,
    a: jax.Array,
    b: jax.Array,
    delta_eq: str,
    scale: float,
    init: str,
) -> tuple[jax.Array, jax.Array]:
    """``[A, A0]`` and ``[B; -B0]`` along the rank, A0 and B0 recomputed from the untouched
    ``weight``; raises unless its residual is the adapted ``frozen`` weight."""
    a_axis, b_axis = _rank_axis(delta_eq)
    rank = a.shape[a_axis]
    shardings = _sharding.factor_shardings(f"layer {name!r}", weight, delta_eq, rank, None)
    a0, b0, residual = _init_from_weights.initial_factors(
        name, weight, delta_eq, rank, scale, init, dtype=a.dtype, shardings=shardings
    )
    error = float(jnp.max(jnp.abs(residual.astype(jnp.float32) - frozen.astype(jnp.float32))))
    size = float(jnp.max(jnp.abs(frozen.astype(jnp.float32)))) or 1.0
    if error > _BASE_TOLERANCE * size:
        raise ValueError(
            f"convert_to_lora: layer {name!r}: the residual of the base given differs from "
            f"the adapted frozen weight by {error:.3g}; pass the untouched base the adapter "
            "was made from with lorafy (not the adapted tree, nor a merged one), and the "
            "config it was made with."
        )
    return jnp.concatenate([a, a0], axis=a_axis), jnp.concatenate([b, -b0], axis=b_axis)
