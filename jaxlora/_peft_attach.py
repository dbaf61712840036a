"""A matched PEFT file put into the model: a linen tree's adapters attached and placed like
the weights they adapt, or an NNX module adapted by `lorafy` and filled with the factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlora import _attach, _base_checks, _nnx, _peft_factors, _records, _sharding
from jaxlora._config import LoraConfig
from jaxlora._peft_files import Factors
from jaxlora._peft_flax import adapted, set_nnx
from jaxlora._peft_match import Plan
from jaxlora._tree import LoraAdapter, PyTree, subtree


@dataclasses.dataclass(frozen=True)
class Match:
    """What of a PEFT file matched the model: planned weights, their factors, the leaves."""

    plans: list[Plan]
    by_name: dict[str, Factors]
    peft_config: dict[str, Any]
    leaves: list[tuple[_records.LeafSpec, np.ndarray]]
    unmatched: list[str]

    def factors(self, plan: Plan, weights: Mapping[str, _peft_factors.Weight]) -> tuple:
        """jaxlora's ``(A, B, magnitude)`` of ``plan`` (see `_peft_factors.factors`)."""
        return _peft_factors.factors(plan, self.plans, weights, self.by_name, self.peft_config)


def into_nnx(
    model: nnx.Module,
    config: LoraConfig,
    match: Match,
    inputs: tuple,
    rngs: nnx.Rngs | None,
    sharding: jax.sharding.Sharding | None,
) -> nnx.Module:
    """An adapted copy of ``model`` holding the file's factors and leaves."""
    module = adapted_copy(model, config, inputs, rngs)
    weights = {
        layer.spec.path: _peft_factors.Weight(layer.spec.kernel_shape, layer.spec.delta_eq)
        for layer in adapted(module, who="import_peft").layers
    }
    arrays = {p.path: match.factors(p, weights) for p in match.plans}
    set_nnx(module, arrays, {spec.path: value for spec, value in match.leaves}, sharding)
    return module


def into_linen(
    params: PyTree,
    inner: Mapping[str, Any],
    match: Match,
    source: str,
    sharding: jax.sharding.Sharding | None,
    allow_unmatched: bool,
    init: str,
) -> PyTree:
    """``params`` with the file's adapters and leaves attached (placed like their weights);
    for a PiSSA/OLoRA adapter, the base weights it adapts become their residuals (as PEFT
    recomputes them when it loads one)."""
    weights = {p.path: _peft_factors.linen_weight(p, inner) for p in match.plans}
    adapters = {}
    for p in match.plans:
        a, b, m = match.factors(p, weights)
        weight = _records.unmark(subtree(inner, p.module)[p.weight_key])
        spec = _records.LayerSpec(
            path=p.path,
            weight_key=p.weight_key,
            kernel_shape=weights[p.path].shape,
            kernel_dtype=jax.numpy.dtype(weight.dtype).name,
            a_shape=a.shape,
            b_shape=b.shape,
            dtype=a.dtype.name,
            scale=p.scale,
            delta_eq=weights[p.path].delta_eq,
            magnitude_shape=None if m is None else m.shape,
        )
        adapters[spec] = (a, b, m)
    _base_checks.plan(
        params,
        list(adapters),
        [spec for spec, _ in match.leaves],
        source=source,
        who="import_peft",
        allow_unmatched=allow_unmatched,
        unmatched=match.unmatched,
    )
    params = _attach.to_residual(params, list(adapters), init)
    placed = {}
    for spec, (a, b, m) in adapters.items():
        a_sharding, b_sharding = _attach.layer_shardings(params, spec, sharding)
        if m is not None:
            m_sharding = _sharding.magnitude_sharding(b_sharding, b.ndim, spec.delta_eq)
            m = jax.device_put(m, m_sharding)
        placed[spec] = LoraAdapter(
            jax.device_put(a, a_sharding),
            jax.device_put(b, b_sharding),
            scale=spec.scale,
            delta_eq=spec.delta_eq,
            magnitude=m,
        )
    trainable = {
        spec.path: jax.device_put(value, _attach.leaf_sharding(params, spec, sharding))
        for spec, value in match.leaves
    }
    return _attach.attach(params, placed, trainable)


def adapted_copy(
    model: nnx.Module, config: LoraConfig, inputs: tuple, rngs: nnx.Rngs | None
) -> nnx.Module:
    """A copy of an NNX module adapted by `lorafy` with ``config`` (factors still random)."""
    module = nnx.clone(model)
    try:
        return _nnx.lorafy(module, config, *inputs, rngs=rngs or nnx.Rngs(0))
    except ValueError as e:
        if inputs:
            raise
        raise ValueError(
            f"import_peft: {e}\nThe file adapts weights jaxlora finds by tracing the module: "
            "pass example inputs of its __call__, import_peft(directory, module, *inputs, "
            "module_map=...)."
        ) from e
