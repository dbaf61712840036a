"""Training only the adapters: a masked optimizer and a jitted step over the trainable leaves."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxlora._config import format_paths
from jaxlora._sharding import place_on_mesh_of
from jaxlora._tree import PyTree, combine, path_str, split, trainable_mask

TRAINABLE, FROZEN = "trainable", "frozen"

# The full mask of each `optimizer`, by its update function, for `make_train_step` to check.
_OPTIMIZER_MASKS: weakref.WeakKeyDictionary[Callable[..., Any], PyTree] = (
    weakref.WeakKeyDictionary()
)


def _full_mask(mask: PyTree, params: PyTree) -> PyTree:
    """``mask`` with each leaf of a prefix mask repeated over its subtree of ``params``."""
    try:
        return jax.tree.map(lambda m, x: jax.tree.map(lambda _: m, x), mask, params)
    except ValueError as e:
        raise ValueError(
            "jaxlora.optimizer: the mask does not fit params (it is neither their "
            f"structure nor a prefix of it): {str(e).splitlines()[0]} Build it from "
            "jaxlora.trainable_mask(params), e.g. with jax.tree.map."
        ) from e


def _check_same_tree(labels: PyTree, params: PyTree) -> None:
    """Refuses to initialise an `optimizer` on another tree than it was made for."""
    if jax.tree.structure(labels) == jax.tree.structure(params):
        return
    made, given = set(_leaf_paths(labels, bool)), set(_leaf_paths(params, lambda _: True))
    differences = [f"{k}: not in the params the optimizer was made for" for k in given - made]
    differences += [f"{k}: missing" for k in made - given]
    raise ValueError(
        "jaxlora.optimizer: init got params of another tree than the optimizer was made "
        "for:\n"
        + format_paths(sorted(differences) or ["same leaves, other adapter scales (alpha/rank)"])
        + "\nMake the optimizer and its state from the same params: "
        "tx = jaxlora.optimizer(tx, params); opt_state = tx.init(params)."
    )


def _leaf_paths(tree: PyTree, keep: Callable[[Any], bool]) -> list[str]:
    return [path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(tree) if keep(x)]


def _check_loss_output(out: Any, has_aux: bool) -> None:
    """Raises if ``loss_fn``'s output is not what ``has_aux`` says (checked when tracing)."""
    pair = isinstance(out, (tuple, list))
    if has_aux and not (pair and len(out) == 2):
        got = f"a {type(out).__name__} of {len(out)}" if pair else _describe(out)
        raise TypeError(
            f"make_train_step(has_aux=True): loss_fn returned {got}, not a (loss, aux) "
            "pair. Return (loss, aux), or make the step with has_aux=False."
        )
    if not has_aux and pair:
        raise TypeError(
            f"make_train_step(has_aux=False): loss_fn returned a {type(out).__name__} of "
            f"{len(out)}, not a scalar loss. If it is (loss, aux), make the step with "
            "has_aux=True; else return the loss alone."
        )
    loss = out[0] if has_aux else out
    if getattr(loss, "shape", None) != ():
        raise TypeError(
            f"make_train_step: loss_fn's loss is {_describe(loss)}, not a scalar; reduce "
            "it to one number (e.g. jnp.mean over the batch)."
        )


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    if shape is None:
        return f"a {type(x).__name__}"
    return f"an array of shape {tuple(shape)}"


def _check_something_trains(mask: PyTree, who: str) -> None:
    if not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"{who}: these params hold nothing that trains (no LoRA adapter and no "
            "Trainable leaf; merged params, for instance), so every step would change "
            "nothing. Pass the adapted tree from jaxlora.lorafy (or load_adapter / "
            "import_peft), unmerged."
        )


def _check_tx(tx: Any, who: str) -> None:
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"{who}: tx is a {type(tx).__name__}, not an optax transformation; pass one "
            "such as optax.adamw(1e-4)."
        )


def optimizer(
    tx: optax.GradientTransformation, params: PyTree, mask: PyTree | None = None
) -> optax.GradientTransformation:
    """Wraps ``tx`` so it updates only the trainable leaves of an adapted tree.

    Built on ``optax.partition``: trainable leaves go to ``tx``, frozen leaves to
    ``optax.set_to_zero()``, which holds no state. For Adam that is exactly two floats
    per trainable parameter (plus the step count).

    Args:
      tx: any optax transformation, e.g. ``optax.adamw(1e-4)``.
      params: the adapted tree from `lorafy` (only its structure is read).
      mask: optional static bool tree (default `trainable_mask(params)`): one bool per
        leaf, or a prefix of ``params`` whose bools hold for whole subtrees.

    Raises:
      TypeError: ``tx`` is not an optax transformation.
      ValueError: nothing in ``params`` trains (e.g. merged params), or a mask that does
        not fit ``params``.

    Returns:
      A transformation to ``init`` with the adapted params and to pass to
      `make_train_step`. It also works on full-tree gradients, zeroing frozen updates.
      On sharded params, ``init`` gives each moment its param's sharding and replicates
      the step counts over the params' mesh.
    """
    _check_tx(tx, "jaxlora.optimizer")
    mask = trainable_mask(params) if mask is None else _full_mask(mask, params)
    split(params, mask)  # validates the mask
    _check_something_trains(mask, "jaxlora.optimizer")
    labels = jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)
    inner = optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)

    def init(params):
        _check_same_tree(labels, params)
        return place_on_mesh_of(params, inner.init(params))

    _OPTIMIZER_MASKS[inner.update] = mask
    return inner._replace(init=init)


@dataclasses.dataclass(frozen=True)
class _TrainStep:
    """A compiled step over ``(trainable, frozen, opt_state, batch, *args)``, called on params.

    The frozen part is an input of the compiled program but never an output, so it is
    neither copied nor donated: the caller's base arrays stay valid and come back as they
    were passed, and only the adapters and optimizer state are written. The trainable mask
    depends on the tree structure only, so it is computed once per structure: each call
    then costs one flatten and one unflatten on the host.

    Attributes:
      jitted: the compiled step.
      tx: the transformation the step applies (``optax.apply_if_finite`` around the one
        given to `make_train_step` with ``skip_nonfinite``).
      skip_nonfinite: whether ``tx`` skips non-finite updates.
      optimizer_mask: the mask of the `optimizer` given (None for another optimizer).
      masks: the trainable mask per tree structure seen so far.
    """

    jitted: Callable[..., Any]
    tx: optax.GradientTransformation
    skip_nonfinite: bool
    optimizer_mask: PyTree | None = None
    masks: dict[Any, tuple[bool, ...]] = dataclasses.field(default_factory=dict)

    def init(self, params: PyTree) -> optax.OptState:
        """The optimizer state this step takes, for the adapted ``params``.

        Equal to ``tx.init(params)`` of the transformation given to `make_train_step`,
        wrapped in ``optax.ApplyIfFiniteState`` with ``skip_nonfinite``. Counters land
        replicated on the params' mesh, like the optimizer's own.
        """
        return place_on_mesh_of(params, self.tx.init(params))

    def skipped(self, opt_state: optax.OptState) -> int:
        """How many steps were skipped for non-finite gradients since ``init``.

        Raises:
          ValueError: ``opt_state`` keeps no count (the step was made without
            ``skip_nonfinite=True`` or the state not with ``step.init``).
        """
        if not isinstance(opt_state, optax.ApplyIfFiniteState):
            raise ValueError(
                "step.skipped: this opt_state keeps no count of skipped steps. Make the "
                "step with jaxlora.make_train_step(..., skip_nonfinite=True) and its state "
                "with step.init(params)."
            )
        return int(jax.device_get(opt_state.total_notfinite))

    def _check_state(self, opt_state: optax.OptState) -> None:
        if self.skip_nonfinite and not isinstance(opt_state, optax.ApplyIfFiniteState):
            raise TypeError(
                f"make_train_step(skip_nonfinite=True): opt_state is a "
                f"{type(opt_state).__name__}, not the state of the step's guarded optimizer. "
                "Make it with step.init(params) instead of tx.init(params)."
            )

    def _split(self, params) -> tuple[Any, Any, Callable[[Any], Any]]:
        """``(trainable, frozen)`` and a function putting updated trainable leaves back."""
        leaves, treedef = jax.tree.flatten(params)
        mask = self.masks.get(treedef)
        if mask is None:
            mask = tuple(jax.tree.leaves(trainable_mask(params)))
            _check_something_trains(mask, "make_train_step")
            self._check_optimizer_mask(params, mask)
            self.masks[treedef] = mask
        pairs = list(zip(mask, leaves, strict=True))
        trainable = treedef.unflatten([x if m else None for m, x in pairs])
        frozen = treedef.unflatten([None if m else x for m, x in pairs])

        def with_trainable(updated):
            new = iter(jax.tree.leaves(updated))
            return treedef.unflatten([next(new) if m else x for m, x in pairs])

        return trainable, frozen, with_trainable

    def _check_optimizer_mask(self, params: PyTree, mask: tuple[bool, ...]) -> None:
        """Refuses an `optimizer` mask that trains leaves the step does not differentiate."""
        if self.optimizer_mask is None:
            return
        ours = jax.tree.unflatten(jax.tree.structure(params), mask)
        try:
            extra = jax.tree.map(lambda o, m: o and not m, self.optimizer_mask, ours)
        except ValueError:  # the optimizer was made for another tree: `_check_opt_state` says
            return
        names = _leaf_paths(extra, bool)
        if names:
            raise ValueError(
                "make_train_step: the optimizer's mask trains leaves that these params "
                "freeze; the step differentiates only the adapters and jaxlora.Trainable "
                f"leaves:\n{format_paths(names, limit=10)}\nWrap those leaves in "
                "jaxlora.Trainable (e.g. LoraConfig(modules_to_save=...)), or leave them "
                "out of the mask."
            )

    def _opt_state_error(self, params: PyTree, opt_state: optax.OptState) -> ValueError | None:
        """An error naming the differences if ``opt_state`` was not made for ``params``."""
        try:
            expected = jax.eval_shape(self.tx.init, params)
        except Exception:  # no diagnosis: the caller re-raises its own error
            return None

        def shapes(tree):
            return {
                jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
                for p, x in jax.tree_util.tree_leaves_with_path(tree)
                if hasattr(x, "shape")
            }

        given, wanted = shapes(opt_state), shapes(expected)
        differences = [f"{k}: not in a state for these params" for k in given.keys() - wanted]
        differences += [f"{k}: missing" for k in wanted.keys() - given.keys()]
        differences += [
            f"{k}: {given[k][0]} {given[k][1]}, these params need {wanted[k][0]} {wanted[k][1]}"
            for k in given.keys() & wanted.keys()
            if given[k] != wanted[k]
        ]
        if not differences and jax.tree.structure(opt_state) != jax.tree.structure(expected):
            differences.append(
                "same arrays, another tree structure (e.g. another LoRA scale, alpha/rank, "
                "or another optimizer)"
            )
        if not differences:
            return None
        return ValueError(
            "make_train_step: opt_state does not fit these params (it was initialised "
            f"on another tree, or by another optimizer):\n"
            f"{format_paths(sorted(differences), limit=10)}\nMake it with "
            "step.init(params) on the params you train."
        )

    def _run(self, run: Callable[..., Any], params, opt_state, batch, args) -> Any:
        self._check_state(opt_state)
        trainable, frozen, with_trainable = self._split(params)
        try:
            return run(trainable, frozen, opt_state, batch, *args), with_trainable
        except (ValueError, TypeError, AttributeError) as e:
            error = self._opt_state_error(params, opt_state)
            if error is None:
                raise
            raise error from e

    def __call__(self, params, opt_state, batch, *args):
        (trainable, opt_state, out), with_trainable = self._run(
            self.jitted, params, opt_state, batch, args
        )
        return with_trainable(trainable), opt_state, out

    def lower(self, params, opt_state, batch, *args) -> jax.stages.Lowered:
        """The lowered program for these arguments (for ``cost_analysis`` or the HLO)."""
        lowered, _ = self._run(self.jitted.lower, params, opt_state, batch, args)
        return lowered


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
    skip_nonfinite: bool = False,
    max_consecutive_skips: int = 100,
) -> Callable[..., tuple[PyTree, optax.OptState, Any]]:
    """A jitted training step that differentiates the adapters only.

    Gradients are taken with respect to the trainable part of `split(params)`, so no
    gradient of a frozen kernel is ever formed. The frozen leaves are inputs of the
    compiled program but not outputs: they are never copied or donated and come back
    as the very arrays that were passed in.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``), where ``params`` is the adapted tree, e.g. calling
        ``lora_model.apply({"params": params}, ...)``.
      tx: the optimizer from `optimizer` (its state from ``tx.init(params)``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      donate: donate the trainable leaves and ``opt_state`` to the step (updated in
        place; the arrays passed in are invalid afterwards).
      skip_nonfinite: skip every step whose gradients hold a NaN or inf (one bad batch
        then changes neither the adapters nor the optimizer's moments), with
        ``optax.apply_if_finite``. The state must come from ``step.init(params)``, and
        ``step.skipped(opt_state)`` counts the skipped steps.
      max_consecutive_skips: with ``skip_nonfinite``, after this many non-finite steps in
        a row the update is applied anyway (``optax.apply_if_finite``'s rule: the run has
        diverged, and `save_adapter` will refuse its non-finite adapters).

    Raises:
      TypeError: ``loss_fn`` is not callable or ``tx`` not an optax transformation; (at
        the first call) ``loss_fn`` returns other than ``has_aux`` says, or
        a loss that is not a scalar.
      ValueError: (at a call) ``opt_state`` was not made for these params (the message
        lists the differences), or ``tx``'s mask trains leaves the params freeze.

    Returns:
      ``step(params, opt_state, batch, *args) -> (params, opt_state, loss_or_(loss, aux))``;
      ``step.init(params)`` gives the optimizer state to start from (``tx.init(params)``,
      guarded with ``skip_nonfinite``); ``step.lower(params, opt_state, batch, *args)``
      gives the lowered program.

    Example:
      >>> step = jaxlora.make_train_step(loss_fn, tx, skip_nonfinite=True)
      >>> opt_state = step.init(params)
      >>> params, opt_state, loss = step(params, opt_state, batch)
      >>> step.skipped(opt_state)
      0
    """
    if not callable(loss_fn):
        raise TypeError(
            f"make_train_step: loss_fn is a {type(loss_fn).__name__}, not a function; pass "
            "loss_fn(params, batch, *args) -> loss."
        )
    _check_tx(tx, "make_train_step")
    optimizer_mask = _OPTIMIZER_MASKS.get(tx.update)
    if skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=max_consecutive_skips)

    def step(trainable, frozen, opt_state, batch, *args):
        def loss_of(t):
            out = loss_fn(combine(t, frozen), batch, *args)
            _check_loss_output(out, has_aux)
            return out

        out, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, out

    jitted = jax.jit(step, donate_argnums=(0, 2) if donate else ())
    return _TrainStep(jitted, tx, skip_nonfinite, optimizer_mask)
