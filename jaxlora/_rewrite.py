"""LoRA where a weight is used: a rewrite of the model's traced program.

Why this mechanism: a model applies a weight however its authors wrote it — a Flax
layer, its own ``Einsum`` module with ``jnp.einsum(x, self.w)``, ``x @ E.T`` for a tied
head, a ``ragged_dot`` over experts — and behind ``nn.jit``, ``nn.scan`` at any axis,
``nn.remat``, ``share_scope`` or an NNX/linen bridge. All of these become the same few
primitives once traced. jaxlora traces the model's function with `jax.make_jaxpr` (no
FLOPs), follows each weight through the operations that only re-view it (`_views`),
and evaluates the program again with every contraction of an adapted weight followed by
the adapter's share (`_uses`). The weight itself is an input only: no ΔW is formed and
no weight gradient exists. Nested ``jit`` calls are inlined, ``remat`` is re-applied
around its rewritten body and ``scan`` is rebuilt with the factors of stacked weights
stepped alongside the weights. Unlike intercepting ``jnp.einsum`` in Python (Qwix),
this sees a weight that was transposed, reshaped or sliced before use, the ``@``
operator, and programs already cached by ``jit``.

`discover` runs the walk abstractly and reports, per weight, how it is used and what
could not be followed; `call` runs it with adapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
from jax import lax

from jaxlora import _lazy_weights, _mixed, _row_leaves, _rows, _uses
from jaxlora._views import Factors, Unsupported, View

_PASS_THROUGH = frozenset(
    {
        "convert_element_type",
        "copy",
        "copy_p",
        "sharding_constraint",
        "reshard",
        "mesh_cast",
        "reduce_precision",
        "pvary",
        "name",  # jax.ad_checkpoint.checkpoint_name
    }
)
_INLINED = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMAT = frozenset({"remat2", "checkpoint"})


@dataclasses.dataclass
class Seen:
    """What the walk saw of one weight.

    Attributes:
      shape: the weight's shape.
      uses: each contraction or lookup that consumes it.
      problems: why some use cannot carry an adapter (empty when all can).
    """

    shape: tuple[int, ...]
    uses: list[_uses.Use] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Walk:
    """State of one walk: what was seen, and (forward pass) LoRA dropout."""

    seen: dict[str, Seen]
    dropout: float = 0.0
    key: jax.Array | None = None
    counter: int = 0
    rows: Mapping[int, _rows.UseRows] | None = None  # a mixed batch's rows at each use
    batch: int = 0  # a mixed batch's number of rows

    def problem(self, view: View, what: str) -> None:
        self.seen[view.weight].problems.append(what)

    def next_key(self) -> jax.Array | None:
        self.counter += 1
        return None if self.key is None else jax.random.fold_in(self.key, self.counter)


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _bind_any(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """`_bind`, where a quantized weight is dequantized only in the operation consuming it."""
    return _lazy_weights.bind(eqn, list(invals), _bind)


def _dense(values: Sequence[Any]) -> list[Any]:
    return [_lazy_weights.materialize(x) for x in values]


def _view_op(eqn: Any, view: View) -> list[View]:
    """The views of an operation's outputs that only re-view its (single) weight operand."""
    name, p = eqn.primitive.name, eqn.params
    if name in _PASS_THROUGH:
        return [view]
    if name == "transpose":
        return [view.transpose(p["permutation"])]
    if name == "reshape":
        return [view.reshape(p["new_sizes"])]
    if name == "squeeze":
        return [view.squeeze(p["dimensions"])]
    if name == "broadcast_in_dim":
        return [view.expand(p["shape"], p["broadcast_dimensions"])]
    if name == "slice":
        return [view.slice(p["start_indices"], p["limit_indices"], p["strides"])]
    if name == "split":
        views, start, axis = [], 0, p["axis"]
        ndim = len(view.axes)
        for size in p["sizes"]:
            starts = [0] * ndim
            starts[axis] = start
            limits = list(view.shape)
            limits[axis] = start + size
            views.append(view.slice(starts, limits, None))
            start += size
        return views
    raise Unsupported(f"it is used by {name}, which is not a contraction")


def _use(walk: _Walk, eqn: Any, invals: list, views: list[View | None]) -> list[Any]:
    """A contraction or lookup of a weight: recorded, and adapted in the forward pass."""
    (out,) = _bind_any(eqn, invals)
    weights = [i for i, v in enumerate(views) if v is not None]
    name = eqn.primitive.name
    if len(weights) != 1 or (name == "gather" and weights != [0]):
        for i in weights:
            walk.problem(views[i], f"{name} takes it together with another weight or as indices")
        return [out]
    (pos,) = weights
    view = views[pos]
    try:
        geo = _uses.geometry(name, eqn.params, pos, invals[pos].ndim, out.ndim)
    except Unsupported as e:
        walk.problem(view, str(e))
        return [out]
    walk.seen[view.weight].uses.append(_uses.use_of(name, geo, view))
    if view.factors is None:
        return [out]
    if view.factors.mixed is not None:
        key = walk.next_key() if name != "gather" else None
        rows = None if walk.rows is None else walk.rows.get(id(eqn))
        return [_mixed.adapted_output(name, eqn.params, out, invals, pos, view, rows, key=key)]

    def rebind(x):  # the same operation on another input (DoRA)
        operands = list(invals)
        operands[1 - pos] = x
        return _bind_any(eqn, operands)[0]

    return [
        _uses.adapted_output(
            name,
            eqn.params,
            out,
            invals,
            pos,
            view,
            dropout=walk.dropout if view.factors.dropout else 0.0,
            key=walk.next_key() if name != "gather" else None,
            rebind=rebind,
        )
    ]


def _remat(walk: _Walk, eqn: Any, invals: list, views: list) -> tuple[list, list]:
    """``remat`` (``nn.remat``, ``jax.checkpoint``) re-applied around its rewritten body."""
    p = eqn.params
    adapted = [i for i, v in enumerate(views) if v is not None and v.factors is not None]

    def body(args, factors):
        inner = list(views)
        for i, arrays in zip(adapted, factors, strict=True):
            inner[i] = views[i].with_factors(arrays)
        outs, out_views = _eval(walk, p["jaxpr"], [], args, inner)
        for v in out_views:
            if v is not None:
                walk.problem(v, "it is returned from a rematerialised (remat) function")
        return _dense(outs)

    factors = [views[i].factors.arrays for i in adapted]
    outs = jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(invals, factors)
    return outs, [None] * len(outs)


def _scan(walk: _Walk, eqn: Any, invals: list, views: list) -> tuple[list, list]:
    """A scan rebuilt so that the factors of stepped weights are stepped with them."""
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    for v in views[n_consts : n_consts + n_carry]:
        if v is not None:
            walk.problem(v, "it is carried through a scan")
    step_views = list(views[: n_consts + n_carry])
    stepped = []
    for v in views[n_consts + n_carry :]:
        try:
            step_views.append(None if v is None else v.step())
        except Unsupported as e:
            walk.problem(v, str(e))
            step_views.append(None)
        else:
            stepped += [] if v is None or v.factors is None else v.leading_factors()
    keys = None if walk.key is None else jax.random.split(walk.next_key(), p["length"])
    closed = p["jaxpr"]

    def _stepped_adapter(i, v):
        return i >= n_consts + n_carry and v is not None and v.factors is not None

    def body(carry, xs):
        xs_vals, xs_factors, key = xs
        it = iter(xs_factors)
        views = [
            v.with_factors([next(it) for _ in v.factors.arrays]) if _stepped_adapter(i, v) else v
            for i, v in enumerate(step_views)
        ]
        inner = dataclasses.replace(walk, key=key, counter=0)
        xs_vals = [_lazy_weights.from_scan(x) for x in xs_vals]
        args = [*invals[:n_consts], *carry, *xs_vals]
        outs = _dense(_eval(inner, closed.jaxpr, closed.consts, args, views)[0])
        return outs[:n_carry], outs[n_carry:]

    xs = [_lazy_weights.for_scan(x) for x in invals[n_consts + n_carry :]]
    carry, ys = lax.scan(
        body,
        _dense(invals[n_consts : n_consts + n_carry]),
        (xs, stepped, keys),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    outs = [*carry, *ys]
    return outs, [None] * len(outs)


@contextlib.contextmanager
def _name_scopes(eqn: Any):
    """The scopes (module path) the equation was traced in, one `jax.named_scope` each."""
    parts = [p for p in str(eqn.source_info.name_stack).split("/") if p]
    with contextlib.ExitStack() as stack:
        for part in parts:
            stack.enter_context(jax.named_scope(part))
        yield


def _eval(
    walk: _Walk, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], views: Sequence
) -> tuple[list[Any], list[View | None]]:
    """Evaluates ``jaxpr`` with weight ``views`` on its inputs; returns outputs and views."""
    env: dict[Any, Any] = {}
    env_views: dict[Any, View] = {}
    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x, view in zip(jaxpr.invars, args, views, strict=True):
        env[v] = x
        if view is not None:
            env_views[v] = view
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        in_views = [None if isinstance(v, jcore.Literal) else env_views.get(v) for v in eqn.invars]
        # keep the module path in op names (profiles, HLO metadata), adapter ops included
        with _name_scopes(eqn):
            outs, out_views = _eval_eqn(walk, eqn, invals, in_views)
        for v, x, view in zip(eqn.outvars, outs, out_views, strict=True):
            if isinstance(v, jcore.DropVar):
                continue
            env[v] = x
            if view is not None:
                env_views[v] = view
    outs = [_read(env, v) for v in jaxpr.outvars]
    out_views = [None if isinstance(v, jcore.Literal) else env_views.get(v) for v in jaxpr.outvars]
    return outs, out_views


def _eval_eqn(walk: _Walk, eqn: Any, invals: list, views: list) -> tuple[list, list]:
    name = eqn.primitive.name
    row_wise = _row_leaves.any_row_wise(invals)  # a mixed batch's per-row leaf (_row_leaves)
    if row_wise and name not in _INLINED:
        if any(v is not None for v in views):
            _row_leaves.refuse(invals, f"{name} takes it together with a LoRA-adapted weight")
        if name in _REMAT or name in ("scan", "while", "cond"):
            _row_leaves.refuse(invals, f"it is used inside {name}")
        sub = next((eqn.params[k] for k in _rows.CALLS if k in eqn.params), None)
        if sub is not None:  # custom_jvp/vjp functions (relu, ...): their primal, inline
            return _eval(
                walk, getattr(sub, "jaxpr", sub), getattr(sub, "consts", ()), invals, views
            )
        use = None if walk.rows is None else walk.rows.get(id(eqn))
        outs = _row_leaves.bind(eqn, invals, use, walk.batch, _bind_any)
        return outs, [None] * len(outs)
    if all(v is None for v in views) and not _lazy_weights.any_lazy(invals) and not row_wise:
        outs = _bind(eqn, invals)
        return outs, [None] * len(outs)
    if name in _uses.CONTRACTIONS:
        return _use(walk, eqn, invals, views), [None]
    if name in _INLINED:
        closed = eqn.params["jaxpr"]
        return _eval(walk, closed.jaxpr, closed.consts, invals, views)
    if name in _REMAT:
        return _remat(walk, eqn, invals, views)
    if name == "scan":
        return _scan(walk, eqn, invals, views)
    outs = _bind_any(eqn, invals)
    weights = [v for v in views if v is not None]
    if not weights:  # a quantized weight without adapter, deferred or dequantized
        return outs, [None] * len(outs)
    if name in ("mul", "div") and len(weights) == 1 and views[0] is not None:
        factor = invals[1]
        if jnp.size(factor) == 1:  # a weight scaled by a constant: scale the adapter too
            factor = jnp.reshape(factor, ())
            return outs, [views[0].scaled(factor if name == "mul" else 1 / factor)]
    if name == "mul" and len(weights) == 1 and jnp.size(invals[0]) == 1:
        return outs, [views[1].scaled(jnp.reshape(invals[0], ()))]
    if len(views) == 1:
        try:
            return outs, _view_op(eqn, weights[0])
        except Unsupported as e:
            walk.problem(weights[0], str(e))
            return outs, [None] * len(outs)
    for v in weights:
        walk.problem(v, f"it is used by {name}, which is not a contraction")
    return outs, [None] * len(outs)


def _split_static(tree: Any) -> tuple[list, Any]:
    """Array leaves (traced) and everything else (closed over as static)."""

    def is_array(x):
        return isinstance(x, jax.Array | jax.ShapeDtypeStruct) or hasattr(x, "__array__")

    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [x if is_array(x) else None for x in leaves]
    static = [None if is_array(x) else x for x in leaves]
    return dynamic, (treedef, static)


def _join_static(dynamic: list, static: Any) -> Any:
    treedef, static_leaves = static
    leaves = [s if d is None else d for d, s in zip(dynamic, static_leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def weight_paths(tree: Any) -> list[str]:
    """The ``/``-joined dict-key path of every array leaf of ``tree`` (boxes see through)."""
    paths = []
    for key_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [
            k for k in key_path if isinstance(k, jax.tree_util.DictKey | jax.tree_util.SequenceKey)
        ]
        paths.append(
            "/".join(str(k.key if isinstance(k, jax.tree_util.DictKey) else k.idx) for k in keys)
        )
    return paths


def _trace(fn: Callable, weights: Any, args: tuple, kwargs: dict):
    dynamic, static = _split_static((args, kwargs))

    def run(weights, dynamic):
        call_args, call_kwargs = _join_static(dynamic, static)
        return fn(weights, *call_args, **call_kwargs)

    closed, out_shape = jax.make_jaxpr(run, return_shape=True)(weights, dynamic)
    inputs = list(jax.tree.leaves((weights, dynamic)))
    return closed, inputs, jax.tree.structure(out_shape), len(jax.tree.leaves(weights))


def discover(fn: Callable, weights: Any, args: tuple, kwargs: dict) -> dict[str, Seen]:
    """How ``fn(weights, *args, **kwargs)`` uses each array of ``weights``.

    Args:
      fn: the model's function, e.g. ``model.apply``.
      weights: the tree of weights (params or a variables dict); its paths name them.
      args, kwargs: example arguments (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      ``{path: Seen}`` for every weight that reaches a contraction or lookup.
    """
    weights = _lazy_weights.abstract(weights)
    closed, inputs, _, n_weights = _trace(fn, weights, args, kwargs)
    paths = weight_paths(weights)
    leaves = jax.tree.leaves(weights)
    seen = {p: Seen(tuple(x.shape)) for p, x in zip(paths, leaves, strict=True)}
    views = [View.of(p, x.shape) for p, x in zip(paths, leaves, strict=True)]
    views += [None] * (len(inputs) - n_weights)
    walk = _Walk(seen)
    jax.eval_shape(lambda xs: _eval(walk, closed.jaxpr, closed.consts, xs, views)[0], inputs)
    return {p: s for p, s in seen.items() if s.uses}


def call(
    fn: Callable,
    weights: Any,
    adapters: Mapping[str, Factors],
    args: tuple,
    kwargs: dict,
    *,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    applied: dict[str, int] | None = None,
    batch_rows: int | None = None,
    row_leaves: Mapping[str, jax.Array] | None = None,
) -> Any:
    """``fn(weights, *args, **kwargs)`` with each adapter added where its weight is used.

    Args:
      fn: the model's function.
      weights: the tree of (frozen) weights.
      adapters: weight path -> its factors.
      args, kwargs: the call's arguments.
      dropout: LoRA dropout rate.
      key: PRNG key for LoRA dropout (None: no dropout).
      applied: if given, each adapter's number of uses in this call is added to it.
      batch_rows: for a batch mixing adapters (factors with `_mixed.MixedRows`), its number
        of rows: the inputs whose leading axis has that size hold the rows there.
      row_leaves: for a batch mixing adapters, weight path -> ``(batch_rows, *shape)``:
        the weights that differ per row, each row's own value (`_row_leaves`).

    Returns:
      What ``fn`` returns.
    """
    stored = weights
    weights = _lazy_weights.abstract(weights)
    closed, inputs, out_tree, n_weights = _trace(fn, weights, args, kwargs)
    inputs[:n_weights] = _lazy_weights.lazy_leaves(stored)
    paths = weight_paths(weights)
    for i, p in enumerate(paths):
        if p in (row_leaves or {}):
            inputs[i] = _row_leaves.RowWise(p, row_leaves[p])
    leaves = jax.tree.leaves(weights)
    views: list[View | None] = [
        View.of(p, x.shape, adapters[p]) if p in adapters else None
        for p, x in zip(paths, leaves, strict=True)
    ]
    views += [None] * (len(inputs) - n_weights)
    seen = {p: Seen(tuple(x.shape)) for p, x in zip(paths, leaves, strict=True) if p in adapters}
    rows = None
    if batch_rows is not None:
        arg_rows = _rows.input_rows([x.shape for x in inputs[n_weights:]], batch_rows)
        rows = _rows.analyse(closed.jaxpr, [None] * n_weights + arg_rows, batch_rows)
    walk = _Walk(seen, dropout=dropout, key=key, rows=rows, batch=batch_rows or 0)
    outs, _ = _eval(walk, closed.jaxpr, closed.consts, inputs, views)
    if _row_leaves.any_row_wise(outs):
        _row_leaves.refuse(outs, "the model returns it without applying it to the batch")
    outs = [_lazy_weights.returned(x) for x in outs]
    for path, s in seen.items():
        if s.problems:
            why = s.problems[0]
            raise ValueError(
                f"LoRA on weight {path!r} could not be applied: {why}. Adapt the params "
                "again with jaxlora.lorafy on this model and these inputs."
            )
        if applied is not None:
            applied[path] = applied.get(path, 0) + len(s.uses)
    return jax.tree.unflatten(out_tree, outs)


def stream_key(key: jax.Array, name: str) -> jax.Array:
    """A key for LoRA dropout derived from the model's own dropout key."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()))
