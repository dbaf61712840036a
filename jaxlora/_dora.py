"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): the magnitude and the weight's norm.

DoRA writes an adapted weight as a magnitude times a direction,
``W' = m · (W + s·A⊗B) / ‖W + s·A⊗B‖``, the norm taken over the weight's input axes for
each output feature (a column of a ``(in, out)`` kernel, a row of torch's ``(out, in)``;
for an embedding table, over the vocabulary for each feature, as PEFT's
``DoraEmbeddingLayer``). The magnitude ``m`` trains with A and B; it starts as that norm,
so the adapted model equals the base model at initialisation. As in PEFT (and section 4.3
of the DoRA paper) the norm is a constant in the backward pass: ``lax.stop_gradient``
where PEFT calls ``.detach()``, so the frozen weight gets no gradient from it.

``m`` is shaped like B without its rank axis, ``(*stack, *b_shape minus r)`` (``(out,)``
for a Dense kernel, as PEFT's ``lora_magnitude_vector``). Where the rewrite applies it
(`_uses`), it travels as ``g = m / ‖·‖`` laid out like B with a rank axis of size 1, so
slices and scan steps restrict it exactly as they restrict B.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxlora import _layout

# Why DoRA is refused on a weight; the checks read the layer's uses (see `refusal`).
_WHY_NOT = {
    "conv": (
        "it is a convolution kernel; PEFT has DoRA for Conv layers but jaxlora does not build it"
    ),
    "experts": (
        "it is an expert weight used by ragged_dot; PEFT does not define DoRA for expert "
        "parameters (target_parameters)"
    ),
}


def refusal(*, conv: bool, experts: bool) -> str:
    """Why DoRA cannot adapt a weight of this kind ("" if it can)."""
    return _WHY_NOT["conv"] if conv else _WHY_NOT["experts"] if experts else ""


def check_layers(use_dora: bool, layers: list[tuple[str, bool, bool]], *, who: str) -> None:
    """Raises naming the first ``(name, conv, experts)`` weight DoRA cannot adapt."""
    if not use_dora:
        return
    for name, conv, experts in layers:
        why = refusal(conv=conv, experts=experts)
        if why:
            raise ValueError(
                f"{who}: use_dora=True cannot adapt weight {name!r}: {why}. Exclude it from "
                "the targets (exclude=[...]), or use plain LoRA (use_dora=False)."
            )


def _labels(delta_eq: str) -> tuple[str, str, str, int]:
    """Kernel labels, input labels, magnitude labels (B's without the rank) and the rank's
    position in B, of a ``delta_eq`` (``...`` dropped)."""
    a, b, kernel = _layout.delta_labels(delta_eq)
    rank = next(c for c in a if c in b and c not in kernel)
    ins = "".join(c for c in a if c not in b)
    return kernel, ins, b.replace(rank, ""), b.index(rank)


def weight_norm(w: jax.Array, a: jax.Array, b: jax.Array, delta_eq: str, scale: float):
    """``‖W + scale · A ⊗ B‖`` over the weight's input axes, in float32.

    Expanded as ``‖W‖² + 2·scale·⟨W, A ⊗ B⟩ + scale²·‖A ⊗ B‖²`` per output feature, so that
    no weight-sized ΔW is formed in the step: the terms cost one pass over W (its squares
    and ``Aᵀ W``, rank-sized) and rank-sized products, all at the highest matmul precision.

    Args:
      w: the weight ``(*stack, *kernel_shape)``.
      a, b: the adapter's factors.
      delta_eq: the adapter's ``delta_eq``.
      scale: the LoRA scale.

    Returns:
      ``(*stack, *magnitude)``: one norm per output feature (see the module docstring).
    """
    kernel, ins, mag, _ = _labels(delta_eq)
    a_lab, b_lab, _ = _layout.delta_labels(delta_eq)
    rank = next(c for c in a_lab if c in b_lab and c not in kernel)
    other = next(
        c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in delta_eq
    )
    batch = "".join(c for c in b_lab if c in a_lab and c != rank)
    w, a, b = (x.astype(jnp.float32) for x in (w, a, b))
    einsum = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)
    n_stack = w.ndim - len(kernel)
    squares = jnp.sum(w * w, axis=tuple(n_stack + kernel.index(c) for c in ins))
    kept = "".join(c for c in kernel if c not in ins)
    squares = jnp.einsum(f"...{kept}->...{mag}", squares)
    a_w = einsum(f"...{a_lab},...{kernel}->...{b_lab}", a, w)  # Aᵀ W, shaped like B
    cross = jnp.sum(a_w * b, axis=w.ndim - len(kernel) + b_lab.index(rank))
    gram = einsum(f"...{a_lab},...{a_lab.replace(rank, other)}->...{batch}{rank}{other}", a, a)
    quad = einsum(
        f"...{b_lab},...{batch}{rank}{other},...{b_lab.replace(rank, other)}->...{mag}", b, gram, b
    )
    return jnp.sqrt(jnp.maximum(squares + 2 * scale * cross + scale * scale * quad, 0.0))


def initial_magnitude(w, a, b, delta_eq: str, scale: float, dtype) -> jax.Array:
    """DoRA's magnitude at initialisation: the norm itself (see `weight_norm`)."""
    return weight_norm(w, a, b, delta_eq, scale).astype(dtype)


def output_scale(w, a, b, magnitude, delta_eq: str, scale: float) -> jax.Array:
    """``m / ‖W + scale · A ⊗ B‖``, the norm a constant in the backward pass (PEFT's
    ``weight_norm.detach()``), laid out like B with a rank axis of size 1."""
    norm = lax.stop_gradient(weight_norm(w, a, b, delta_eq, scale))
    g = magnitude.astype(jnp.float32) / norm
    _, _, mag, rank_at = _labels(delta_eq)
    return jnp.expand_dims(g, g.ndim - len(mag) + rank_at)


def _on_kernel(g: jax.Array, delta_eq: str) -> jax.Array:
    """``g`` (magnitude-shaped) broadcastable against the kernel ``(*stack, *kernel)``."""
    kernel, ins, mag, _ = _labels(delta_eq)
    kept = "".join(c for c in kernel if c not in ins)
    g = jnp.einsum(f"...{mag}->...{kept}", g)  # a transpose
    n_stack = g.ndim - len(kept)
    axes = tuple(n_stack + kernel.index(c) for c in ins)
    return jnp.expand_dims(g, axes)


def merged_weight(w, a, b, magnitude, delta_eq: str, scale: float) -> jax.Array:
    """``m / ‖W + s·A⊗B‖ · (W + s·A⊗B)`` (PEFT's DoRA merge), in float32."""
    g = magnitude.astype(jnp.float32) / weight_norm(w, a, b, delta_eq, scale)
    full = w.astype(jnp.float32) + _layout.delta_weight(a, b, delta_eq, scale)
    return _on_kernel(g, delta_eq) * full


def unmerged_weight(merged, base, a, b, magnitude, delta_eq: str, scale: float) -> jax.Array:
    """The inverse of `merged_weight`: ``merged / (m / ‖base + s·A⊗B‖) - s·A⊗B`` in float32.

    PEFT keeps the norm from merge time; here it is recomputed from ``base``, the weight
    the adapter was merged into (the adapted tree's).
    """
    g = magnitude.astype(jnp.float32) / weight_norm(base, a, b, delta_eq, scale)
    delta = _layout.delta_weight(a, b, delta_eq, scale)
    return merged.astype(jnp.float32) / _on_kernel(g, delta_eq) - delta
