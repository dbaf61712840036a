"""Which weights get adapters, and how each adapter is laid out: shared by linen and NNX.

A weight is a candidate when the traced model consumes it in a contraction or an
embedding lookup (`_rewrite.discover`). Its adapter layout follows from its uses: the
weight axes contracted with the input go to A, the axes kept in the output go to B, and
axes that are batched (experts) or indexed away (scanned layers, ``W[0]``) are stacked
in both. A weight used in a way the adapter cannot follow is a candidate that cannot be
adapted, with the reason, so that `summary` reports it and naming it is an error.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping, Sequence

from jaxlora import _layout
from jaxlora._config import (
    ALL_LINEAR,
    LoraConfig,
    adapter_name,
    format_paths,
    path_matches,
    target_paths,
)
from jaxlora._rewrite import Seen

IN, OUT, STACK = "in", "out", "stack"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A weight consumed by a contraction or lookup.

    Attributes:
      name: the adapter's name: the module path for a ``kernel``/``embedding`` weight, the
        weight's own path otherwise (``"layers/0/attn/q_proj/w"``).
      module: the path of the module (params dict) holding the weight.
      weight: the weight's key in that module.
      shape: the weight's shape.
      embedding: whether it is looked up by row (an embedding table).
      roles: per weight axis, ``"in"``, ``"out"`` or ``"stack"``; None if it cannot be adapted.
      reason: why it cannot be adapted ("" if it can).
      uses: how many operations of the traced model consume it (0: not traced).
      conv: whether a convolution consumes it.
      experts: whether a ``ragged_dot`` consumes it (a mixture of experts' weight).
    """

    name: str
    module: str
    weight: str
    shape: tuple[int, ...]
    embedding: bool
    roles: tuple[str, ...] | None
    reason: str = ""
    uses: int = 0
    conv: bool = False
    experts: bool = False

    def paths(self) -> tuple[str, ...]:
        """The paths a pattern is matched against (see `target_paths`)."""
        return target_paths(self.name, self.weight)

    def matches(self, pattern: str) -> bool:
        """Whether ``pattern`` (see `path_matches`) names this weight or its module."""
        return any(path_matches(p, pattern) for p in self.paths())

    def layout(self, config: LoraConfig) -> _layout.Layout:
        """The adapter layout at the rank ``config`` gives this weight (see `layout_of`).

        Raises:
          ValueError: the rank exceeds what the weight's fan-in or fan-out allows.
        """
        rank = config.rank_for(self.paths())
        layout = layout_of(self.shape, self.roles, rank, embedding=self.embedding)
        if rank > min(layout.fan_in, layout.fan_out):
            raise ValueError(
                f"lorafy: rank {rank} for layer {self.name!r} exceeds min(fan_in="
                f"{layout.fan_in}, fan_out={layout.fan_out}) of its weight {self.shape}; use a "
                f"smaller rank, or rank_pattern={{{self.name.rsplit('/', 1)[-1]!r}: ...}}."
            )
        return layout


def _roles(seen: Seen) -> tuple[str, ...]:
    """Axis roles from the uses of one weight; ValueError naming what does not fit."""
    if seen.problems:
        raise ValueError(seen.problems[0])
    lookups = [u for u in seen.uses if u.op == "gather"]
    first = (lookups or seen.uses)[0]
    ins, outs = set(first.contracted), set(first.free)
    stack = set(first.batch) | set(first.fixed)
    for use in seen.uses:
        sides = {frozenset(use.contracted), frozenset(use.free)}
        if sides != {frozenset(ins), frozenset(outs)} or set(use.batch) | use.fixed != stack:
            raise ValueError(
                f"its uses disagree on which axes are inputs: {use.op} contracts axes "
                f"{sorted(use.contracted)} where another use contracts {sorted(ins)}"
            )
    if not ins or not outs:
        raise ValueError("a contraction over all of its axes leaves no output axis for B")
    return tuple(IN if d in ins else OUT if d in outs else STACK for d in range(len(seen.shape)))


def roles_of(delta_eq: str, ndim: int) -> tuple[str, ...]:
    """Axis roles of a weight of ``ndim`` axes from an adapter's ``delta_eq``."""
    a, b, kernel = _layout.delta_labels(delta_eq)
    lead = ndim - len(kernel)
    own = tuple(STACK if c in a and c in b else IN if c in a else OUT for c in kernel)
    return (STACK,) * lead + own


def candidates(seen: Mapping[str, Seen], *, root: str = "") -> list[Candidate]:
    """Every weight seen in a contraction or lookup, adaptable or not.

    Args:
      seen: `_rewrite.discover` output, keyed by weight path.
      root: a leading path component to drop (``"params"`` for a linen variables dict).
    """
    found = []
    for path, s in seen.items():
        rel = path[len(root) + 1 :] if root and path.startswith(root + "/") else path
        module, _, weight = rel.rpartition("/")
        try:
            roles, reason = _roles(s), ""
        except ValueError as e:
            roles, reason = None, str(e)
        embedding = any(u.op == "gather" for u in s.uses)
        conv = any(u.op == "conv_general_dilated" for u in s.uses)
        experts = any(u.op == "ragged_dot_general" for u in s.uses)
        name = adapter_name(module, weight)
        found.append(
            Candidate(
                name, module, weight, s.shape, embedding, roles, reason, len(s.uses), conv, experts
            )
        )
    return found


def layout_of(
    shape: Sequence[int], roles: Sequence[str], rank: int, *, embedding: bool = False
) -> _layout.Layout:
    """An adapter layout from the roles of a weight's axes.

    Leading stacked axes (scanned layers) are written ``...`` in ``delta_eq``, as for
    Flax's layers; stacked axes elsewhere (a layer axis at position 1, experts after the
    input axis) get their own labels in A, B and the kernel.

    Args:
      shape: the stored weight shape.
      roles: per axis, ``"in"``, ``"out"`` or ``"stack"``.
      rank: adapter rank.
      embedding: whether the weight is an embedding table (A drawn from N(0, 1)).

    Returns:
      The `Layout` (its ``kernel_shape`` omits the leading stacked axes).
    """
    lead = next((d for d, role in enumerate(roles) if role != STACK), len(roles))
    letters = iter(string.ascii_letters.replace("r", ""))
    label = {d: next(letters) for d in range(lead, len(roles))}

    def pick(role):
        return "".join(label[d] for d in range(lead, len(roles)) if roles[d] == role)

    stack, ins, outs = pick(STACK), pick(IN), pick(OUT)
    kernel = "".join(label.values())
    size = {label[d]: shape[d] for d in label}
    a_labels, b_labels = f"{stack}{ins}r", f"{stack}r{outs}"
    return _layout.Layout(
        kind=_layout.EMBED if embedding else _layout.LINEAR,
        kernel_shape=tuple(shape[lead:]),
        a_shape=tuple(rank if c == "r" else size[c] for c in a_labels),
        b_shape=tuple(rank if c == "r" else size[c] for c in b_labels),
        fan_in=math.prod(size[c] for c in ins),
        fan_out=math.prod(size[c] for c in outs),
        delta_eq=f"...{a_labels},...{b_labels}->...{kernel}",
    )


def select(config: LoraConfig, found: Sequence[Candidate], *, who: str = "lorafy") -> list:
    """The candidates ``config`` adapts; errors for patterns that match nothing.

    ``"all-linear"`` takes every adaptable weight that is not an embedding; a pattern
    takes what it names. A named weight that cannot be adapted is an error with the
    reason; so is a target, exclude, rank or alpha pattern that matches no weight.

    Returns:
      The selected candidates, in the order found.
    """
    listing = format_paths(sorted(f"{c.name}  {c.shape}" for c in found))
    if not found:
        raise ValueError(f"{who}: the model consumes no weight in a contraction or lookup.")
    named = [p for p in config.targets if p != ALL_LINEAR]
    for field, patterns in (("targets", named), ("exclude", config.exclude)):
        for pattern in patterns:
            if not any(c.matches(pattern) for c in found):
                raise ValueError(
                    f"{who}: {field} pattern {pattern!r} matches no layer or weight (a "
                    f"misspelling?). Layers and weights that can be targeted:\n{listing}"
                )
    selected = []
    for c in found:
        if any(c.matches(p) for p in config.exclude):
            continue
        by_name = any(c.matches(p) for p in named)
        if not by_name and not (ALL_LINEAR in config.targets and not c.embedding):
            continue
        if c.roles is None:
            if by_name:
                raise ValueError(
                    f"{who}: weight {c.name!r} {c.shape} cannot be adapted: {c.reason}."
                )
            continue
        selected.append(c)
    if not selected and config.targets:  # targets=[]: only token rows train
        raise ValueError(
            f"{who}: targets {list(config.targets)} (exclude {list(config.exclude)}) match no "
            f"weight that can be adapted. Weights:\n{listing}"
        )
    for field, table in (
        ("rank_pattern", config.rank_pattern),
        ("alpha_pattern", config.alpha_pattern),
    ):
        for pattern in table:
            if not any(c.matches(pattern) for c in selected):
                raise ValueError(
                    f"{who}: {field} key {pattern!r} matches no adapted weight. Adapted:\n"
                    f"{format_paths([c.name for c in selected])}"
                )
    return selected


def not_adapted(found: Sequence[Candidate], selected: Sequence[Candidate]) -> dict[str, str]:
    """``{name: why}`` for every candidate left without an adapter."""
    chosen = {c.name for c in selected}
    return {
        c.name: c.reason or ("embedding: name it in targets" if c.embedding else "not targeted")
        for c in found
        if c.name not in chosen
    }
