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
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import _attach, _init_from_weights, _layout, _sharding
from jaxlora._config import LoraConfig
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


def convert_to_lora(adapted: PyTree, base: PyTree, config: LoraConfig) -> tuple[LoraConfig, PyTree]:
    """Turns a PiSSA/OLoRA-initialised adapter into plain LoRA on the untouched base.

    ``scale·(A⊗B - A0⊗B0)`` is exactly the adapter's update of the untouched base weight;
    it is written as a rank-2r adapter ``A' = [A, A0]``, ``B' = [B; -B0]`` (PEFT's
    conversion, ``save_pretrained(path_initial_model_for_weight_conversion=...)``). The
    result loads anywhere plain LoRA does: `save_adapter`/`load_adapter` on the base as
    loaded, `export_peft` for PEFT with ``init_lora_weights=True``.

    Args:
      adapted: the trained linen tree (from ``lorafy`` with ``config``: residual bases).
      base: the untouched base params it was made from (params collection or variables).
      config: the `LoraConfig` it was adapted with (``init`` ``"pissa"``,
        ``"pissa_niter_<N>"`` or ``"olora"``).

    Returns:
      ``(plain_config, plain_params)``: rank doubled, alpha scaled to keep each scale
      (times 2, or sqrt(2) with rsLoRA), ``init="kaiming"``; ``base`` with the converted adapters
      and the trained ``modules_to_save``/bias leaves of ``adapted``.

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
    layers, leaves = _attach.collect(adapted, who="convert_to_lora")
    _attach.check_config([spec for spec, _, _ in layers], config, who="convert_to_lora")
    _attach.plan(
        base,
        [s for s, _, _ in layers],
        [s for s, _ in leaves],
        source="the adapted tree",
        who="convert_to_lora",
        allow_unmatched=False,
    )
    inner = params_of(base)[0]
    adapters = {}
    for spec, a, b in layers:
        weight = _attach.unmark(subtree(inner, spec.module)[spec.weight_key])
        shardings = _sharding.factor_shardings(
            f"layer {spec.path!r}", weight, spec.delta_eq, spec.rank, None
        )
        a0, b0, residual = _init_from_weights.initial_factors(
            spec.path,
            weight,
            spec.delta_eq,
            spec.rank,
            spec.scale,
            config.init,
            dtype=spec.dtype,
            shardings=shardings,
        )
        _check_base(spec, residual, _attach.unmark(_adapted_weight(adapted, spec)))
        a_axis, b_axis = _rank_axis(spec.delta_eq)
        adapters[spec] = LoraAdapter(
            a=jnp.concatenate([a, a0.astype(a.dtype)], axis=a_axis),
            b=jnp.concatenate([b, -b0.astype(b.dtype)], axis=b_axis),
            scale=spec.scale,
            delta_eq=spec.delta_eq,
        )
    trainable = {spec.path: value for spec, value in leaves}
    return plain_config(config), _attach.attach(base, adapters, trainable)


def _adapted_weight(adapted: PyTree, spec: _attach.LayerSpec) -> Any:
    return subtree(params_of(adapted)[0], spec.module)[spec.weight_key]


def _check_base(spec: _attach.LayerSpec, residual: jax.Array, adapted_weight: jax.Array) -> None:
    """Raises unless the residual of ``base`` is the adapted tree's frozen weight."""
    error = float(
        jnp.max(jnp.abs(residual.astype(jnp.float32) - adapted_weight.astype(jnp.float32)))
    )
    size = float(jnp.max(jnp.abs(adapted_weight.astype(jnp.float32)))) or 1.0
    if error > _BASE_TOLERANCE * size:
        raise ValueError(
            f"convert_to_lora: layer {spec.path!r}: the residual of the base given differs "
            f"from the adapted tree's frozen {spec.weight_key} by {error:.3g}; pass the "
            "untouched base params the adapter was made from with lorafy (not the adapted "
            "tree, nor a merged one), and the config it was made with."
        )
