"""Where the batch's rows are in every value of a traced program: for mixed-adapter batches.

In a batch whose rows use different adapters, each contraction of an adapted weight must
apply every row's own factors, so it must know which axis of its input holds the rows.
This pass follows the rows from the model's inputs (their leading axis) through the
program: elementwise operations keep them, transposes and broadcasts move them, a
reshape may merge them with the axes after them (tokens flattened with their row), a
reduction or slice over other axes keeps them. An operation that mixes rows (a
contraction or reduction over them, a sort of all tokens as in a mixture of experts, a
scatter) loses them: a use whose input lost its rows is refused by name, never guessed.

A value's rows are `Rows(axis, inner)`: along ``axis``, position ``i`` belongs to row
``(i // inner) % batch``. ``inner`` > 1 where tokens were flattened with their row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.extend.core as jcore


@dataclasses.dataclass(frozen=True)
class Rows:
    """The axis carrying the batch rows, and how many consecutive positions each row holds."""

    axis: int
    inner: int = 1


class _Lost:
    """A value that depends on the rows in a way that cannot be followed."""

    def __init__(self, why: str):
        self.why = why

    def __repr__(self) -> str:
        return f"lost({self.why})"


RowInfo = Rows | _Lost | None  # None: the value does not depend on the rows at all

_ELEMENTWISE_NAMES = """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp conj
    convert_element_type copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor
    ge gt imag integer_pow is_finite le lgamma digamma log log1p logistic lt max min mul ne
    neg nextafter not or pow real reduce_precision rem round rsqrt select_n sign sin sinh
    sqrt square stop_gradient sub tan tanh xor shift_left shift_right_arithmetic
    shift_right_logical population_count sharding_constraint reshard mesh_cast pvary name
    optimization_barrier"""
_ELEMENTWISE = frozenset(_ELEMENTWISE_NAMES.split())
CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # the params holding a call's jaxpr
_REDUCTION_NAMES = """reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or
    reduce_xor argmax
    argmin"""
_REDUCTIONS = frozenset(_REDUCTION_NAMES.split())
_CUMULATIVE = frozenset(["cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"])


@dataclasses.dataclass(frozen=True)
class UseRows:
    """The rows of one operation's operands and of its output."""

    operands: tuple[RowInfo, ...]
    out: RowInfo


def _merge(infos: Sequence[RowInfo], what: str) -> RowInfo:
    """The rows of a value computed position by position from values with ``infos``."""
    found = [i for i in infos if i is not None]
    lost = [i for i in found if isinstance(i, _Lost)]
    if lost:
        return lost[0]
    if not found:
        return None
    if any(i != found[0] for i in found):
        return _Lost(f"{what} combines values whose rows lie on different axes")
    return found[0]


def _reshape(rows: Rows, old: Sequence[int], new: Sequence[int], batch: int) -> RowInfo:
    stride = rows.inner * math.prod(old[rows.axis + 1 :])
    for k in range(len(new)):
        after = math.prod(new[k + 1 :])
        if stride % after == 0 and new[k] % (stride // after * batch) == 0:
            return Rows(k, stride // after)
    return _Lost(f"a reshape to {tuple(new)} splits the batch rows")


def _dot(eqn: Any, infos: Sequence[RowInfo], shapes: Sequence[Sequence[int]]) -> RowInfo:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nb = len(lb)
    lfree = [d for d in range(len(shapes[0])) if d not in lc and d not in lb]
    rfree = [d for d in range(len(shapes[1])) if d not in rc and d not in rb]
    outs = []
    for info, contract, batch, free, offset in (
        (infos[0], lc, lb, lfree, nb),
        (infos[1], rc, rb, rfree, nb + len(lfree)),
    ):
        if not isinstance(info, Rows):
            outs.append(info)
        elif info.axis in contract:
            outs.append(_Lost("a contraction sums over the batch rows"))
        elif info.axis in batch:
            outs.append(Rows(list(batch).index(info.axis), info.inner))
        else:
            outs.append(Rows(offset + free.index(info.axis), info.inner))
    return _merge(outs, "a contraction")


def _gather(eqn: Any, infos: Sequence[RowInfo], shapes: Sequence[Sequence[int]]) -> RowInfo:
    operand, indices = infos
    dn = eqn.params["dimension_numbers"]
    out_ndim = len(eqn.outvars[0].aval.shape)
    if isinstance(operand, Rows) and indices is None:
        dim = operand.axis
        kept = [d for d in range(len(shapes[0])) if d not in dn.collapsed_slice_dims]
        if dim in dn.start_index_map or eqn.params["slice_sizes"][dim] != shapes[0][dim]:
            return _Lost("a gather indexes the batch rows")
        if dim not in kept or dn.operand_batching_dims:
            return _Lost("a gather indexes the batch rows")
        return Rows(dn.offset_dims[kept.index(dim)], operand.inner)
    if isinstance(indices, Rows) and operand is None:
        index_dims = list(range(len(shapes[1]) - 1))  # the last axis holds the coordinates
        if indices.axis not in index_dims or dn.operand_batching_dims:
            return _Lost("a gather takes the batch rows as index coordinates")
        batch_out = [d for d in range(out_ndim) if d not in dn.offset_dims]
        return Rows(batch_out[index_dims.index(indices.axis)], indices.inner)
    return _merge([operand, indices], "a gather")


def _simple(eqn: Any, infos: Sequence[RowInfo], shapes, batch: int) -> list[RowInfo]:
    """Rows of the outputs of one (non-call) equation."""
    name, p = eqn.primitive.name, eqn.params
    n_out = len(eqn.outvars)
    if all(i is None for i in infos):
        return [None] * n_out
    lost = next((i for i in infos if isinstance(i, _Lost)), None)
    if lost is not None:
        return [lost] * n_out
    out_shapes = [tuple(v.aval.shape) for v in eqn.outvars]
    first = next((i, s) for i, s in zip(infos, shapes, strict=True) if i is not None)
    rows, shape = first
    if name in _ELEMENTWISE:
        if name == "optimization_barrier":
            return list(infos)
        # operands may broadcast their size-1 axes against each other, never the rows
        if any(
            len(s) != len(o) or s[i.axis] != o[i.axis]
            for i, s in zip(infos, shapes, strict=True)
            if isinstance(i, Rows)
            for o in out_shapes
        ):
            return [_Lost(f"{name} changes the shape of the rows")] * n_out
        return [_merge(infos, name)] * n_out
    out: RowInfo
    if name == "broadcast_in_dim":
        dim = p["broadcast_dimensions"][rows.axis]
        out = Rows(dim, rows.inner)
    elif name == "transpose":
        out = Rows(list(p["permutation"]).index(rows.axis), rows.inner)
    elif name == "reshape":
        out = _reshape(rows, shape, p["new_sizes"], batch)
    elif name == "squeeze":
        dims = [d % len(shape) for d in p["dimensions"]]
        out = Rows(rows.axis - sum(d < rows.axis for d in dims), rows.inner)
    elif name in _REDUCTIONS:
        axes = list(p["axes"])
        if rows.axis in axes:
            out = _Lost(f"{name} reduces over the batch rows")
        else:
            out = Rows(rows.axis - sum(d < rows.axis for d in axes), rows.inner)
    elif name in _CUMULATIVE or name in ("sort", "split", "rev", "top_k", "approx_top_k"):
        along = {
            "sort": [p.get("dimension")],
            "split": [p.get("axis")],
            "rev": list(p.get("dimensions", ())),
            "top_k": [len(shape) - 1],
            "approx_top_k": [p.get("reduction_dimension", -1)],
        }.get(name, [p.get("axis")])
        if rows.axis in [a % len(shape) for a in along if a is not None]:
            return [_Lost(f"{name} runs along the batch rows")] * n_out
        return [_merge(infos, name) if "top_k" not in name else rows] * n_out
    elif name in ("slice", "dynamic_slice", "pad", "dynamic_update_slice", "concatenate"):
        merged = _merge(infos, name)
        if not isinstance(merged, Rows) or any(
            s[merged.axis] != shape[merged.axis] for s in out_shapes
        ):
            return [_Lost(f"{name} cuts along the batch rows")] * n_out
        out = merged
    elif name == "tile":  # a repeat keeps each position's row: (i // inner) % batch
        out = rows
    elif name == "stack":
        merged = _merge(infos, name)
        if not isinstance(merged, Rows):
            return [merged] * n_out
        out = Rows(merged.axis + (p["axis"] <= merged.axis), merged.inner)
    elif name == "dot_general":
        out = _dot(eqn, infos, shapes)
    elif name == "gather":
        out = _gather(eqn, infos, shapes)
    else:
        return [_Lost(f"{name} is not followed by jaxlora's row tracking")] * n_out
    return [out] * n_out


class _Analysis:
    def __init__(self, batch: int):
        self.batch = batch
        self.uses: dict[int, UseRows] = {}
        self.record = True

    def run(self, jaxpr: Any, infos: Sequence[RowInfo]) -> list[RowInfo]:
        env: dict[Any, RowInfo] = {}
        for v, info in zip(jaxpr.invars, infos, strict=True):
            env[v] = info

        def read(v):
            return None if isinstance(v, jcore.Literal) else env.get(v)

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, info in zip(eqn.outvars, outs, strict=True):
                env[v] = info
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[RowInfo]) -> list[RowInfo]:
        name, p = eqn.primitive.name, eqn.params
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
        if all(i is None for i in ins):
            return [None] * len(eqn.outvars)
        if name == "scan":
            return self.scan(eqn, ins)
        if name in ("while", "cond"):
            return [_Lost(f"{name} is not followed by jaxlora's row tracking")] * len(eqn.outvars)
        sub = next((p[k] for k in CALLS if k in p), None)
        if sub is not None:
            inner = getattr(sub, "jaxpr", sub)
            return self.run(inner, ins)
        outs = _simple(eqn, ins, shapes, self.batch)
        if name in ("ragged_dot_general", "conv_general_dilated"):
            outs = [self._other(eqn, ins)]
        self._note(eqn, UseRows(tuple(ins), outs[0]))
        scope = str(eqn.source_info.name_stack)
        if scope and not any(isinstance(i, _Lost) for i in ins):  # say where rows got lost
            outs = [_Lost(f"{o.why} (in {scope})") if isinstance(o, _Lost) else o for o in outs]
        return outs

    def _other(self, eqn: Any, ins: list[RowInfo]) -> RowInfo:
        """Rows of a ragged_dot or convolution: its input's leading axis is the batch."""
        x = ins[0]
        if eqn.primitive.name == "conv_general_dilated" and isinstance(x, Rows):
            lhs_batch = eqn.params["dimension_numbers"].lhs_spec[0]
            out_batch = eqn.params["dimension_numbers"].out_spec[0]
            if x.axis == lhs_batch and x.inner == 1:
                return Rows(out_batch)
        if x is None and all(i is None for i in ins):
            return None
        return _Lost(f"{eqn.primitive.name} mixes the tokens of different rows")

    def _note(self, eqn: Any, use: UseRows) -> None:
        if not self.record:
            return
        old = self.uses.get(id(eqn))
        if old is not None and old != use:
            use = UseRows(use.operands, _Lost("it is reached with its rows on different axes"))
        self.uses[id(eqn)] = use

    def scan(self, eqn: Any, ins: list[RowInfo]) -> list[RowInfo]:
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        xs = []
        for info in ins[nc + nk :]:
            if isinstance(info, Rows):
                info = (
                    _Lost("a scan steps over the batch rows")
                    if info.axis == 0
                    else Rows(info.axis - 1, info.inner)
                )
            xs.append(info)
        carry = list(ins[nc : nc + nk])
        body = p["jaxpr"].jaxpr
        record, self.record = self.record, False
        for _ in range(3):  # the carry's rows settle within a step or two
            outs = self.run(body, [*ins[:nc], *carry, *xs])
            new = [_merge([c, o], "a scan carry") for c, o in zip(carry, outs[:nk], strict=True)]
            if new == carry:
                break
            carry = new
        self.record = record
        outs = self.run(body, [*ins[:nc], *carry, *xs])
        ys = [Rows(o.axis + 1, o.inner) if isinstance(o, Rows) else o for o in outs[nk:]]
        return [*carry, *ys]


def analyse(jaxpr: Any, inputs: Sequence[RowInfo], batch: int) -> Mapping[int, UseRows]:
    """The rows at every operation of ``jaxpr`` that takes them, keyed by ``id(eqn)``.

    Contractions and lookups of adapted weights read them (`_mixed`), and so does every
    operation on a leaf that differs per row (`_row_leaves`).

    Args:
      jaxpr: the (open) jaxpr of the model's function.
      inputs: the rows of each of its inputs (None for weights and row-free inputs).
      batch: the number of rows.

    Returns:
      ``{id(eqn): UseRows}`` for the equations of ``jaxpr`` and every jaxpr inside it
      (those with no input depending on the rows are left out).
    """
    analysis = _Analysis(batch)
    analysis.run(jaxpr, inputs)
    return analysis.uses


def input_rows(shapes: Sequence[Sequence[int]], batch: int) -> list[RowInfo]:
    """The model's inputs whose leading axis has ``batch`` entries hold the rows there."""
    return [Rows(0) if len(s) and s[0] == batch else None for s in shapes]


def why_lost(info: RowInfo) -> str:
    """Why a use's input has no row axis to apply per-row adapters along."""
    if isinstance(info, _Lost):
        return info.why
    return "its input does not depend on the batch's rows"
