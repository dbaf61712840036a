"""Content hashes of arrays, computed with JAX where the arrays live (sharded or not).

`content_hash` reads every bit of an array (for the integrity of saved adapters);
`kernel_fingerprint` reads a fixed strided sample of a base kernel rounded to bfloat16
(to recognise the base an adapter was trained on, cheaply, whatever its dtype among
float32 and bfloat16). Both are 8 hex digits: a sum over the elements of a bijective mix
of (bits, position), so changing any one element always changes the hash, and the value
is the same for any sharding of the array.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._quantize import is_quantized

_SAMPLE = 1 << 16  # at most this many elements of a kernel are read for its fingerprint
_GOLDEN = 0x9E3779B9


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _hash_bits(bits: jax.Array) -> jax.Array:
    """A uint32 hash of a uint32 array, from each element's bits and row-major position."""
    strides = [math.prod(bits.shape[k + 1 :]) for k in range(bits.ndim)]
    position = sum(
        (
            jax.lax.broadcasted_iota(jnp.uint32, bits.shape, k) * jnp.uint32(stride % 2**32)
            for k, stride in enumerate(strides)
        ),
        start=jnp.zeros(bits.shape, jnp.uint32),
    )
    terms = _mix(bits + _mix(position * jnp.uint32(_GOLDEN) + jnp.uint32(1)))
    return jnp.sum(terms, dtype=jnp.uint32)


def _as_uint32(x: Any) -> jax.Array:
    """The bits of ``x`` as uint32 (8-byte elements become two, smaller ones are widened)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)


def _hex(h: jax.Array) -> str:
    return f"{int(np.asarray(jax.device_get(h))):08x}"


def content_hash(x: Any) -> str:
    """A hash of every bit of ``x`` (8 hex digits), the same for any sharding of it.

    Args:
      x: a JAX or numpy array.

    Returns:
      The hash; one changed element always changes it.
    """
    return _hex(_hash_bits(_as_uint32(x)))


@functools.partial(jax.jit, static_argnums=1)
def _sample_hash(kernel: jax.Array, steps: tuple[int, ...]) -> jax.Array:
    sample = jax.lax.slice(kernel, (0,) * kernel.ndim, kernel.shape, steps)
    bits = jax.lax.bitcast_convert_type(sample.astype(jnp.bfloat16), jnp.uint16)
    return _hash_bits(bits.astype(jnp.uint32))


def storage(fingerprint: str) -> str:
    """How the weight a fingerprint was taken of is stored: ``"float"``, ``"nf4"``, ``"int8"``."""
    return fingerprint.partition(":")[0] if ":" in fingerprint else "float"


def kernel_fingerprint(kernel: Any) -> str:
    """A cheap fingerprint of a base kernel's content (8 hex digits).

    Reads at most ``2**16`` elements, evenly strided along every axis, rounded to
    bfloat16, so a float32 kernel and its bfloat16 cast agree; computed where the kernel
    lives (sharded or not) and the same for any sharding. A weight stored quantized is
    fingerprinted by its codes, prefixed with its format (``"nf4:1a2b3c4d"``): it can be
    compared with weights stored the same way only (see `storage`).

    Args:
      kernel: the base weight, any shape, or a `QuantizedArray`.

    Returns:
      The fingerprint.
    """
    if is_quantized(kernel):
        return f"{kernel.format}:{kernel_fingerprint(kernel.codes)}"
    per_axis = max(1, math.floor(_SAMPLE ** (1 / max(kernel.ndim, 1))))
    steps = tuple(max(1, -(-n // per_axis)) for n in kernel.shape)
    return _hex(_sample_hash(kernel, steps))
