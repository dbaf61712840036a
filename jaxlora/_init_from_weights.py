"""Adapters computed from the base weight (PEFT's PiSSA, OLoRA); the base becomes the residual.

PEFT's definitions, on each weight as torch's ``(out, in)`` matrix ``W`` (the input axes
and the output axes each flattened, per stacked layer or expert), in float32:

- ``"pissa"``: ``W = V S Uᵀ``; ``lora_A = √(S_r/s) U_rᵀ``, ``lora_B = V_r √(S_r/s)``
  (top-r singular triplets, ``s`` the LoRA scale);
- ``"pissa_niter_N"``: the same from a randomised SVD with N subspace iterations
  (``torch.svd_lowrank``'s algorithm; its random test matrix is seeded from the adapter's
  name, so the residual can be recomputed from the base, e.g. by `load_adapter`);
- ``"olora"``: ``W = Q R``; ``lora_A = R[:r]``, ``lora_B = Q[:, :r]``.

The frozen weight becomes ``W - s · lora_B lora_A`` (cast back to its dtype), so the adapted
model equals the base at initialisation. jaxlora's A is ``lora_Aᵀ`` and B is ``lora_Bᵀ``, in
the weight's own axes (see `jaxlora._layout`).
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _layout

PISSA, OLORA = "pissa", "olora"
_NITER = re.compile(r"pissa_niter_(\d+)")
# PEFT applies these inits to linear weights only: its Embedding keeps the default init
# and its Conv layers refuse them.
_WHY_NOT = {
    "embedding": "PEFT defines it for linear layers only (its Embedding keeps the default init)",
    "conv": "PEFT defines it for linear layers only (its Conv layers refuse it)",
}


def is_from_weights(init: str) -> bool:
    """Whether ``init`` computes the adapter from the base weight (and changes the base)."""
    return init in (PISSA, OLORA) or _NITER.fullmatch(init) is not None


def check_init(init: str) -> bool:
    """Whether ``init`` names one of these inits correctly (``pissa_niter_<N>``, N ≥ 1)."""
    match = _NITER.fullmatch(init)
    return init in (PISSA, OLORA) or (match is not None and int(match[1]) >= 1)


def refusal(init: str, *, embedding: bool, conv: bool) -> str:
    """Why ``init`` cannot initialise a weight of this kind ("" if it can)."""
    if not is_from_weights(init):
        return ""
    return _WHY_NOT["embedding"] if embedding else _WHY_NOT["conv"] if conv else ""


def check_layers(init: str, layers: Sequence[tuple[str, bool, bool]], *, who: str) -> None:
    """Raises naming the first ``(name, embedding, conv)`` layer ``init`` cannot initialise."""
    for name, embedding, conv in layers:
        why = refusal(init, embedding=embedding, conv=conv)
        if why:
            raise ValueError(
                f"{who}: init={init!r} cannot initialise layer {name!r}: {why}. Exclude it "
                "from the targets (exclude=[...]), or use init='kaiming'."
            )


def _axes(delta_eq: str) -> tuple[str, str, str, str]:
    """``(stack, ins, outs, kernel)`` labels of a ``delta_eq`` (``...`` dropped)."""
    a, b, kernel = _layout.delta_labels(delta_eq)
    rank = next(c for c in a if c not in kernel)
    stack = "".join(c for c in a if c in b and c != rank)
    ins = "".join(c for c in a if c not in stack and c != rank)
    outs = "".join(c for c in b if c not in stack and c != rank)
    return stack, ins, outs, kernel


def _lowrank_basis(m: jax.Array, rank: int, niter: int, key: jax.Array) -> jax.Array:
    """``torch.svd_lowrank``'s ``get_approximate_basis``: an orthonormal ``(..., out, r)``."""
    test = jax.random.normal(key, (*m.shape[:-2], m.shape[-1], rank), m.dtype)
    q = jnp.linalg.qr(m @ test)[0]
    for _ in range(niter):
        q = jnp.linalg.qr(jnp.swapaxes(m, -1, -2) @ q)[0]
        q = jnp.linalg.qr(m @ q)[0]
    return q


def _factors(m: jax.Array, rank: int, scale: float, init: str, key: jax.Array):
    """PEFT's ``(lora_A (..., r, in), lora_B (..., out, r))`` of the ``(..., out, in)`` ``m``."""
    if init == OLORA:
        q, r = jnp.linalg.qr(m)
        return r[..., :rank, :], q[..., :, :rank]
    niter = _NITER.fullmatch(init)
    if niter is None:
        v, s, uh = jnp.linalg.svd(m, full_matrices=False)
    else:
        q = _lowrank_basis(m, rank, int(niter[1]), key)
        u, s, uh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ m, full_matrices=False)
        v = q @ u
    root = jnp.sqrt(s[..., :rank] / scale)
    return root[..., :, None] * uh[..., :rank, :], v[..., :, :rank] * root[..., None, :]


def decompose(
    weight: jax.Array,
    delta_eq: str,
    rank: int,
    scale: float,
    init: str,
    *,
    dtype: Any,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A, B, residual)`` of one weight, as PEFT's ``pissa_init``/``olora_init`` compute them.

    Args:
      weight: the base weight ``(*lead, *kernel)`` (leading stacked-layer axes included).
      delta_eq: the adapter's ``delta_eq`` (its A and B labels say which axes are which).
      rank: the adapter rank r.
      scale: the LoRA scale s.
      init: ``"pissa"``, ``"pissa_niter_<N>"`` or ``"olora"``.
      dtype: the adapter dtype.
      key: PRNG key for the randomised SVD (unused otherwise).

    Returns:
      A ``(*lead, *stack, *in, r)`` and B ``(*lead, *stack, r, *out)`` in ``dtype``, and the
      residual ``weight - s · A ⊗ B`` in ``weight``'s dtype and shape.
    """
    stack, ins, outs, kernel = _axes(delta_eq)
    size = dict(zip(kernel, weight.shape[weight.ndim - len(kernel) :], strict=True))
    lead = weight.shape[: weight.ndim - len(kernel)]
    batch = (*lead, *(size[c] for c in stack))
    m = jnp.einsum(f"...{kernel}->...{stack}{outs}{ins}", weight.astype(jnp.float32))
    m = m.reshape(*batch, -1, int(np.prod([size[c] for c in ins])))
    lora_a, lora_b = _factors(m, rank, scale, init, key)
    a = jnp.swapaxes(lora_a, -1, -2).reshape(*batch, *(size[c] for c in ins), rank)
    b = jnp.swapaxes(lora_b, -1, -2).reshape(*batch, rank, *(size[c] for c in outs))
    # the residual subtracts exactly what the adapter adds back (merge's arithmetic)
    a, b = a.astype(dtype), b.astype(dtype)
    delta = _layout.delta_weight(a, b, delta_eq, scale)
    return a, b, (weight.astype(jnp.float32) - delta).astype(weight.dtype)


@functools.lru_cache(maxsize=256)
def _placed(delta_eq, rank, scale, init, dtype, out_shardings):
    fn = functools.partial(decompose, delta_eq=delta_eq, rank=rank, scale=scale, init=init)
    return jax.jit(lambda w, key: fn(w, dtype=dtype, key=key), out_shardings=out_shardings)


def initial_factors(
    name: str,
    weight: jax.Array,
    delta_eq: str,
    rank: int,
    scale: float,
    init: str,
    *,
    dtype: Any,
    shardings: tuple[Any, Any] | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`decompose` one weight where it lives: A and B land with ``shardings`` (derived from
    the weight's, see `jaxlora._sharding.factor_shardings`) and the residual with the weight's.

    Args:
      name: the adapter's name (seeds the randomised SVD of ``pissa_niter_<N>``).
      weight: the base weight.
      delta_eq, rank, scale, init, dtype: as for `decompose`.
      shardings: ``(a_sharding, b_sharding)``, or None for an unsharded weight.

    Returns:
      ``(A, B, residual)``.
    """
    out_shardings = None if shardings is None else (*shardings, weight.sharding)
    key = jax.random.fold_in(jax.random.key(0), zlib.crc32(name.encode()))
    run = _placed(delta_eq, rank, float(scale), init, jnp.dtype(dtype), out_shardings)
    return run(weight, key)
