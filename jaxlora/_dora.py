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
import string
from collections.abc import Sequence
from typing import NamedTuple

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


def check_layers(
    use_dora: bool,
    layers: list[tuple[str, bool, bool]],
    *,
    who: str,
    quantized: Sequence[str] = (),
) -> None:
    """Raises naming the first ``(name, conv, experts)`` weight DoRA cannot adapt, or one
    stored quantized (``quantized``: names of weights already quantized in the params)."""
    if not use_dora:
        return
    for name, conv, experts in layers:
        why = refusal(conv=conv, experts=experts) or (
            "it is stored quantized (e.g. GGUF blocks or jaxlora.quantize), and DoRA's weight "
            "norm needs the dense weight in every step"
            if name in quantized
            else ""
        )
        if why:
            raise ValueError(
                f"{who}: use_dora=True cannot adapt weight {name!r}: {why}. Exclude it from "
                "the targets (exclude=[...]), or use plain LoRA (use_dora=False)."
            )


class _Labels(NamedTuple):
    """The einsum labels of an adapter's ``delta_eq`` (``...`` dropped)."""

    a: str
    b: str
    kernel: str
    rank: str
    ins: str  # the weight's input axes: A's side only
    mag: str  # the magnitude's axes: B's without the rank

    @property
    def kept(self) -> str:
        """The kernel's axes that are not inputs, in kernel order."""
        return "".join(c for c in self.kernel if c not in self.ins)


def _labels(delta_eq: str) -> _Labels:
    a, b, kernel = _layout.delta_labels(delta_eq)
    rank = next(c for c in a if c in b and c not in kernel)
    ins = "".join(c for c in a if c not in b)
    return _Labels(a, b, kernel, rank, ins, b.replace(rank, ""))


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
    lab = _labels(delta_eq)
    other = next(c for c in string.ascii_letters if c not in delta_eq)  # a second rank label
    a2, b2 = lab.a.replace(lab.rank, other), lab.b.replace(lab.rank, other)
    batch = "".join(c for c in lab.b if c in lab.a and c != lab.rank)
    w, a, b = (x.astype(jnp.float32) for x in (w, a, b))
    einsum = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)
    n_stack = w.ndim - len(lab.kernel)
    squares = jnp.sum(w * w, axis=tuple(n_stack + lab.kernel.index(c) for c in lab.ins))
    squares = jnp.einsum(f"...{lab.kept}->...{lab.mag}", squares)  # a transpose
    a_w = einsum(f"...{lab.a},...{lab.kernel}->...{lab.b}", a, w)  # Aᵀ W, shaped like B
    cross = jnp.sum(a_w * b, axis=n_stack + lab.b.index(lab.rank))
    gram = einsum(f"...{lab.a},...{a2}->...{batch}{lab.rank}{other}", a, a)  # Aᵀ A
    quad = einsum(f"...{lab.b},...{batch}{lab.rank}{other},...{b2}->...{lab.mag}", b, gram, b)
    return jnp.sqrt(jnp.maximum(squares + 2 * scale * cross + scale * scale * quad, 0.0))


def initial_magnitude(w, a, b, delta_eq: str, scale: float, dtype) -> jax.Array:
    """DoRA's magnitude at initialisation: the norm itself (see `weight_norm`)."""
    return weight_norm(w, a, b, delta_eq, scale).astype(dtype)


def output_scale(w, a, b, magnitude, delta_eq: str, scale: float) -> jax.Array:
    """``m / ‖W + scale · A ⊗ B‖``, the norm a constant in the backward pass (PEFT's
    ``weight_norm.detach()``), laid out like B with a rank axis of size 1."""
    norm = lax.stop_gradient(weight_norm(w, a, b, delta_eq, scale))
    g = magnitude.astype(jnp.float32) / norm
    lab = _labels(delta_eq)
    return jnp.expand_dims(g, g.ndim - len(lab.mag) + lab.b.index(lab.rank))


def _on_kernel(g: jax.Array, delta_eq: str) -> jax.Array:
    """``g`` (magnitude-shaped) broadcastable against the kernel ``(*stack, *kernel)``."""
    lab = _labels(delta_eq)
    g = jnp.einsum(f"...{lab.mag}->...{lab.kept}", g)  # a transpose
    n_stack = g.ndim - len(lab.kept)
    return jnp.expand_dims(g, tuple(n_stack + lab.kernel.index(c) for c in lab.ins))


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
