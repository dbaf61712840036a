"""GGUF's own quantized blocks (llama.cpp's ``Q4_1`` and ``Q8_0``), kept as a frozen weight.

A GGUF tensor is stored row by row, each row a run of blocks of 32 consecutive values:

- ``Q4_1`` (20 bytes a block): fp16 scale ``d``, fp16 minimum ``m``, then 16 bytes whose
  low nibbles are the block's values 0..15 and high nibbles its values 16..31; a value is
  ``d · q + m``. 5 bits per weight.
- ``Q8_0`` (34 bytes a block): fp16 scale ``d``, then 32 int8 ``q``; a value is ``d · q``.
  8.5 bits per weight.

`read` splits a tensor's bytes into arrays of the weight's rank (codes along the block
axis, one fp16 scale and minimum per block), which `jaxlora.QuantizedArray` holds as they
are: the bytes of the codes are the file's, only the axes may be swapped. `dequantize`
computes what ``gguf.quants.dequantize`` (the gguf package's reference) computes, in the
same float32 operations, so the values are the same bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Q4_1, Q8_0 = "q4_1", "q8_0"
FORMATS = (Q4_1, Q8_0)
BLOCK = 32  # values per block, both formats
_BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}


def format_of(tensor_type: Any) -> str | None:
    """The format name of a GGML tensor type (``gguf.GGMLQuantizationType`` or its name),
    or None if its blocks are not one of `FORMATS`."""
    name = str(getattr(tensor_type, "name", tensor_type)).lower()
    return name if name in FORMATS else None


def read(data: np.ndarray, format: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A GGUF tensor's bytes as ``(codes, scales, offsets)`` with blocks along the last axis.

    Args:
      data: uint8 ``(*rows, row_bytes)``, as ``gguf.GGUFReader`` gives a tensor's ``data``.
      format: ``"q4_1"`` or ``"q8_0"``.

    Returns:
      codes: q4_1: uint8 ``(*rows, cols / 2)``, the file's bytes; q8_0: int8
      ``(*rows, cols)``. scales: float16 ``(*rows, cols / 32)``. offsets: q4_1's minima,
      float16 like the scales; None for q8_0.
    """
    size = _BLOCK_BYTES[format]
    if data.dtype != np.uint8 or data.ndim < 2 or data.shape[-1] % size:
        raise ValueError(
            f"GGUF {format} data must be uint8 (rows, row_bytes) with row_bytes a multiple of "
            f"{size} (one block of {BLOCK} values), as gguf.GGUFReader gives a tensor's "
            f"`data`; got {data.dtype} {data.shape}."
        )
    blocks = data.reshape(*data.shape[:-1], data.shape[-1] // size, size)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if format == Q8_0:
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        return codes.reshape(*data.shape[:-1], -1), scales, None
    offsets = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    return blocks[..., 4:].reshape(*data.shape[:-1], -1), scales, offsets


def _blocked(x: jax.Array, axis: int, block: int) -> jax.Array:
    return x.reshape(*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1 :])


def dequantize(
    format: str, codes: jax.Array, scales: jax.Array, offsets: jax.Array | None, axis: int
) -> jax.Array:
    """The float32 values of blocks laid out by `read` (their block axis at ``axis``).

    Args:
      format: ``"q4_1"`` or ``"q8_0"``.
      codes, scales, offsets: from `read` (axes possibly swapped, block axis ``axis``).
      axis: the block axis.

    Returns:
      float32, the codes' shape with ``axis`` of the dense length (q4_1: twice the codes').
    """
    d = jnp.expand_dims(scales.astype(jnp.float32), axis + 1)
    if format == Q8_0:
        q = _blocked(codes, axis, BLOCK).astype(jnp.float32)
        w = q * d
    else:
        packed = _blocked(codes, axis, BLOCK // 2)
        q = jnp.concatenate([packed & 0xF, packed >> 4], axis=axis + 1).astype(jnp.float32)
        w = d * q + jnp.expand_dims(offsets.astype(jnp.float32), axis + 1)
    return w.reshape(*w.shape[:axis], -1, *w.shape[axis + 2 :])
