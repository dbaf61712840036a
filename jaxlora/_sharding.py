"""Sharded adapters: each factor takes its kernel's sharding, axis by axis.

A has axes ``(*stack, *in_axes, r)`` and B ``(*stack, r, *out_axes)`` (see `_layout`), so A
takes the kernel's input-axis sharding, B its output-axis sharding, both keep the stacked
(scanned) layer axes' sharding, and the rank axis is replicated unless ``rank_axis`` names a
mesh axis for it. The same mapping applies to `PartitionSpec` entries (arrays placed with a
`NamedSharding`) and to axis names in sharding metadata (linen ``nn.Partitioned`` /
``nn.LogicallyPartitioned`` boxes, NNX ``out_sharding``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora import _layout
from jaxlora._quantize import is_quantized

AxisEntry = str | tuple[str, ...] | None


def _kernel_axes_of_factors(
    delta_eq: str,
) -> tuple[tuple[int | None, ...], tuple[int | None, ...], int]:
    """For each axis of A and of B (without stack axes): its kernel axis, None for the rank."""
    a, b, kernel = _layout.delta_labels(delta_eq)

    def axes(labels):
        return tuple(kernel.index(c) if c in kernel else None for c in labels)

    return axes(a), axes(b), len(kernel)


def entry_axes(entry: AxisEntry) -> tuple[str, ...]:
    """The axis names in one `PartitionSpec` entry (a name, a tuple of names, or None)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def factor_axes(
    kernel_axes: Sequence[AxisEntry], delta_eq: str, rank_axis: str | None = None
) -> tuple[tuple[AxisEntry, ...], tuple[AxisEntry, ...]]:
    """The per-axis sharding of A and B, from their kernel's.

    Args:
      kernel_axes: one entry per stored kernel axis (stack axes first): a mesh or logical
        axis name, a tuple of names, or None (replicated). Shorter sequences are padded
        with None at the end, like a `PartitionSpec`, and then have no stacked axes: for
        a stored weight pass one entry per axis (`factor_shardings` pads its spec).
      delta_eq: the adapter's ``delta_eq`` (``"...A,...B->...kernel"``).
      rank_axis: name to shard the rank axis over; skipped in a factor that already uses it.

    Returns:
      ``(a_axes, b_axes)``, one entry per axis of ``(*stack, *a_shape)`` and
      ``(*stack, *b_shape)``.

    Example:
      >>> factor_axes(("data", "model"), "...ar,...rb->...ab")
      (('data', None), (None, 'model'))
    """
    a_idx, b_idx, n_kernel = _kernel_axes_of_factors(delta_eq)
    n_stack = max(len(kernel_axes) - n_kernel, 0)
    padded = (*kernel_axes, *(None,) * (n_stack + n_kernel - len(kernel_axes)))
    stack, own = padded[:n_stack], padded[n_stack:]

    def one(idx):
        axes = [None if i is None else own[i] for i in idx]
        used = {name for entry in (*stack, *axes) for name in entry_axes(entry)}
        if rank_axis is not None and rank_axis not in used:
            axes[idx.index(None)] = rank_axis
        return (*stack, *axes)

    return one(a_idx), one(b_idx)


def _full(axes: Sequence[AxisEntry] | None, ndim: int) -> tuple[AxisEntry, ...]:
    """``axes`` with one entry per axis of an ``ndim``-axis weight, as a `PartitionSpec` reads it.

    A spec may leave trailing axes out (``jit`` outputs do: ``P("expert", "model")`` for an
    ``(experts, in, out)`` weight sharded ``("expert", "model", None)``); `factor_axes` reads
    leading entries beyond the kernel's own axes as stacked axes, so it needs them all.
    """
    axes = tuple(axes or ())
    return (*axes, *(None,) * (ndim - len(axes)))


def mesh_axes_size(mesh: Any, axes: Sequence[str], *, where: str, fix: str) -> int:
    """How many devices the mesh axes ``axes`` span together.

    Args:
      mesh: the device mesh.
      axes: mesh axis names.
      where: start of the error message, up to the unknown axis (``"shard_batch: "``).
      fix: end of the error message: what to do instead.

    Raises:
      ValueError: an axis that is not in ``mesh``, naming it and the mesh's axes.
    """
    unknown = [ax for ax in axes if ax not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"{where}{unknown[0]!r} is not an axis of the mesh (axes {tuple(mesh.axis_names)}); "
            f"{fix}"
        )
    return math.prod(mesh.shape[ax] for ax in axes)


def divisible_spec(shape: Sequence[int], spec: Sequence[Any], mesh: Any) -> PartitionSpec:
    """``spec`` (one entry per axis) for an array of ``shape``, each axis that its mesh axes
    do not divide replicated: a quantized weight's scales follow its spec where they can."""

    def size(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(mesh.shape[n] for n in names if n is not None)

    return PartitionSpec(
        *(
            e if e is not None and n % size(e) == 0 else None
            for e, n in zip(spec, shape, strict=True)
        )
    )


def _is_concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def concrete_sharding(x: Any) -> NamedSharding | None:
    """The `NamedSharding` of a concrete array (not a tracer), else None. A weight stored
    quantized is placed like its codes, which have its rank and spec."""
    if is_quantized(x):
        x = x.codes
    sharding = x.sharding if _is_concrete(x) else None
    return sharding if isinstance(sharding, NamedSharding) else None


def mesh_of(tree: Any) -> Any | None:
    """The mesh of the first leaf of ``tree`` placed with a `NamedSharding`, or None."""
    shardings = (concrete_sharding(x) for x in jax.tree.leaves(tree))
    return next((s.mesh for s in shardings if s is not None), None)


def place_on_mesh_of(params: Any, tree: Any) -> Any:
    """``tree`` with its arrays that are on no mesh replicated over the mesh of ``params``.

    For optimizer states: moments are created like their params, but step counts land on
    one device, which a ``jit`` over the mesh cannot mix with (once committed, e.g. by a
    checkpoint restore) and a multi-host checkpoint cannot save. Unchanged if no leaf
    of ``params`` is placed with a `NamedSharding`.
    """
    mesh = mesh_of(params)
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if _is_concrete(x) and concrete_sharding(x) is None:
            return jax.device_put(np.asarray(x), replicated)
        return x

    return jax.tree.map(place, tree)


def _check_rank_axis(layer: str, mesh: Any, rank_axis: str | None, rank: int) -> None:
    if rank_axis is None:
        return
    if rank_axis not in mesh.axis_names:
        raise ValueError(
            f"lorafy: rank_axis={rank_axis!r} is not an axis of the mesh of {layer} "
            f"(axes {tuple(mesh.axis_names)}); pass one of them, or rank_axis=None to "
            "replicate the rank axis."
        )
    size = mesh.shape[rank_axis]
    if rank % size:
        raise ValueError(
            f"lorafy: rank {rank} of {layer} is not divisible by mesh axis "
            f"{rank_axis!r} (size {size}); use a rank that is a multiple of {size}, or "
            "rank_axis=None."
        )


def factor_shardings(
    layer: str, kernel: Any, delta_eq: str, rank: int, rank_axis: str | None
) -> tuple[NamedSharding, NamedSharding] | None:
    """`NamedSharding` of A and B for a kernel placed with one, else None.

    Args:
      layer: the layer, for error messages (``"layer 'block_0/up'"``).
      kernel: the layer's kernel array ``(*stack, *kernel_shape)``.
      delta_eq: the adapter's ``delta_eq``.
      rank: the adapter rank.
      rank_axis: mesh axis to shard the rank over, or None (replicated).
    """
    sharding = concrete_sharding(kernel)
    if sharding is None:
        return None
    _check_rank_axis(layer, sharding.mesh, rank_axis, rank)
    a_axes, b_axes = factor_axes(_full(sharding.spec, kernel.ndim), delta_eq, rank_axis)
    return (
        NamedSharding(sharding.mesh, PartitionSpec(*a_axes)),
        NamedSharding(sharding.mesh, PartitionSpec(*b_axes)),
    )


@functools.lru_cache(maxsize=256)
def _placed_init(layout, stack, init, dtype, impl, shardings):
    def fn(key_data):
        key = jax.random.wrap_key_data(key_data, impl=impl)
        return _layout.init_factors(key, layout, stack, init=init, dtype=dtype)

    return jax.jit(fn, out_shardings=shardings)


def init_factors(
    key: jax.Array,
    layout: _layout.Layout,
    stack: tuple[int, ...],
    *,
    init: str,
    dtype: jnp.dtype,
    shardings: tuple[NamedSharding, NamedSharding] | None,
) -> tuple[jax.Array, jax.Array]:
    """`_layout.init_factors`, created in place (jit ``out_shardings``) when given shardings.

    Nothing is gathered: each device computes only its shards of A and B (random bits are
    partitionable, so the values equal an unsharded initialisation).

    Args:
      key: PRNG key for A.
      layout: the layer's layout.
      stack: leading stacked-layer axes.
      init: ``"kaiming"`` or ``"gaussian"``.
      dtype: parameter dtype.
      shardings: ``(a_sharding, b_sharding)`` from `factor_shardings`, or None.

    Returns:
      ``A`` ``(*stack, *layout.a_shape)`` and ``B`` ``(*stack, *layout.b_shape)``.
    """
    if shardings is None:
        return _layout.init_factors(key, layout, stack, init=init, dtype=dtype)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw uint32 key data
        key = jax.random.wrap_key_data(key)
    # The key goes in as host data: the same on every process, and no device to agree on.
    impl = jax.random.key_impl(key)
    init_fn = _placed_init(layout, stack, init, jnp.dtype(dtype), impl, shardings)
    return init_fn(np.asarray(jax.random.key_data(key)))


def box_factors(
    kernel: Any, a: jax.Array, b: jax.Array, delta_eq: str, rank_axis: str | None
) -> tuple[Any, Any]:
    """A and B in boxes like a linen kernel's ``nn.Partitioned`` one, with derived names."""
    if not isinstance(kernel, meta.Partitioned):
        return a, b
    a_names, b_names = factor_axes(_full(kernel.names, kernel.value.ndim), delta_eq, rank_axis)
    return kernel.replace(value=a, names=a_names), kernel.replace(value=b, names=b_names)


def magnitude_names(b_names: Sequence[Any], delta_eq: str) -> tuple[Any, ...]:
    """The axis names (or mesh axes) of DoRA's magnitude: B's without the rank's."""
    a, b, kernel = _layout.delta_labels(delta_eq)
    rank = next(c for c in a if c in b and c not in kernel)
    rank_at = len(b_names) - len(b) + b.index(rank)
    return tuple(n for i, n in enumerate(b_names) if i != rank_at)


def magnitude_sharding(b_sharding: Any, b_ndim: int, delta_eq: str) -> Any:
    """Where DoRA's magnitude goes given B's sharding: a `NamedSharding` loses the rank's
    entry (`magnitude_names`); any other sharding (replicated, one device) is kept."""
    if not isinstance(b_sharding, NamedSharding):
        return b_sharding
    spec = _full(b_sharding.spec, b_ndim)
    return NamedSharding(b_sharding.mesh, PartitionSpec(*magnitude_names(spec, delta_eq)))


def box_magnitude(kernel: Any, magnitude: jax.Array, delta_eq: str) -> Any:
    """DoRA's magnitude in a box like a linen kernel's ``nn.Partitioned`` one (see
    `magnitude_names`)."""
    if not isinstance(kernel, meta.Partitioned):
        return magnitude
    _, b_names = factor_axes(_full(kernel.names, kernel.value.ndim), delta_eq, None)
    return kernel.replace(value=magnitude, names=magnitude_names(b_names, delta_eq))


def nnx_factor_metadata(
    kernel: nnx.Variable, delta_eq: str, rank_axis: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sharding metadata for an NNX layer's A and B, derived from its kernel's."""
    metadata = kernel.get_metadata()
    names = metadata.get("out_sharding")
    if not names:
        return {}, {}
    common = {k: metadata[k] for k in ("mesh", "sharding_rules", "eager_sharding") if k in metadata}
    sharding = concrete_sharding(kernel.get_value())
    if common.get("mesh") is None and sharding is not None:
        common["mesh"] = sharding.mesh
    a_names, b_names = factor_axes(_full(names, len(kernel.shape)), delta_eq, rank_axis)
    return {**common, "out_sharding": a_names}, {**common, "out_sharding": b_names}
