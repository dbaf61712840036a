"""Quantized storage of a frozen weight: NF4 (QLoRA's 4-bit NormalFloat), int8, fp8, and a
GGUF file's own blocks.

A `QuantizedArray` stands in for a dense weight of ``shape``: every array it holds has the
weight's rank, so the weight's `PartitionSpec` shards its codes and scales too (the
block axis of NF4 is one of the weight's input axes; item for item the codes of a shard
are those of the same slice of the weight).

- ``nf4``: blocks of 64 consecutive elements along one input axis share an absmax scale;
  each element is the index of the nearest of QLoRA's 16 NormalFloat values to
  ``w / absmax`` — the table and rounding of bitsandbytes, so the codes of a weight
  ``(in, out)`` are bitsandbytes' codes of its PyTorch weight ``(out, in)``. Two codes
  share a byte (first in the high nibble), along the block axis. With double
  quantization the float32 absmax of each block is stored as a uint8 code on a linear
  grid between the min and max of its group of up to 256 blocks (along the scales' last
  axis): 4.13 bits per weight instead of 4.5.
- ``int8``: one absmax scale per output channel (reduced over the input axes),
  ``round(127 · w / absmax)``.
- ``fp8``: float8 e4m3 (``float8_e4m3fn``) values of ``448 · w / absmax``, one absmax per
  output channel as int8 has it.
- ``q4_1``, ``q8_0``: llama.cpp's blocks of 32 read from a GGUF file as they are
  (`from_gguf`; the layouts are `_gguf_blocks`'): no dense copy of the weight is made to
  store them.

Why not Qwix's ``QArray`` (``qwix._src.core.qarray``), read for this: its NF4 values are a
``jnp.uint4`` array of the weight's shape, which XLA:CPU stores one per byte (8 bits per
weight here); its scales are kept in the dequantized dtype and it has no double
quantization of them. Its NF4 table and nearest-value rounding are those used here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _gguf_blocks

NF4, INT8, FP8 = "nf4", "int8", "fp8"
FORMATS = (NF4, INT8, FP8)  # what `quantize` computes; `from_gguf` reads _gguf_blocks.FORMATS
NF4_BLOCK = 64  # QLoRA's block of weights per absmax
DQ_GROUP = 256  # QLoRA's block of absmax values per second-level scale

# QLoRA, Appendix E / bitsandbytes' NF4 code book: index i holds the value of code i.
NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_NF4_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2
NF4_MAX_STEP = float(np.max(np.diff(NF4_VALUES)) / 2)  # worst rounding, in units of absmax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A frozen weight stored quantized; `dequantize` gives the dense weight back.

    Attributes:
      codes: nf4, q4_1: uint8, the weight's shape with the block axis halved (two codes a
        byte); int8, q8_0: int8, the weight's shape; fp8: float8_e4m3fn, the weight's shape.
      scales: one per block (nf4: block axis ``/ 64``; q4_1, q8_0: ``/ 32``, float16) or
        per output channel (int8, fp8: input axes 1): float32, or uint8 codes with double
        quantization.
      scale_min, scale_step: double quantization: the float32 grid of each group of
        scales (the scales' last axis ``/ group``); None otherwise.
      format: ``"nf4"``, ``"int8"``, ``"fp8"``, ``"q4_1"`` or ``"q8_0"``; static.
      shape: the dense weight's shape; static.
      dtype: the dense weight's dtype name (what `dequantize` returns); static.
      axis: nf4, q4_1, q8_0: the block axis (an input axis of the weight); int8, fp8: -1;
        static.
      offsets: q4_1: each block's minimum (float16, like ``scales``); None otherwise.
    """

    codes: jax.Array
    scales: jax.Array
    scale_min: jax.Array | None
    scale_step: jax.Array | None
    format: str = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: str = dataclasses.field(metadata={"static": True})
    axis: int = dataclasses.field(metadata={"static": True})
    offsets: jax.Array | None = None

    @property
    def ndim(self) -> int:
        """Rank of the dense weight."""
        return len(self.shape)

    @property
    def sharding(self) -> Any:
        """Where it is placed: its codes' sharding (same rank and spec as the weight's)."""
        return self.codes.sharding

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized."""
        return self.scale_min is not None

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes and every level of scales."""
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the dense shape."""
        return 8 * self.nbytes / math.prod(self.shape)

    def abstract(self) -> jax.ShapeDtypeStruct:
        """The dense weight as a shape and dtype (for tracing)."""
        return jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype))

    def error_bound(self) -> jax.Array:
        """The largest ``|w - dequantize(self)|`` possible, per element of the dense weight.

        nf4: half the widest gap between NF4 values times the block's absmax, plus half a
        step of a double-quantized absmax; int8: half a step, ``absmax / 254``; fp8: half
        a step of e4m3 at the stored value (1/16 of it; 2⁻¹⁰ below the normal range),
        times ``absmax / 448``.

        Raises:
          ValueError: for GGUF blocks, whose weights before quantization are not known.
        """
        if self.format in _gguf_blocks.FORMATS:
            raise ValueError(
                f"error_bound: a {self.format} weight was read from a GGUF file: its blocks "
                "are the weight, there is no original to bound the error against."
            )
        scales = _dequantize_scales(self)
        if self.format == INT8:
            return jnp.broadcast_to(scales / 254, self.shape)
        if self.format == FP8:
            stored = jnp.abs(self.codes.astype(jnp.float32))
            return jnp.maximum(stored / 16, 2.0**-10) * scales / _FP8_MAX
        bound = scales * NF4_MAX_STEP
        if self.double_quant:
            group = self.scales.shape[-1] // self.scale_step.shape[-1]
            bound = bound + jnp.repeat(self.scale_step, group, axis=-1) / 2
        return jnp.repeat(bound, NF4_BLOCK, axis=self.axis)

    def describe(self) -> str:
        """``"nf4 (double-quantized scales)"``, ``"int8"``, ``"q4_1 (GGUF blocks)"``, ..."""
        if self.format in _gguf_blocks.FORMATS:
            return f"{self.format} (GGUF blocks)"
        return f"{self.format} (double-quantized scales)" if self.double_quant else self.format


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a `QuantizedArray` (a leaf for tree walks that need the weight)."""
    return isinstance(x, QuantizedArray)


def _group(n: int) -> int:
    """The largest divisor of ``n`` not above `DQ_GROUP`: scales are grouped without padding."""
    return max(g for g in range(1, min(n, DQ_GROUP) + 1) if n % g == 0)


def _blocked(x: jax.Array, axis: int, block: int) -> jax.Array:
    """``x`` with ``axis`` split into ``(n / block, block)``."""
    return x.reshape(*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1 :])


def _unblocked(x: jax.Array, axis: int) -> jax.Array:
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


def _quantize_scales(scales: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """uint8 codes of ``scales`` on a linear grid per group along their last axis."""
    axis = scales.ndim - 1
    grouped = _blocked(scales, axis, _group(scales.shape[-1]))
    lo = jnp.min(grouped, axis=axis + 1, keepdims=True)
    step = (jnp.max(grouped, axis=axis + 1, keepdims=True) - lo) / 255
    codes = jnp.round((grouped - lo) / jnp.where(step > 0, step, 1.0)).astype(jnp.uint8)
    return _unblocked(codes, axis), jnp.squeeze(lo, axis + 1), jnp.squeeze(step, axis + 1)


def _dequantize_scales(q: QuantizedArray) -> jax.Array:
    if not q.double_quant:
        return q.scales
    axis = q.scales.ndim - 1
    codes = _blocked(q.scales, axis, q.scales.shape[-1] // q.scale_min.shape[-1])
    lo, step = q.scale_min[..., None], q.scale_step[..., None]
    return _unblocked(lo + codes.astype(jnp.float32) * step, axis)


def nf4_codes(x: jax.Array) -> jax.Array:
    """The NF4 code (0..15, uint8) of each value of ``x`` in [-1, 1]: the nearest value,
    a tie going to the lower code (bitsandbytes' ``x > midpoint`` thresholds)."""
    return jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), x, side="left").astype(jnp.uint8)


def _nf4(w: jax.Array, axis: int, double_quant: bool) -> tuple:
    blocks = _blocked(w.astype(jnp.float32), axis, NF4_BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
    codes = _unblocked(nf4_codes(blocks / jnp.where(absmax > 0, absmax, 1.0)), axis)
    pairs = _blocked(codes, axis, 2)
    hi, lo = jnp.split(pairs, 2, axis=axis + 1)
    packed = jnp.squeeze((hi << 4) | lo, axis + 1)
    scales = jnp.squeeze(absmax, axis + 1)
    if double_quant:
        return (packed, *_quantize_scales(scales))
    return packed, scales, None, None


def _absmax(w: jax.Array, contracted: tuple[int, ...]) -> jax.Array:
    """Per output channel (reduced over the input axes), 1 where a channel is all zeros."""
    absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=contracted, keepdims=True)
    return jnp.where(absmax > 0, absmax, 1.0)


def _int8(w: jax.Array, contracted: tuple[int, ...]) -> tuple:
    absmax = _absmax(w, contracted)
    return jnp.round(w.astype(jnp.float32) / absmax * 127).astype(jnp.int8), absmax, None, None


_FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448: e4m3fn has no infinity


def _fp8(w: jax.Array, contracted: tuple[int, ...]) -> tuple:
    absmax = _absmax(w, contracted)
    codes = (w.astype(jnp.float32) / absmax * _FP8_MAX).astype(jnp.float8_e4m3fn)
    return codes, absmax, None, None


def quantize(
    w: jax.Array,
    format: str,
    contracted: tuple[int, ...],
    *,
    double_quant: bool = True,
    name: str = "weight",
    out_shardings: Any = None,
) -> QuantizedArray:
    """A dense weight as a `QuantizedArray`, computed where ``w`` lives (one jitted call).

    Args:
      w: the weight, any float dtype.
      format: ``"nf4"``, ``"int8"`` or ``"fp8"``.
      contracted: the weight's axes that meet the input (nf4 blocks run along the last).
      double_quant: nf4: quantize the block scales too (8 bits, groups of up to 256).
      name: the weight's path, for error messages.
      out_shardings: optional shardings of the result's arrays (a `QuantizedArray` of them).

    Returns:
      The quantized weight; ``dequantize(q)`` has ``w``'s shape and dtype.

    Raises:
      ValueError: an unknown format, or (nf4) a block axis not a multiple of 64.

    Example:
      >>> q = jaxlora.quantize(kernel, "nf4", contracted=(0,))  # a Dense kernel (in, out)
      >>> w = jaxlora.dequantize(q)  # kernel's shape and dtype, within q.error_bound()
    """
    if format not in FORMATS:
        raise ValueError(f"quantize: unknown format {format!r}; use one of {FORMATS}.")
    contracted = tuple(sorted(d % w.ndim for d in contracted))
    shape = tuple(w.shape)
    if format == NF4 and shape[contracted[-1]] % NF4_BLOCK:
        axis = contracted[-1]
        raise ValueError(
            f"quantize: weight {name!r} {shape} cannot be stored as nf4: its input axis "
            f"{axis} ({shape[axis]}) is not a multiple of the block size {NF4_BLOCK}. Keep it "
            'in float (add it to LoraConfig(quantize_exclude=[...])) or use quantize="int8".'
        )
    return _quantized(format, contracted, double_quant, out_shardings)(w)


@functools.lru_cache(maxsize=64)
def _quantized(format: str, contracted: tuple, double_quant: bool, out_shardings: Any):
    def fn(w):
        shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
        if format in (INT8, FP8):
            per_channel = _int8 if format == INT8 else _fp8
            return QuantizedArray(*per_channel(w, contracted), format, shape, dtype, -1)
        axis = contracted[-1]
        return QuantizedArray(*_nf4(w, axis, double_quant), NF4, shape, dtype, axis)

    return jax.jit(fn, out_shardings=out_shardings)


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """The dense weight of ``q`` (jit-able; inside a step XLA fuses it into its consumer).

    Args:
      q: the quantized weight.
      dtype: the result's dtype (default: the dtype the weight had).

    Returns:
      An array of ``q.shape``.
    """
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    if q.format in _gguf_blocks.FORMATS:
        return _gguf_blocks.dequantize(q.format, q.codes, q.scales, q.offsets, q.axis).astype(dtype)
    scales = _dequantize_scales(q)
    if q.format == INT8:
        return (q.codes.astype(jnp.float32) * (scales / 127)).astype(dtype)
    if q.format == FP8:
        return (q.codes.astype(jnp.float32) * (scales / _FP8_MAX)).astype(dtype)
    axis = q.axis
    hi, lo = q.codes >> 4, q.codes & 0xF
    codes = _unblocked(jnp.stack([hi, lo], axis=axis + 1), axis)
    values = jnp.take(jnp.asarray(NF4_VALUES), codes.astype(jnp.int32))
    w = _blocked(values, axis, NF4_BLOCK) * jnp.expand_dims(scales, axis + 1)
    return _unblocked(w, axis).astype(dtype)


def from_gguf(
    data: np.ndarray, tensor_type: Any, *, transpose: bool = False, dtype: Any = jnp.float32
) -> QuantizedArray:
    """A GGUF tensor kept in its own quantized blocks (``Q4_1`` or ``Q8_0``), never dense.

    Args:
      data: the tensor's bytes, uint8 ``(*rows, row_bytes)``: ``tensor.data`` of a
        ``gguf.GGUFReader`` tensor (rows of blocks of 32 along its last dense axis; a
        linear layer's is PyTorch's ``(out, in)``). Rows may be reordered before (a
        permutation of output channels keeps every block whole).
      tensor_type: ``tensor.tensor_type`` (a ``gguf.GGMLQuantizationType``) or its name.
      transpose: swap the last two axes (a Flax kernel ``(in, out)`` from ``(out, in)``):
        the codes and scales are transposed, the bytes of each block kept.
      dtype: the dtype `dequantize` returns by default; the values are float32 (those of
        ``gguf.quants.dequantize``, bit for bit) rounded to it.

    Returns:
      The weight, dense shape ``(*rows, cols)`` (or its last two axes swapped), its
      blocks along the ``cols`` axis; 5 bits per weight (q4_1) or 8.5 (q8_0).

    Raises:
      ValueError: a tensor type other than Q4_1 and Q8_0 (F32/F16 tensors are dense:
        ``gguf.quants.dequantize`` them), or data not laid out in its blocks.

    Example:
      >>> t = gguf.GGUFReader(path).tensors[2]  # blk.0.ffn_up.weight, Q4_1 (1536, 576)
      >>> kernel = jaxlora.from_gguf(t.data, t.tensor_type, transpose=True)  # (576, 1536)
    """
    format = _gguf_blocks.format_of(tensor_type)
    if format is None:
        name = getattr(tensor_type, "name", tensor_type)
        raise ValueError(
            f"from_gguf: tensor type {name} is not one jaxlora keeps quantized (only "
            f"{', '.join(f.upper() for f in _gguf_blocks.FORMATS)}); load it dense with "
            "gguf.quants.dequantize(tensor.data, tensor.tensor_type), or quantize it with "
            'jaxlora.quantize(w, "nf4", ...).'
        )
    codes, scales, offsets = _gguf_blocks.read(np.asarray(data), format)
    axis = codes.ndim - 1
    shape = (*codes.shape[:-1], scales.shape[-1] * _gguf_blocks.BLOCK)
    if transpose:
        codes, scales = np.swapaxes(codes, -1, -2), np.swapaxes(scales, -1, -2)
        offsets = None if offsets is None else np.swapaxes(offsets, -1, -2)
        axis, shape = axis - 1, (*shape[:-2], shape[-1], shape[-2])
    arrays = [
        None if x is None else jnp.asarray(np.ascontiguousarray(x))
        for x in (codes, scales, offsets)
    ]
    return QuantizedArray(
        arrays[0], arrays[1], None, None, format, shape, jnp.dtype(dtype).name, axis, arrays[2]
    )
