"""A PEFT file's factors laid out as jaxlora's: torch ``lora_A``/``lora_B`` (and DoRA's
``lora_magnitude_vector``) over the flax weight's input and output axes.

`factors` checks each factor against the torch layout its weight implies (Linear,
Embedding, Conv, fused or split weights, expert parameters) and reshapes it into ``A (*in,
r)`` and ``B (r, *out)`` of the weight's ``delta_eq`` (`_peft_layouts`); `linen_weight`
reads that layout off a linen tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxlora import _dora, _peft_files, _records, _targeting
from jaxlora import _peft_layouts as layouts
from jaxlora._config import LAYER_WEIGHTS
from jaxlora._peft_files import CONFIG_NAME, Factors
from jaxlora._peft_match import Plan
from jaxlora._tree import LoraAdapter, adapter_key, subtree


def _check_factor(
    factor: str, got: tuple[int, ...], want: tuple[int, ...], rank_axis: int, *, where: str
) -> None:
    """Raises unless a PEFT factor has the torch layout ``want``."""
    if got == want:
        return
    layout = "(r, in)" if factor == "A" else "(out, r)"
    if got == want[::-1]:
        why = "it looks transposed: PEFT files hold torch's (out, in) layout."
    elif len(got) == len(want) and all(
        g == w for d, (g, w) in enumerate(zip(got, want, strict=True)) if d != rank_axis
    ):
        why = (
            f"its rank {got[rank_axis]} disagrees with r={want[rank_axis]} that "
            f"{CONFIG_NAME} gives this layer (r / rank_pattern); the file and config differ."
        )
    else:
        why = "the adapter was trained for another base (other layer sizes)."
    raise ValueError(
        f"import_peft: {where}: lora_{factor} has shape {got}, expected {layout} = {want}; {why}"
    )


@dataclasses.dataclass(frozen=True)
class Weight:
    """A flax weight's shape and the ``delta_eq`` its adapter has (which axes are in, out)."""

    shape: tuple[int, ...]
    delta_eq: str


def _torch_flat(
    f: Factors, name: str, kind: str, shape: tuple[int, int, int], window, peft_config, where
) -> layouts.Flat:
    """The `Flat` adapter of torch module ``name`` whose flax side is ``(in, out, experts)``."""
    n_in, n_out, experts = shape
    rank = _peft_files.rank_of(peft_config, name)
    want_a, want_b = layouts.torch_shapes(kind, n_in, n_out, rank, experts, window)
    _check_factor("A", tuple(f.a.shape), want_a, 0, where=where)
    _check_factor("B", tuple(f.b.shape), want_b, 1, where=where)
    scale = _peft_files.scale_of(peft_config, name)
    return layouts.from_torch(kind, f.a, f.b, experts, scale, _magnitude(f, kind, n_out, where))


def _magnitude(f: Factors, kind: str, n_out: int, where: str) -> np.ndarray | None:
    """DoRA's magnitude of one torch module, checked: present for every DoRA adapter (and
    only then), ``(out,)``, on a Linear or Embedding (where PEFT and jaxlora both have DoRA)."""
    if f.magnitude is None:
        return None
    if kind not in (layouts.LINEAR, layouts.EMBEDDING):
        why = _dora.refusal(conv=kind == layouts.CONV, experts=kind == layouts.PARAMETER)
        raise ValueError(f"import_peft: {where}: the file has a DoRA adapter here, but {why}.")
    if tuple(f.magnitude.shape) != (n_out,):
        raise ValueError(
            f"import_peft: {where}: lora_magnitude_vector has shape {f.magnitude.shape}, "
            f"expected ({n_out},), one per output feature; the file was made for another base."
        )
    return f.magnitude


def factors(
    plan: Plan,
    plans: Sequence[Plan],
    weights: Mapping[str, Weight],
    by_name: Mapping[str, Factors],
    peft_config: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """jaxlora's ``(A, B, magnitude)`` of one planned weight (magnitude None unless DoRA),
    shapes checked against the file."""
    weight = weights[plan.path]
    n_in, n_out = layouts.flat_sizes(weight.delta_eq, weight.shape)
    experts = weight.shape[0] if layouts.stacked(weight.delta_eq, len(weight.shape)) else 0
    window = weight.shape[:-2] if plan.kind == layouts.CONV else ()
    where = f"layer {plan.path!r} ({', '.join(plan.sources)})"

    def flat(name: str, outputs: int) -> layouts.Flat:
        sizes = (n_in, outputs, experts)
        f = by_name[name]
        if (f.magnitude is not None) != bool(peft_config.get("use_dora")):
            has = "has" if f.magnitude is not None else "lacks"
            raise ValueError(
                f"import_peft: {where}: the file {has} a lora_magnitude_vector for {name!r} "
                f"but its {_peft_files.CONFIG_NAME} has use_dora={peft_config.get('use_dora')}; "
                "the file and config differ."
            )
        return _torch_flat(f, name, plan.kind, sizes, window, peft_config, where)

    if plan.block is None:
        parts = [flat(name, n_out // len(plan.sources)) for name in plan.sources]
        fused = layouts.concat_outputs(parts)
    else:  # one block of a torch weight fusing several flax weights' outputs
        blocks = sorted((p for p in plans if p.sources == plan.sources), key=lambda p: p.block)
        outs = [
            layouts.flat_sizes(weights[p.path].delta_eq, weights[p.path].shape)[1] for p in blocks
        ]
        fused = layouts.split_outputs(flat(plan.sources[0], sum(outs)), outs)[plan.block]
    return layouts.from_flat(fused, weight.delta_eq, weight.shape, where=where)


def linen_weight(plan: Plan, inner: Mapping[str, Any]) -> Weight:
    """The layout of a linen weight: from its adapter if it has one, else from its kind."""
    node = subtree(inner, plan.module)
    shape = tuple(_records.unmark(node[plan.weight_key]).shape)
    existing = node.get(adapter_key(plan.weight_key))
    if isinstance(existing, LoraAdapter):
        roles = _targeting.roles_of(existing.delta_eq, len(shape))
    elif plan.kind == layouts.CONV and len(shape) >= 3:
        roles = (_targeting.IN,) * (len(shape) - 1) + (_targeting.OUT,)
    elif plan.weight_key in LAYER_WEIGHTS and len(shape) == 2:
        roles = (_targeting.IN, _targeting.OUT)
    else:
        raise ValueError(
            f"import_peft: the file adapts {plan.path!r} {shape}, whose input and output axes "
            "jaxlora learns from how the model uses it. Adapt the params first (jaxlora.lorafy "
            f"with targets=[{plan.path!r}], any rank) and import into the adapted tree."
        )
    layout = _targeting.layout_of(shape, roles, plan.rank, embedding=plan.kind == layouts.EMBEDDING)
    return Weight(shape, layout.delta_eq)
