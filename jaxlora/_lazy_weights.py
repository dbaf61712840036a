"""How the traced program reads a weight stored quantized: dequantized where it is consumed.

The model's code never sees a `QuantizedArray`: jaxlora traces the model on the dense
shapes (`abstract`) and, when it evaluates the traced program (`_rewrite.call`), feeds
each quantized weight as a `Lazy` value: the stored arrays plus the re-views the program
applies to the weight (transpose, reshape, slice, a cast). The weight is dequantized only
inside the operation that consumes it (`bind`), recomputed in the backward pass rather than
kept as a residual (bitsandbytes' ``MatMul4Bit`` does the same): ``jax.checkpoint`` on GPU
and TPU, on CPU a custom VJP that also orders each dequantization after the layer's input
or cotangent (`_ordered`). One layer's dense weight exists at a time. A scan over stacked
layers steps the stored arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import _quantize
from jaxlora._quantize import QuantizedArray, is_quantized

CONTRACTIONS = ("dot_general", "ragged_dot_general", "conv_general_dilated", "gather")
_SUBPROGRAMS = ("jaxpr", "call_jaxpr", "branches", "fun_jaxpr", "body_jaxpr", "cond_jaxpr")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lazy:
    """A quantized weight on its way to the operation that consumes it.

    Attributes:
      q: the stored weight.
      ops: dense -> dense functions the program applied to the weight since, in order.
      aval: the abstract value the program expects here (shape, dtype).
    """

    q: QuantizedArray
    ops: tuple[Callable[[jax.Array], jax.Array], ...] = dataclasses.field(metadata={"static": True})
    aval: Any = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def ndim(self) -> int:
        return len(self.aval.shape)

    @property
    def dtype(self) -> Any:
        return self.aval.dtype

    def value(self) -> jax.Array:
        """The dense value the program expects (call only where it is consumed)."""
        w = _quantize.dequantize(self.q)
        for op in self.ops:
            w = op(w)
        return w


def abstract(tree: Any) -> Any:
    """``tree`` with each `QuantizedArray` replaced by its dense shape and dtype."""
    return jax.tree.map(
        lambda x: x.abstract() if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def lazy_leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` as the traced program takes them: a `Lazy` per quantized weight."""
    return [
        Lazy(x, (), jax.core.ShapedArray(x.shape, jnp.dtype(x.dtype))) if is_quantized(x) else x
        for x in jax.tree.leaves(tree, is_leaf=is_quantized)
    ]


def any_lazy(values: Sequence[Any]) -> bool:
    """Whether any of ``values`` is a `Lazy` weight."""
    return any(isinstance(x, Lazy) for x in values)


def materialize(x: Any) -> Any:
    """The dense value of a `Lazy` weight (for what is not a contraction); else ``x``."""
    return x.value() if isinstance(x, Lazy) else x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Stacked:
    """A quantized weight stacked over a scan's steps: its arrays, scanned over their leading
    axis, and the structure of one step's weight (its static fields included)."""

    arrays: list[Any]
    step: Any = dataclasses.field(metadata={"static": True})


def for_scan(x: Any) -> Any:
    """A scanned-over input as ``lax.scan`` can slice it: a quantized weight whose blocks do
    not run along the stacked axis goes in stored; anything else dense."""
    if not isinstance(x, Lazy):
        return x
    q = x.q
    if x.ops or q.axis == 0:
        return x.value()
    arrays, _ = jax.tree.flatten(q)
    step = dataclasses.replace(q, shape=q.shape[1:], axis=q.axis - 1 if q.axis > 0 else q.axis)
    return _Stacked(arrays, jax.tree.structure(step))


def from_scan(x: Any) -> Any:
    """One step's input of a scan: a `Lazy` weight for a `_Stacked` one."""
    if not isinstance(x, _Stacked):
        return x
    q = jax.tree.unflatten(x.step, x.arrays)
    return Lazy(q, (), jax.core.ShapedArray(q.shape, jnp.dtype(q.dtype)))


def returned(x: Any) -> Any:
    """An output of the program: a weight returned untouched (an NNX module's state) is the
    stored `QuantizedArray`; a `Lazy` value re-viewed on the way out is dense."""
    if isinstance(x, Lazy):
        return x.q if not x.ops else x.value()
    return x


def _after(q: QuantizedArray, t: Any) -> QuantizedArray:
    """``q`` whose arrays (codes, scales) wait for ``t``, an activation or a cotangent:
    adding ``0 · t[0]`` is a data dependency XLA keeps, where it drops optimization barriers
    on CPU. ``t`` with no floating array leaves ``q`` as it is."""
    floats = [x for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating) and x.size]
    if not floats:
        return q
    zero = 0.0 * jnp.nan_to_num(floats[0].reshape(-1)[0])  # exactly 0, even for inf or NaN
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), q)


def _ordered(apply: Callable[[list, QuantizedArray], list]) -> Callable[[list, Any], list]:
    """``apply`` whose weight is dequantized after its input in the forward pass and after
    the output's cotangent in the backward pass, so that one layer's dense weight exists at
    a time. XLA:CPU removes the optimization barriers of ``jax.checkpoint`` and then both
    merges the backward's dequantization with the forward's and schedules every layer's
    dequantization (which reads only weights) first: every dense weight was alive at the
    step's peak."""

    @jax.custom_vjp
    def run(others, q):
        return apply(others, _after(q, others))

    def forward(others, q):
        return run(others, q), (others, q)

    def backward(residuals, g):
        others, q = residuals
        _, vjp = jax.vjp(lambda o: apply(o, _after(q, g)), others)
        return (*vjp(g), None)

    run.defvjp(forward, backward)
    return run


def _contract(eqn: Any, invals: list, pos: int, bind: Callable) -> list:
    """The contraction with its weight dequantized inside, recomputed in the backward pass."""
    lazy = invals[pos]

    def apply(others, q):
        vals = list(others)
        vals.insert(pos, dataclasses.replace(lazy, q=q).value())
        return bind(eqn, vals)

    def rematerialized(others, q):
        return jax.checkpoint(apply, policy=jax.checkpoint_policies.nothing_saveable)(others, q)

    others = [x for i, x in enumerate(invals) if i != pos]
    return jax.lax.platform_dependent(others, lazy.q, cpu=_ordered(apply), default=rematerialized)


def _deferred(eqn: Any, invals: list, pos: int, bind: Callable) -> list:
    """The outputs of an operation on the weight alone, applied later, where it is consumed."""
    lazy = invals[pos]

    def op(i):
        def apply(w):
            vals = list(invals)
            vals[pos] = w
            return bind(eqn, vals)[i]

        return apply

    return [
        dataclasses.replace(lazy, ops=(*lazy.ops, op(i)), aval=v.aval)
        for i, v in enumerate(eqn.outvars)
    ]


def bind(eqn: Any, invals: list, bind: Callable[[Any, list], list]) -> list:
    """``bind(eqn, invals)`` where some of ``invals`` may be `Lazy` weights.

    A contraction consuming one such weight dequantizes it where it is consumed (`_contract`);
    any other operation taking one weight and no subprogram is deferred to the weight's
    consumer; anything else (two weights at once, a ``while``) gets the dense values.
    """
    lazy = [i for i, x in enumerate(invals) if isinstance(x, Lazy)]
    if not lazy:
        return bind(eqn, invals)
    if len(lazy) == 1 and eqn.primitive.name in CONTRACTIONS:
        return _contract(eqn, invals, lazy[0], bind)
    if len(lazy) == 1 and not any(k in eqn.params for k in _SUBPROGRAMS):
        return _deferred(eqn, invals, lazy[0], bind)
    return bind(eqn, [materialize(x) for x in invals])
