"""A quantized frozen base (QLoRA): which weights `lorafy` stores quantized, and storing them.

Every weight ``"all-linear"`` selects is stored in `LoraConfig.quantize`'s format, adapted
or not, less ``quantize_exclude``; nf4 blocks run along the weight's last input axis, as
discovery reads it from the traced program. Each weight is quantized by its own jitted
call where it lives, so a sharded weight's codes and scales come out sharded like it. How
the model then reads a quantized weight is `_lazy_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax.core import meta

from jaxlora import _quantize, _sharding
from jaxlora._config import LoraConfig, format_paths, path_matches
from jaxlora._quantize import QuantizedArray, is_quantized
from jaxlora._targeting import IN, Candidate
from jaxlora._tree import rebox, replace_at, subtree


def chosen(config: LoraConfig, found: Sequence[Candidate]) -> list[tuple[str, str, tuple]]:
    """``(module, weight, contracted axes)`` of each weight ``config`` stores quantized: every
    weight ``"all-linear"`` takes (adapted or not), less ``quantize_exclude`` and the
    ``modules_to_save`` (they train in full)."""
    if config.quantize is None:
        return []
    for pattern in config.quantize_exclude:
        if not any(c.matches(pattern) for c in found):
            listing = format_paths(sorted(c.name for c in found))
            raise ValueError(
                f"lorafy: quantize_exclude pattern {pattern!r} matches no weight. Weights:\n"
                f"{listing}"
            )
    return [
        (c.module, c.weight, tuple(d for d, role in enumerate(c.roles) if role == IN))
        for c in found
        if c.roles is not None
        and not c.embedding
        and not any(c.matches(p) for p in config.quantize_exclude)
        and not any(_within(c.module, p) for p in config.modules_to_save)
    ]


def _within(module: str, pattern: str) -> bool:
    """Whether ``pattern`` names ``module`` or a module holding it."""
    parts = module.split("/")
    return any(path_matches("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1))


def quantize_weights(
    params: Mapping[str, Any],
    chosen: Sequence[tuple[str, str, tuple[int, ...]]],
    format: str,
    *,
    double_quant: bool,
) -> dict[str, Any]:
    """``params`` with each chosen weight stored quantized (one jitted call per weight).

    Args:
      params: the params tree (module dicts).
      chosen: ``(module path, weight key, contracted axes)`` of each weight to quantize.
      format: ``"nf4"``, ``"int8"`` or ``"fp8"``.
      double_quant: nf4: quantize the block scales too.

    Returns:
      The new tree; weights already quantized are kept as they are.
    """
    for module, weight, contracted in chosen:
        stored = subtree(params, module)[weight]
        w = meta.unbox(stored)
        if is_quantized(w):
            continue
        name = f"{module}/{weight}" if module else weight
        q = quantize_array(w, format, contracted, double_quant=double_quant, name=name)

        def put(layer, weight=weight, stored=stored, q=q):
            return {**layer, weight: rebox(stored, q)}

        params = replace_at(params, module, put)
    return params


def quantize_array(
    w: jax.Array, format: str, contracted: tuple[int, ...], *, double_quant: bool, name: str
) -> QuantizedArray:
    """One weight quantized where it lives: a sharded weight's codes and scales keep its spec."""

    def fn(x, out_shardings=None):
        return _quantize.quantize(
            x, format, contracted, double_quant=double_quant, name=name, out_shardings=out_shardings
        )

    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return fn(w)
    spec = (*sharding.spec, *(None,) * (w.ndim - len(sharding.spec)))
    mesh = sharding.mesh
    shardings = jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, _sharding.divisible_spec(x.shape, spec, mesh)),
        jax.eval_shape(fn, w),
    )
    return fn(w, shardings)
