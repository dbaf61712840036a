"""jaxlora's LoRA factors <-> PEFT's torch tensors, for each kind of torch layer PEFT adapts.

jaxlora keeps A ``(*stack, *in, r)`` and B ``(*stack, r, *out)`` over the weight's own
axes, ordered as the adapter's ``delta_eq`` says (`jaxlora._targeting.layout_of`). PEFT
keeps ``lora_A (r, in)`` / ``lora_B (out, r)`` in torch's ``(out, in)`` order. Between the
two sits the flat form, `Flat`: A ``(*stack, in, r)`` and B ``(*stack, r, out)`` with the
input axes and the output axes each flattened in the weight's axis order (C order). That
is how Hugging Face checkpoints flatten heads: a ``(d, heads, head_dim)`` weight is torch's
``(heads·head_dim, d)``, output ``head·head_dim + i``; ``(heads, head_dim, d)`` is torch's
``(d, heads·head_dim)``.

==========  ==========================================  ==================================
kind        ``lora_A``                                  ``lora_B``
==========  ==========================================  ==================================
linear      ``(r, in)``                                 ``(out, r)``
embedding   ``lora_embedding_A (r, vocab)``             ``lora_embedding_B (features, r)``
conv        ``(r, in_channels, *window)``               ``(out_channels, r, 1, ...)``
parameter   ``(experts·r, in)``, row ``e·r + k``        ``(out, r·experts)``, column
                                                        ``k·experts + e``
==========  ==========================================  ==================================

A ``conv`` weight is Flax's ``(*window, in, out)`` kernel, torch's ``(out, in, *window)``. A
``parameter`` is one PEFT adapts through ``target_parameters``: expert weights stacked
``(experts, ...)`` (one leading stacked axis), or a plain 2-D one (then like ``linear``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxlora import _layout

LINEAR, EMBEDDING, CONV, PARAMETER = "linear", "embedding", "conv", "parameter"


@dataclasses.dataclass(frozen=True)
class Flat:
    """A LoRA adapter with its input and output axes flattened (see the module docstring).

    Attributes:
      a: ``(*stack, in, r)``.
      b: ``(*stack, r, out)``.
      scale: the LoRA scale (alpha / r or alpha / sqrt(r)).
      magnitude: DoRA's magnitude ``(*stack, out)``, or None.
    """

    a: np.ndarray
    b: np.ndarray
    scale: float
    magnitude: np.ndarray | None = None

    @property
    def rank(self) -> int:
        """The rank r."""
        return self.a.shape[-1]


@dataclasses.dataclass(frozen=True)
class _Labels:
    lead: int  # leading stacked axes (the "..." of delta_eq)
    a: str
    b: str
    rank: str
    ins: str  # weight labels on A's side, in weight order
    outs: str


def _labels(delta_eq: str, ndim: int, *, where: str) -> _Labels:
    a, b, kernel = _layout.delta_labels(delta_eq)
    lead = ndim - len(kernel)
    stacked = [d + lead for d, c in enumerate(kernel) if c in a and c in b]
    if stacked or lead > 1:
        axes = stacked or list(range(lead))
        raise ValueError(
            f"{where}: its weight axes {axes} are stacked (a scanned layer axis or experts "
            "not in front); PEFT has a layout for at most one leading stacked axis "
            "(experts, target_parameters). Exclude it from the targets to export the rest."
        )
    rank = next(c for c in a if c not in kernel)
    ins = "".join(c for c in kernel if c in a)
    outs = "".join(c for c in kernel if c in b)
    return _Labels(lead, a, b, rank, ins, outs)


def stacked(delta_eq: str, ndim: int) -> bool:
    """Whether the weight of an adapter has a leading stacked axis (experts)."""
    return ndim > len(_layout.delta_labels(delta_eq)[2])


def to_flat(
    a, b, delta_eq: str, shape: Sequence[int], scale: float, *, where: str, magnitude=None
) -> Flat:
    """The `Flat` form of jaxlora factors on a weight of ``shape``.

    Args:
      a: A as stored, ``(*stack, *a_shape)``.
      b: B as stored.
      delta_eq: the adapter's ``delta_eq``.
      shape: the weight's stored shape.
      scale: the adapter's scale.
      where: names the layer in errors.
      magnitude: DoRA's magnitude as stored (B's axes without the rank), or None.
    """
    lab = _labels(delta_eq, len(shape), where=where)
    a = np.einsum(f"...{lab.a}->...{lab.ins}{lab.rank}", np.asarray(a))
    b = np.einsum(f"...{lab.b}->...{lab.rank}{lab.outs}", np.asarray(b))
    stack = tuple(shape[: lab.lead])
    if magnitude is not None:
        m = np.einsum(f"...{lab.b.replace(lab.rank, '')}->...{lab.outs}", np.asarray(magnitude))
        magnitude = m.reshape(*stack, -1)
    a, b = a.reshape(*stack, -1, a.shape[-1]), b.reshape(*stack, b.shape[lab.lead], -1)
    return Flat(a, b, scale, magnitude)


def from_flat(flat: Flat, delta_eq: str, shape: Sequence[int], *, where: str):
    """jaxlora's ``(A, B, magnitude)`` on a weight of ``shape`` from a `Flat` adapter
    (inverts `to_flat`; magnitude None without DoRA)."""
    lab = _labels(delta_eq, len(shape), where=where)
    kernel = _layout.delta_labels(delta_eq)[2]
    size = {c: shape[lab.lead + kernel.index(c)] for c in kernel}
    stack = tuple(shape[: lab.lead])
    a = flat.a.reshape(*stack, *(size[c] for c in lab.ins), flat.rank)
    b = flat.b.reshape(*stack, flat.rank, *(size[c] for c in lab.outs))
    a = np.einsum(f"...{lab.ins}{lab.rank}->...{lab.a}", a)
    b = np.einsum(f"...{lab.rank}{lab.outs}->...{lab.b}", b)
    m = flat.magnitude
    if m is not None:
        m = m.reshape(*stack, *(size[c] for c in lab.outs))
        m = np.ascontiguousarray(np.einsum(f"...{lab.outs}->...{lab.b.replace(lab.rank, '')}", m))
    return np.ascontiguousarray(a), np.ascontiguousarray(b), m


def flat_sizes(delta_eq: str, shape: Sequence[int]) -> tuple[int, int]:
    """``(in, out)`` of a weight under an adapter: the products of its input and output axes."""
    a, b, kernel = _layout.delta_labels(delta_eq)
    lead = len(shape) - len(kernel)
    own = dict(zip(kernel, shape[lead:], strict=True))
    ins = math.prod(own[c] for c in kernel if c in a and c not in b)
    return ins, math.prod(own[c] for c in kernel if c in b and c not in a)


def to_torch(kind: str, flat: Flat, window: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(lora_A, lora_B)`` of a `Flat` adapter on a torch layer of ``kind``.

    Args:
      kind: ``"linear"``, ``"embedding"``, ``"conv"`` or ``"parameter"``.
      flat: the adapter.
      window: conv only, the kernel's spatial sizes (its input axes are ``(*window, in)``).
    """
    a, b = flat.a, flat.b
    if kind == CONV:
        n = len(window)
        a = a.reshape(*window, -1, flat.rank).transpose(n + 1, n, *range(n))
        return a, b.T.reshape(*b.T.shape, *(1,) * n)
    if a.ndim == 3:  # stacked experts
        experts, n_in, rank = a.shape
        lora_a = a.transpose(0, 2, 1).reshape(experts * rank, n_in)
        return lora_a, b.transpose(2, 1, 0).reshape(b.shape[-1], rank * experts)
    return a.T, b.T


def from_torch(
    kind: str,
    lora_a: np.ndarray,
    lora_b: np.ndarray,
    experts: int,
    scale: float,
    magnitude: np.ndarray | None = None,
) -> Flat:
    """A `Flat` adapter from PEFT's factors (`to_torch`'s inverse; shapes checked before).

    Args:
      kind: as for `to_torch`.
      lora_a: PEFT's ``lora_A``.
      lora_b: PEFT's ``lora_B``.
      experts: the number of stacked experts, 0 for a weight without stacked axis.
      scale: PEFT's scaling of the layer.
      magnitude: DoRA's ``lora_magnitude_vector`` ``(out,)`` (linear and embedding only).
    """
    if magnitude is not None:
        return Flat(lora_a.T, lora_b.T, scale, magnitude)
    if kind == CONV:
        n = lora_a.ndim - 2
        a = lora_a.transpose(*range(2, n + 2), 1, 0).reshape(-1, lora_a.shape[0])
        return Flat(a, lora_b.reshape(lora_b.shape[:2]).T, scale)
    if experts:
        rank = lora_a.shape[0] // experts
        a = lora_a.reshape(experts, rank, -1).transpose(0, 2, 1)
        b = lora_b.reshape(lora_b.shape[0], rank, experts).transpose(2, 1, 0)
        return Flat(a, b, scale)
    return Flat(lora_a.T, lora_b.T, scale)


def torch_shapes(
    kind: str, n_in: int, n_out: int, rank: int, experts: int, window: Sequence[int] = ()
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes PEFT gives ``lora_A`` and ``lora_B`` (see `to_torch`)."""
    if kind == CONV:
        channels = n_in // math.prod(window)
        return (rank, channels, *window), (n_out, rank, *(1,) * len(window))
    rows = rank * max(experts, 1)
    return (rows, n_in), (n_out, rows)


def concat_outputs(parts: Sequence[Flat]) -> Flat:
    """One adapter whose outputs are those of ``parts``, in order (a fused torch weight).

    Exact either way: parts that share A and scale keep rank r (``B`` concatenated);
    otherwise A stacks the parts' A along the rank (rank ``Σ r``) and B is block-diagonal,
    each block rescaled to the first part's scale.
    """
    first = parts[0]
    magnitude = None  # DoRA's is per output: the parts' side by side
    if first.magnitude is not None:
        magnitude = np.concatenate([p.magnitude for p in parts], axis=-1)
    if all(p.scale == first.scale and np.array_equal(p.a, first.a) for p in parts):
        b = np.concatenate([p.b for p in parts], axis=-1)
        return Flat(first.a, b, first.scale, magnitude)
    a = np.concatenate([p.a for p in parts], axis=-1)
    stack = first.b.shape[:-2]
    b = np.zeros((*stack, a.shape[-1], sum(p.b.shape[-1] for p in parts)), first.b.dtype)
    row = col = 0
    for p in parts:
        block = p.b * np.asarray(p.scale / first.scale, p.b.dtype)
        b[..., row : row + p.rank, col : col + p.b.shape[-1]] = block
        row, col = row + p.rank, col + p.b.shape[-1]
    return Flat(a, b, first.scale, magnitude)


def split_outputs(flat: Flat, sizes: Sequence[int]) -> list[Flat]:
    """The adapters of consecutive output blocks of ``sizes`` (`concat_outputs` of shared A)."""
    bounds = np.cumsum(sizes)[:-1]
    bs = np.split(flat.b, bounds, axis=-1)
    if flat.magnitude is None:
        return [Flat(flat.a, b, flat.scale) for b in bs]
    ms = np.split(flat.magnitude, bounds, axis=-1)
    return [Flat(flat.a, b, flat.scale, m) for b, m in zip(bs, ms, strict=True)]
