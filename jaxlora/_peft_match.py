"""Which flax weight each LoRA factor of a PEFT file adapts, with what rank and scale.

The first step of `import_peft`, before anything is known of how the model uses its
weights: every torch module (or ``target_parameters`` parameter, found under PEFT's
``ParamWrapper`` nesting) of the file finds its flax weight through the module map, and
each flax weight gets a `Plan`: the torch names it comes from (several for a weight split
over torch modules, a block of one for a weight fused with others into one torch weight),
its rank and its scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.core import meta

from jaxlora import _peft_files
from jaxlora import _peft_layouts as layouts
from jaxlora._config import LAYER_WEIGHTS
from jaxlora._peft_files import CONFIG_NAME, Factors
from jaxlora._peft_flax import weight_names
from jaxlora._peft_names import ModuleMap, slots
from jaxlora._tree import module_paths, subtree


@dataclasses.dataclass(frozen=True)
class Slot:
    """A flax name's place in a torch name: whole, block ``block``, or part ``part`` of a split."""

    path: str
    block: int | None = None
    part: int = 0
    parts: int = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """One flax weight to adapt from the file.

    Attributes:
      path: the adapter name.
      module: the path of the module holding the weight.
      weight_key: the weight's key there.
      sources: the torch names it comes from, in split order (one unless split).
      block: its block of a fused torch weight (None: the whole torch weight).
      kind: the torch layer kind (`_peft_layouts`).
      rank: its rank (a split weight's parts not sharing A add up).
      scale: its LoRA scale.
      alpha: the alpha giving that scale at that rank.
    """

    path: str
    module: str
    weight_key: str
    sources: tuple[str, ...]
    block: int | None
    kind: str
    rank: int
    scale: float
    alpha: float


def index_of(plain: Mapping[str, Any], module_map: ModuleMap, *, who: str) -> dict:
    """torch name -> the `Slot` of each flax module or weight the module map sends there."""
    index: dict[str, list[Slot]] = {}
    for path in dict.fromkeys([*module_paths(plain), *weight_names(plain)]):
        found = slots(module_map, path, who=who)
        for part, (name, block) in enumerate(found):
            entries = index.setdefault(name, [])
            if entries and (block is None or entries[0].block is None):
                raise ValueError(
                    f"{who}: module_map sends both {entries[0].path!r} and {path!r} to "
                    f"{name!r}; it must give each flax module its own torch name."
                )
            entries.append(Slot(path, block, part, len(found)))
    return {name: sorted(e, key=lambda s: s.block or 0) for name, e in index.items()}


def _prefix_hint(name: str, index: Mapping[str, Sequence[Slot]]) -> str:
    """A suggestion when ``name`` differs from a known torch name by a leading prefix."""
    for known, found in index.items():
        path = found[0].path
        if name.endswith("." + known):
            extra = name[: -len(known)]
            return (
                f" (the flax module {path!r} maps to {known!r}: the file names carry an extra "
                f"prefix {extra!r}; use module_map=jaxlora.peft_module_map({extra!r}))"
            )
        if known.endswith("." + name):
            return (
                f" (the flax module {path!r} maps to {known!r}: the module map adds a prefix "
                f"{known[: -len(name)]!r} that the file does not have)"
            )
    return ""


def _parameters(module: str, index: Mapping, peft_config: Mapping[str, Any]) -> list[str]:
    """The targeted parameters of torch module ``module``, innermost ParamWrapper first."""
    names = [
        n
        for n in index
        if n.rpartition(".")[0] == module and _peft_files.targeted(peft_config, n, parameter=True)
    ]
    return _peft_files.wrapping_order(names, module, who="import_peft") if names else []


def _tied_copy(f: Factors, by_name: Mapping[str, Factors], module_map, peft_config) -> bool:
    """Whether ``f`` is the copy of a tied embedding's factors PEFT saves for the head."""
    tied = getattr(module_map, "tied", None)
    if tied is None or not peft_config.get("ensure_weight_tying") or f.module != tied[0]:
        return False
    e = by_name.get(tied[1])
    return (
        not f.depth
        and e is not None
        and e.embedding
        and all(x is not None for x in (e.a, e.b, f.a, f.b))
        and np.array_equal(f.a, e.b.T)
        and np.array_equal(f.b, e.a.T)
    )


def resolve(
    factors: Sequence[Factors], index: Mapping, peft_config: Mapping[str, Any], module_map
) -> tuple[dict[str, Factors], list[str]]:
    """torch name -> its factors, and the factors that match no flax weight."""
    by_name, unmatched, leftover = {}, [], []
    for f in factors:
        if not f.depth and f.module in index:
            by_name[f.module] = f
            continue
        wrapped = _parameters(f.module, index, peft_config)
        if f.depth < len(wrapped):
            by_name[wrapped[len(wrapped) - 1 - f.depth]] = f
        else:
            leftover.append(f)
    for f in leftover:
        if not _tied_copy(f, by_name, module_map, peft_config):
            where = f.module + ".base_layer" * f.depth
            unmatched.append(
                f"LoRA factors of {where!r}: no flax layer{_prefix_hint(f.module, index)}"
            )
    return by_name, unmatched


def _weight_of(plain: Mapping[str, Any], path: str, f: Factors) -> tuple[str, str]:
    """``(module path, weight key)`` of the flax weight ``path`` that the factors ``f`` adapt."""
    node = subtree(plain, path)
    if not isinstance(node, Mapping):
        return path.rpartition("/")[0], path.rpartition("/")[2]
    key = "embedding" if f.embedding else "kernel"
    if not isinstance(node.get(key), jax.Array | np.ndarray | meta.AxisMetadata):
        kind = "Embedding" if f.embedding else "Linear"
        raise ValueError(
            f"import_peft: {f.key('A')!r} is a LoRA factor of a {kind} layer, but the flax "
            f"layer {path!r} has no {key!r}; check module_map."
        )
    return path, key


def _kind(f: Factors, name: str, peft_config: Mapping[str, Any]) -> str:
    if f.embedding:
        return layouts.EMBEDDING
    if f.a.ndim > 2:
        return layouts.CONV
    if _peft_files.targeted(peft_config, name, parameter=True):
        return layouts.PARAMETER
    return layouts.LINEAR


def _missing_factor(f: Factors, path: str, name: str) -> None:
    missing = [x for x, v in (("lora_A", f.a), ("lora_B", f.b)) if v is None]
    if missing:
        raise ValueError(
            f"import_peft: layer {path!r} ({name}) has only one LoRA factor in the file; "
            f"{missing[0]} is missing. Re-save the adapter."
        )


def _parts(index: Mapping[str, Sequence[Slot]], path: str) -> list[tuple[int, str]]:
    """``(part, torch name)`` of every torch module a split flax weight goes to."""
    return [(s.part, n) for n, entries in index.items() for s in entries if s.path == path]


def plans_of(
    by_name: Mapping[str, Factors],
    index: Mapping[str, Sequence[Slot]],
    plain: Mapping[str, Any],
    peft_config: Mapping[str, Any],
) -> tuple[list[Plan], list[str]]:
    """A `Plan` for every flax weight the file adapts, and what does not match."""
    plans, unmatched, seen = [], [], set()
    rslora = bool(peft_config.get("use_rslora"))
    for name, entries in index.items():
        for slot in entries:
            if slot.path in seen or (slot.parts == 1 and name not in by_name):
                continue
            sources = (
                tuple(n for _, n in sorted(_parts(index, slot.path))) if slot.parts > 1 else (name,)
            )
            found = [n for n in sources if n in by_name]
            if not found:
                continue
            seen.add(slot.path)
            if len(found) < len(sources):
                missing = sorted(set(sources) - set(found))
                unmatched.append(f"layer {slot.path!r}: no factors of {missing} in the file")
                continue
            for n in sources:
                _missing_factor(by_name[n], slot.path, n)
            f = by_name[sources[0]]
            module, key = _weight_of(plain, slot.path, f)
            ranks = [_peft_files.rank_of(peft_config, n) for n in sources]
            scales = [_peft_files.scale_of(peft_config, n) for n in sources]
            shared = len(set(scales)) == 1 and all(
                np.array_equal(by_name[n].a, f.a) for n in sources
            )
            rank = ranks[0] if shared else sum(ranks)
            alpha = (
                _peft_files.pattern_value(
                    peft_config.get("alpha_pattern") or {}, sources[0], peft_config["lora_alpha"]
                )
                if shared
                else scales[0] * (math.sqrt(rank) if rslora else rank)
            )
            plans.append(
                Plan(
                    path=slot.path,
                    module=module,
                    weight_key=key,
                    sources=sources,
                    block=slot.block,
                    kind=_kind(f, name, peft_config),
                    rank=rank,
                    scale=scales[0],
                    alpha=alpha,
                )
            )
    return plans, unmatched


def _adaptable(node: Any) -> bool:
    """A layer with a kernel or embedding, or a weight of 2 or more axes."""
    if isinstance(node, Mapping):
        return any(not isinstance(node.get(k, {}), Mapping) for k in LAYER_WEIGHTS)
    return getattr(meta.unbox(node), "ndim", 0) >= 2


def targeted_missing(
    index: Mapping, by_name: Mapping, plain: Mapping[str, Any], peft_config: Mapping[str, Any]
) -> list[str]:
    """Flax layers the config targets that have no factors in the file."""
    out = []
    for name, entries in index.items():
        if name in by_name:
            continue
        parameter = _peft_files.targeted(peft_config, name, parameter=True)
        if not (parameter or _peft_files.targeted(peft_config, name, parameter=False)):
            continue
        for slot in entries:
            if parameter or _adaptable(subtree(plain, slot.path)):
                out.append(
                    f"layer {slot.path!r} ({name}) is targeted by {CONFIG_NAME} but has no "
                    "factors in the file"
                )
    return out
