"""Saved adapters as records, checked against and re-attached to a base tree.

Shared by the orbax checkpoints and the PEFT format. `collect` reads each adapted layer
(`LayerSpec` plus its factors) and each fully trained leaf (`LeafSpec` plus its value)
out of an adapted tree; `plan` checks records against the tree they are loaded into
(wrong base: error; unmatched: error unless allowed, then a warning); `shardings` says
where each restored array goes; `attach` builds the adapted tree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax.core import meta
from jax.sharding import Sharding

from jaxlora import _fingerprint, _sharding
from jaxlora._config import LAYER_WEIGHTS, LoraConfig, format_paths, target_paths
from jaxlora._tree import (
    LoraAdapter,
    PyTree,
    Trainable,
    adapter_at,
    adapter_key,
    has_adapters,
    iter_adapters,
    params_of,
    path_str,
    rebox,
    replace_at,
    subtree,
)

_MAX_LISTED = 20


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
) -> tuple[list[tuple[LayerSpec, Any, Any]], list[tuple[LeafSpec, Any]]]:
    """The adapters and fully trained leaves of an adapted tree, with their records.

    Args:
      params: an adapted tree (params collection or variables dict).
      who: the calling function, for error messages.

    Returns:
      ``[(spec, A, B)]`` per adapted layer and ``[(spec, value)]`` per `Trainable` leaf,
      arrays unboxed.
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
        )
        layers.append((spec, a, b))
    leaves = []
    for path, marked in _trainable_leaves(inner):
        value = meta.unbox(marked.value)
        leaves.append((LeafSpec(path, tuple(value.shape), _dtype_name(value)), value))
    return layers, leaves


def _trainable_leaves(inner: PyTree) -> list[tuple[str, Trainable]]:
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
        else:
            continue
        raise ValueError(
            f"{who}: layer {spec.path!r} {problem}. Pass the LoraConfig these params were "
            "adapted with (the one given to jaxlora.lorafy or returned by load_adapter)."
        )


def _base_weight(params: PyTree, spec: LayerSpec) -> Any:
    return meta.unbox(subtree(params_of(params)[0], spec.module)[spec.weight_key])


def fingerprinted(params: PyTree, layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """``layers`` with the fingerprints of their base weights in ``params``."""
    return [
        dataclasses.replace(
            spec, base_fingerprint=_fingerprint.kernel_fingerprint(_base_weight(params, spec))
        )
        for spec in layers
    ]


def check_base(
    params: PyTree, layers: Sequence[LayerSpec], *, source: str, who: str, allow_other_base: bool
) -> None:
    """Raises (or warns, with ``allow_other_base``) if a layer's base weight is not the one
    its adapter was trained on, by content fingerprint. Layers without one are skipped, and
    so are layers whose base is stored otherwise than at training (float and nf4, say):
    adapters do not depend on the base's storage, and `summary` tells how it is stored.

    Args:
      params: the tree being loaded into, already checked with `plan`.
      layers: the saved layers to load.
      source: what is being loaded, for messages.
      who: the calling function, for messages.
      allow_other_base: warn instead of raising.
    """
    recorded = [spec for spec in layers if spec.base_fingerprint is not None]
    now = {
        spec.path: _fingerprint.kernel_fingerprint(_base_weight(params, spec)) for spec in recorded
    }
    other = [
        f"layer {spec.path!r}: its {spec.weight_key} differs from the one the adapter was "
        "trained on"
        for spec in recorded
        if _fingerprint.storage(now[spec.path]) == _fingerprint.storage(spec.base_fingerprint)
        and now[spec.path] != spec.base_fingerprint
    ]
    if not other:
        return
    message = (
        f"{who}: {source} was trained on another base model (same shapes, other weights; "
        f"compared by content fingerprint):{listing(other)}\n"
    )
    if not allow_other_base:
        raise ValueError(
            message + "Load it onto the base it was trained on (float32 or bfloat16 alike), "
            "or pass allow_other_base=True to load it anyway."
        )
    warnings.warn(message + "Loaded anyway (allow_other_base=True).", UserWarning, stacklevel=3)


def listing(items: Sequence[str]) -> str:
    """A newline, then a bulleted, truncated listing of ``items``, for error messages."""
    return "\n" + format_paths(items, limit=_MAX_LISTED, bullet="- ")


def report_unmatched(
    unmatched: Sequence[str], *, source: str, who: str, allow_unmatched: bool
) -> None:
    """Raises on unmatched entries, or warns about them with ``allow_unmatched``."""
    if not unmatched:
        return
    if not allow_unmatched:
        raise ValueError(
            f"{who}: {source} does not match these params:{listing(unmatched)}\n"
            "Load it onto the model it was trained for, or pass allow_unmatched=True to "
            "load the matching part and get the rest as a warning."
        )
    warnings.warn(
        f"{who}: loaded {source} partially (allow_unmatched=True); not loaded:{listing(unmatched)}",
        UserWarning,
        stacklevel=3,
    )


def _kernel_mismatch(spec: LayerSpec, node: Any, source: str, who: str) -> None:
    weight = node.get(spec.weight_key) if isinstance(node, Mapping) else None
    shape = None if weight is None else tuple(meta.unbox(weight).shape)
    if shape == spec.kernel_shape:
        return
    found = f"has {spec.weight_key} {shape}" if shape else f"has no {spec.weight_key!r}"
    raise ValueError(
        f"{who}: layer {spec.path!r} {found}, but {source} was trained on a base whose "
        f"{spec.weight_key} is {spec.kernel_shape} ({spec.kernel_dtype}). Load it onto the "
        "base model it was trained on (same architecture and sizes)."
    )


def plan(
    params: PyTree,
    layers: Sequence[LayerSpec],
    leaves: Sequence[LeafSpec],
    *,
    source: str,
    who: str,
    allow_unmatched: bool,
    unmatched: Sequence[str] = (),
) -> tuple[list[LayerSpec], list[LeafSpec]]:
    """Checks saved records against the tree they are loaded into.

    A layer or leaf whose shape differs from the saved base is an error. Saved entries
    with no counterpart in ``params``, and adapters or trainable leaves of an adapted
    ``params`` that nothing saved replaces, are unmatched: an error, or a warning with
    ``allow_unmatched``.

    Args:
      params: a base or adapted tree (params collection or variables dict).
      layers: the saved adapters.
      leaves: the saved fully trained leaves.
      source: what is being loaded, for messages (e.g. ``"adapter /ckpt"``).
      who: the calling function, for messages.
      allow_unmatched: warn instead of raising on unmatched entries.
      unmatched: entries the caller already found unmatched, reported together.

    Returns:
      The layers and leaves to load.
    """
    inner, _ = params_of(params)
    unmatched = list(unmatched)
    matched_layers = []
    for spec in layers:
        node = subtree(inner, spec.module)
        if node is None:
            unmatched.append(f"saved adapter for layer {spec.path!r}: no such layer here")
            continue
        _kernel_mismatch(spec, node, source, who)
        matched_layers.append(spec)
    matched_leaves = []
    for leaf in leaves:
        node = subtree(inner, leaf.path)
        if node is None or isinstance(node, Mapping):
            unmatched.append(f"saved trainable leaf {leaf.path!r}: no such parameter here")
            continue
        shape = tuple(unmark(node).shape)
        if shape != leaf.shape:
            raise ValueError(
                f"{who}: parameter {leaf.path!r} has shape {shape}, but {source} saved it "
                f"with shape {leaf.shape}. Load it onto the base model it was trained on."
            )
        matched_leaves.append(leaf)
    existing_layers, existing_leaves = _existing(inner)
    unmatched += [
        f"layer {p!r} has an adapter that {source} does not replace"
        for p in sorted(existing_layers - {s.path for s in layers})
    ]
    unmatched += [
        f"trainable leaf {p!r} is not in {source}"
        for p in sorted(existing_leaves - {s.path for s in leaves})
    ]
    report_unmatched(unmatched, source=source, who=who, allow_unmatched=allow_unmatched)
    return matched_layers, matched_leaves


def _existing(inner: PyTree) -> tuple[set[str], set[str]]:
    """Paths of the adapted layers and trainable leaves already in ``inner``."""
    layers = {name for name, *_ in iter_adapters(inner)}
    return layers, {path for path, _ in _trainable_leaves(inner)}


def default_sharding() -> Sharding:
    """Where arrays with no base counterpart go: the first local device."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _sharding_of(x: Any) -> Sharding | None:
    return getattr(x, "sharding", None)


def layer_shardings(
    params: PyTree, spec: LayerSpec, sharding: Sharding | None
) -> tuple[Sharding, Sharding]:
    """Where A and B of ``spec`` go: ``sharding`` if given, else following the base kernel.

    A NamedSharding kernel passes each axis's mesh axes on to the factor axes with the
    same einsum label, stacked axes too (`_sharding.factor_shardings`, as `lorafy`); the
    rank axis is replicated. Replicated or single-device kernels give their sharding; a
    layer missing from ``params`` or a kernel without one goes to the first local device.
    """
    if sharding is not None:
        return sharding, sharding
    node = subtree(params_of(params)[0], spec.module)
    weight = node.get(spec.weight_key) if isinstance(node, Mapping) else None
    kernel = None if weight is None else meta.unbox(weight)
    layer = f"layer {spec.path!r}"
    named = _sharding.factor_shardings(layer, kernel, spec.delta_eq, spec.rank, None)
    if named is not None:
        return named
    kernel_sharding = _sharding_of(kernel)
    if kernel_sharding is None:
        return default_sharding(), default_sharding()
    if not kernel_sharding.is_fully_replicated:
        raise ValueError(
            f"{layer}: its kernel has a {type(kernel_sharding).__name__} that jaxlora cannot "
            "map onto the adapter factors; place the base with a NamedSharding "
            "(jaxlora.shard_params) or pass sharding=NamedSharding(mesh, PartitionSpec())."
        )
    return kernel_sharding, kernel_sharding


def leaf_sharding(params: PyTree, leaf: LeafSpec, sharding: Sharding | None) -> Sharding:
    """Where a trainable leaf goes: ``sharding`` if given, else like the base leaf."""
    if sharding is not None:
        return sharding
    node = subtree(params_of(params)[0], leaf.path)
    found = None if node is None or isinstance(node, Mapping) else _sharding_of(unmark(node))
    return found or default_sharding()


def attach(
    params: PyTree, adapters: Mapping[LayerSpec, LoraAdapter], leaves: Mapping[str, Any]
) -> PyTree:
    """``params`` with ``adapters`` set on their layers and ``leaves`` marked `Trainable`.

    Existing adapters and trainable leaves at those paths are replaced (keeping their
    metadata boxes); everything else is left as it is.

    Args:
      params: a base or adapted tree (params collection or variables dict), already
        checked with `plan`.
      adapters: the saved layer -> its adapter.
      leaves: leaf path -> new value.

    Returns:
      The adapted tree, in the form of ``params``.
    """
    inner, rebuild = params_of(params)
    for spec, adapter in adapters.items():
        inner = replace_at(
            inner, spec.module, functools.partial(_with_adapter, spec.weight_key, adapter)
        )
    for path, value in leaves.items():
        inner = replace_at(inner, path, functools.partial(_as_trainable, value))
    return rebuild(inner)


def _with_adapter(weight: str, adapter: LoraAdapter, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The layer with ``adapter``: factors boxed like the old ones, else like the weight."""
    key = adapter_key(weight)
    old = layer.get(key)
    if isinstance(old, LoraAdapter):
        a, b = rebox(old.a, adapter.a), rebox(old.b, adapter.b)
    else:
        a, b = _sharding.box_factors(layer[weight], adapter.a, adapter.b, adapter.delta_eq, None)
    return {**layer, key: dataclasses.replace(adapter, a=a, b=b)}


def _as_trainable(value: Any, old: Any) -> Trainable:
    return Trainable(rebox(old.value if isinstance(old, Trainable) else old, value))
