"""Saved adapters as records: what `collect` reads out of an adapted tree.

Shared by the orbax checkpoints and the PEFT format. A `LayerSpec` describes one adapted
layer (shapes, scale, the base it was trained on), a `LeafSpec` one fully trained leaf
(``modules_to_save`` or bias); `check_config` checks records against a `LoraConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax.core import meta

from jaxlora._config import LAYER_WEIGHTS, LoraConfig, target_paths
from jaxlora._tree import (
    LoraAdapter,
    PyTree,
    Trainable,
    adapter_at,
    has_adapters,
    iter_adapters,
    params_of,
    path_str,
)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One adapted layer as saved.

    Attributes:
      path: the adapter's name: the layer path for a ``kernel``/``embedding`` weight, the
        weight's own path for any other (see `jaxlora._config.adapter_name`).
      weight_key: the adapted weight's key in its module (``"kernel"``, ``"w"``, ...).
      kernel_shape: the base weight's stored shape (with stacked-layer axes).
      kernel_dtype: the base weight's dtype name (recorded; a base in another dtype loads).
      a_shape: A, ``(*stack, *in, r)``.
      b_shape: B, ``(*stack, r, *out)``.
      dtype: dtype name of A and B.
      scale: alpha / r (or alpha / sqrt(r)).
      delta_eq: einsum building ΔW from A and B.
      base_fingerprint: `_fingerprint.kernel_fingerprint` of the base weight it was
        trained on (None when unknown: PEFT files, adapters saved before it existed).
      magnitude_shape: DoRA's magnitude ``(*stack, *out)`` (see `jaxlora._dora`); None for
        plain LoRA.
    """

    path: str
    weight_key: str
    kernel_shape: tuple[int, ...]
    kernel_dtype: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: str
    scale: float
    delta_eq: str
    base_fingerprint: str | None = None
    magnitude_shape: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        """The adapter rank r."""
        return self.a_shape[-1]

    @property
    def module(self) -> str:
        """The path of the module (params dict) holding the weight."""
        return self.path if self.weight_key in LAYER_WEIGHTS else self.path.rpartition("/")[0]

    @property
    def targets(self) -> tuple[str, ...]:
        """The paths config patterns are matched against (`jaxlora._config.target_paths`)."""
        return target_paths(self.path, self.weight_key)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (`from_json` inverts it)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> LayerSpec:
        """Rebuilds a spec from `to_json` output; KeyError/TypeError on a malformed one."""
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        return cls(
            **{
                f.name: _field(record, f.name)
                for f in dataclasses.fields(cls)
                if f.name in required or f.name in record
            }
        )


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One fully trained leaf (``modules_to_save`` or bias) as saved."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (`from_json` inverts it)."""
        return {"path": self.path, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> LeafSpec:
        """Rebuilds a spec from `to_json` output; KeyError/TypeError on a malformed one."""
        return cls(**{f.name: _field(record, f.name) for f in dataclasses.fields(cls)})


def _field(record: Mapping[str, Any], name: str) -> Any:
    value = record[name]
    return tuple(int(n) for n in value) if isinstance(value, list) else value


def unmark(x: Any) -> Any:
    """The array of a leaf, without its `Trainable` marker or metadata box."""
    return meta.unbox(x.value if isinstance(x, Trainable) else x)


def _dtype_name(x: Any) -> str:
    return jax.numpy.dtype(x.dtype).name


def collect(
    params: PyTree, *, who: str
) -> tuple[list[tuple[LayerSpec, Any, Any, Any]], list[tuple[LeafSpec, Any]]]:
    """The adapters and fully trained leaves of an adapted tree, with their records.

    Args:
      params: an adapted tree (params collection or variables dict).
      who: the calling function, for error messages.

    Returns:
      ``[(spec, A, B, magnitude)]`` per adapted layer (magnitude None unless DoRA) and
      ``[(spec, value)]`` per `Trainable` leaf, arrays unboxed.
    """
    inner, _ = params_of(params)
    if not has_adapters(inner):
        raise ValueError(
            f"{who}: these params hold no LoRA adapters. Pass the tree returned by "
            "jaxlora.lorafy (or jaxlora.load_adapter / jaxlora.import_peft)."
        )
    layers = []
    for name, _, weight_key, layer in iter_adapters(inner):
        adapter = adapter_at(layer, weight_key)
        kernel, a, b = (meta.unbox(x) for x in (layer[weight_key], adapter.a, adapter.b))
        m = meta.unbox(adapter.magnitude)
        spec = LayerSpec(
            path=name,
            weight_key=weight_key,
            kernel_shape=tuple(kernel.shape),
            kernel_dtype=_dtype_name(kernel),
            a_shape=tuple(a.shape),
            b_shape=tuple(b.shape),
            dtype=_dtype_name(a),
            scale=float(adapter.scale),
            delta_eq=adapter.delta_eq,
            magnitude_shape=None if m is None else tuple(m.shape),
        )
        layers.append((spec, a, b, m))
    leaves = []
    for path, marked in trainable_leaves(inner):
        value = meta.unbox(marked.value)
        leaves.append((LeafSpec(path, tuple(value.shape), _dtype_name(value)), value))
    return layers, leaves


def trainable_leaves(inner: PyTree) -> list[tuple[str, Trainable]]:
    marked = jax.tree_util.tree_leaves_with_path(
        inner, is_leaf=lambda x: isinstance(x, Trainable | LoraAdapter)
    )
    return [(path_str(k), x) for k, x in marked if isinstance(x, Trainable)]


def check_config(layers: Sequence[LayerSpec], config: LoraConfig, *, who: str) -> None:
    """Raises unless ``config`` describes every adapter (selection, rank and scale).

    Args:
      layers: the adapted layers.
      config: the `LoraConfig` the layers are claimed to come from.
      who: the calling function, for error messages.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"{who}: config is a {type(config).__name__}; pass the jaxlora.LoraConfig the "
            "params were adapted with."
        )
    for spec in layers:
        is_linear = spec.weight_key != "embedding"
        rank, scale = config.rank_for(spec.targets), config.scale_for(spec.targets)
        if not config.selects(spec.targets, is_linear=is_linear):
            problem = "is adapted but the config does not target it"
        elif spec.rank != rank:
            problem = f"has rank {spec.rank} but the config gives rank {rank}"
        elif not math.isclose(spec.scale, scale, rel_tol=1e-9):
            problem = f"has scale {spec.scale:g} but the config gives {scale:g}"
        elif (spec.magnitude_shape is not None) != config.use_dora:
            dora = spec.magnitude_shape is not None
            problem = (
                f"{'is' if dora else 'is not'} a DoRA adapter but the config has "
                f"use_dora={config.use_dora}"
            )
        else:
            continue
        raise ValueError(
            f"{who}: layer {spec.path!r} {problem}. Pass the LoraConfig these params were "
            "adapted with (the one given to jaxlora.lorafy or returned by load_adapter)."
        )
