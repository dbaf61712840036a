"""Many named adapters on one frozen base (linen): add, list, select, switch, mix, train.

An `AdapterBank` holds the base params once and, per adapter name, only that adapter's
own leaves: its `LoraAdapter` factors and its `Trainable` leaves (``modules_to_save``
copies, trained biases). `AdapterBank.select` gives the ordinary adapted tree of one
adapter, so everything that takes one (`merge`, `save_adapter`, `export_peft`,
`LoraModel.apply`) takes it too.

`BankModel.apply` runs the model with the adapter chosen by an integer id that is *data*:
the factors of all adapters are stacked per weight (ranks zero-padded, zeros where an
adapter does not target the weight, zeros at id 0 for the base) and indexed inside the
program, so switching adapters, or running a batch whose rows use different adapters
(`_mixed`), compiles once per bank structure.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxlora import _bank_run, _linen, _tree
from jaxlora._bank_run import BASE
from jaxlora._config import LoraConfig, format_paths
from jaxlora._tree import (
    Frozen,
    LoraAdapter,
    PyTree,
    Trainable,
    adapters_of,
    has_adapters,
    params_of,
    path_str,
    rebox,
    replace_at,
    unwrap_trainable,
    without_adapters,
)


def _own(node: Any) -> Any:
    """Only the adapter's own leaves of an adapted tree (its factors and `Trainable` leaves).

    `Trainable` leaves are copied: they start as the base's arrays, and two adapters
    sharing one buffer could not both be donated to a train step."""
    if isinstance(node, Trainable):
        return jax.tree.map(jnp.copy, node)
    if isinstance(node, LoraAdapter):
        return node
    if not isinstance(node, Mapping):
        return None
    kept = {k: _own(v) for k, v in node.items()}
    kept = {k: v for k, v in kept.items() if v is not None}
    return kept or None


def _overlay(base: Any, own: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in own.items():
        out[k] = _overlay(base.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def _replaced(own: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{path: value}`` of the base leaves an adapter replaces (its `Trainable` leaves)."""
    if isinstance(own, Trainable):
        return {path: own.value}
    if not isinstance(own, Mapping):
        return {}
    return {p: v for k, sub in own.items() for p, v in _replaced(sub, (*path, k)).items()}


def _nbytes(tree: PyTree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _check_same_base(name: str, base: PyTree, given: PyTree, replaced: frozenset[str]) -> None:
    """Refuses an adapter made on another base than the bank's, naming what differs.

    The leaves at ``replaced`` (the adapter's own ``modules_to_save`` copies and biases)
    may hold other values, not another shape."""
    ours = dict(jax.tree_util.tree_leaves_with_path(base))
    theirs = dict(jax.tree_util.tree_leaves_with_path(given))
    differences = [f"{path_str(p)}: not in this bank's base" for p in theirs.keys() - ours]
    differences += [f"{path_str(p)}: missing" for p in ours.keys() - theirs]
    for p in ours.keys() & theirs.keys():
        x, y = ours[p], theirs[p]
        if x is y:
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            differences.append(
                f"{path_str(p)}: {y.shape} {y.dtype}, the bank has {x.shape} {x.dtype}"
            )
        elif path_str(p) not in replaced and not bool(jnp.array_equal(x, y)):
            differences.append(f"{path_str(p)}: other values")
    if differences:
        raise ValueError(
            f"AdapterBank: adapter {name!r} was made on another base than this bank's:\n"
            f"{format_paths(sorted(differences), limit=10)}\nMake it on bank.base (e.g. "
            "jaxlora.lorafy(model, bank, config, x, key=key, name=...) or "
            "jaxlora.load_adapter(path, bank.base))."
        )


@jax.tree_util.register_pytree_with_keys_class
class AdapterBank:
    """Named LoRA adapters on one frozen base, for a linen model.

    The base params are held once; each adapter holds only its own factors and
    ``modules_to_save``/bias leaves, so an adapter adds only its own bytes. Adapters may
    differ in rank, alpha, targets, dropout and ``modules_to_save``. Methods return new
    banks (the bank is a pytree, like params). Id 0 is the base model (`BASE`); adapter
    ``i`` in `names` has id ``i + 1``.

    Attributes:
      BASE: ``"__base__"``, the name of id 0 (PEFT's name for the base model).
      base: the base params (no adapters).
      adapters: name -> the adapter's own leaves (a sparse params tree).
      frozen: names of adapters that do not train (see `train_only`).

    Example:
      >>> bank_model, bank = jaxlora.lorafy(model, params, cfg_a, x, key=k1, name="a")
      >>> bank_model, bank = jaxlora.lorafy(model, bank, cfg_b, x, key=k2, name="b")
      >>> y = bank_model.apply({"params": bank}, x, adapter=bank.ids(["a", "b", "a"]))
    """

    BASE = BASE

    def __init__(
        self,
        base: PyTree,
        adapters: Mapping[str, PyTree] | None = None,
        configs: Mapping[str, LoraConfig | str] | None = None,
        frozen: Iterable[str] = (),
    ):
        self.base = base
        self.adapters = dict(adapters or {})
        configs = dict(configs or {})
        self._configs = {
            n: c if isinstance(c, str) else json.dumps(c.to_dict(), sort_keys=True)
            for n, c in configs.items()
        }
        self.frozen = frozenset(frozen)
        unknown = (set(self._configs) ^ set(self.adapters)) | (self.frozen - set(self.adapters))
        if unknown:
            raise ValueError(f"AdapterBank: adapters and configs disagree on {sorted(unknown)}.")

    def tree_flatten_with_keys(self):
        adapters = {n: Frozen(v) if n in self.frozen else v for n, v in self.adapters.items()}
        children = [
            (jax.tree_util.GetAttrKey("base"), self.base),
            (jax.tree_util.GetAttrKey("adapters"), adapters),
        ]
        aux = (tuple(self._configs.items()), tuple(sorted(self.frozen)))
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        base, adapters = children
        adapters = {n: v.value if isinstance(v, Frozen) else v for n, v in adapters.items()}
        configs, frozen = aux
        return cls(base, adapters, dict(configs), frozen)

    def __repr__(self) -> str:
        return f"AdapterBank(adapters={list(self.names)}, frozen={sorted(self.frozen)})"

    @classmethod
    def from_adapted(cls, name: str, adapted: PyTree, config: LoraConfig) -> AdapterBank:
        """A bank holding the base of an adapted tree and its adapter, named ``name``."""
        inner, _ = params_of(adapted)
        return cls(unwrap_trainable(without_adapters(inner))).add(name, inner, config)

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names, in id order (the first has id 1)."""
        return tuple(self.adapters)

    def _check_name(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(
                f"AdapterBank: no adapter named {name!r}; this bank holds {list(self.names)}."
            )

    def config(self, name: str) -> LoraConfig:
        """The `LoraConfig` the adapter ``name`` was made with."""
        self._check_name(name)
        return LoraConfig(**json.loads(self._configs[name]))

    def index(self, name: str) -> int:
        """The id of adapter ``name`` (`BASE` is 0)."""
        if name == BASE:
            return 0
        self._check_name(name)
        return self.names.index(name) + 1

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """Per-row adapter ids ``(batch,)`` int32 from names (`BASE` or None: the base)."""
        return np.asarray([0 if n is None else self.index(n) for n in names], np.int32)

    def add(self, name: str, adapted: PyTree, config: LoraConfig) -> AdapterBank:
        """A bank with the adapter of an adapted tree (from `lorafy`, `load_adapter`,
        `import_peft`) added as ``name``; its base must be this bank's."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"AdapterBank: {name!r} cannot name an adapter; use a non-empty str.")
        if name in self.adapters:
            raise ValueError(
                f"AdapterBank: an adapter named {name!r} is already in this bank; remove or "
                "rename it first (bank.remove(name), bank.rename(name, new))."
            )
        if config.trainable_token_indices is not None:
            raise ValueError(
                f"AdapterBank.add({name!r}): the config trains token rows "
                "(trainable_token_indices), which a bank does not hold (they would be "
                "dropped); keep this adapter as its own adapted tree (save_adapter, "
                "export_peft), or leave trainable_token_indices out."
            )
        if config.use_dora:
            raise ValueError(
                f"AdapterBank.add({name!r}): DoRA adapters (use_dora=True) cannot join a bank: "
                "a batch mixing adapters applies LoRA factors only. Use the adapter on its own "
                "(jaxlora.LoraModel), or jaxlora.merge it into its base."
            )
        inner, _ = params_of(adapted)
        if not has_adapters(inner):
            raise ValueError(
                f"AdapterBank.add({name!r}): these params hold no LoRA adapter; pass the tree "
                "that jaxlora.lorafy, load_adapter or import_peft returned."
            )
        own = _own(inner)
        replaced = frozenset("/".join(p) for p in _replaced(own))
        _check_same_base(name, self.base, unwrap_trainable(without_adapters(inner)), replaced)
        return AdapterBank(
            self.base,
            {**self.adapters, name: own},
            {**self._configs, name: config},
            self.frozen,
        )

    def remove(self, name: str) -> AdapterBank:
        """A bank without adapter ``name`` (ids of the adapters after it shift down)."""
        self._check_name(name)
        rest = {n: v for n, v in self.adapters.items() if n != name}
        configs = {n: c for n, c in self._configs.items() if n != name}
        return AdapterBank(self.base, rest, configs, self.frozen - {name})

    def rename(self, old: str, new: str) -> AdapterBank:
        """A bank where adapter ``old`` is called ``new`` (same id)."""
        self._check_name(old)
        if new in self.adapters or new == BASE:
            raise ValueError(f"AdapterBank: {new!r} is already taken; pick another name.")

        def renamed(d):
            return {new if n == old else n: v for n, v in d.items()}

        frozen = {new if n == old else n for n in self.frozen}
        return AdapterBank(self.base, renamed(self.adapters), renamed(self._configs), frozen)

    def select(self, name: str) -> PyTree:
        """The ordinary adapted params tree of adapter ``name`` (for `merge`, `save_adapter`,
        `LoraModel.apply`, ...)."""
        self._check_name(name)
        return _overlay(self.base, self.adapters[name])

    def train_only(self, *names: str) -> AdapterBank:
        """A bank in which only ``names`` train (`split`, `optimizer`, `make_train_step`);
        the other adapters are frozen. ``train_only()`` freezes them all."""
        for n in names:
            self._check_name(n)
        return AdapterBank(self.base, self.adapters, self._configs, set(self.names) - set(names))

    def nbytes(self) -> dict[str, int]:
        """Bytes of the base (``"base"``) and of each adapter's own arrays."""
        return {"base": _nbytes(self.base), **{n: _nbytes(t) for n, t in self.adapters.items()}}


def bank_of(variables: Any) -> tuple[Any, Any]:
    """The params of a variables dict (an `AdapterBank` or not) and a rebuilder."""
    if isinstance(variables, Mapping) and isinstance(variables.get("params"), AdapterBank):
        return variables["params"], lambda params: {**variables, "params": params}
    return params_of(variables)


def _leaf_stacks(bank: AdapterBank) -> dict[tuple[str, ...], jax.Array]:
    """Per leaf some adapter replaces (``modules_to_save``, biases): its value for each id,
    stacked (the base's at id 0 and for the adapters that keep it)."""
    variants: dict[tuple[str, ...], dict[int, Any]] = {}
    for i, own in enumerate(bank.adapters.values(), start=1):
        for path, value in _replaced(own).items():
            variants.setdefault(path, {})[i] = value
    stacks = {}
    for path, by_id in variants.items():
        node = bank.base
        for k in path:
            node = node[k]
        w = meta.unbox(node)
        options = [meta.unbox(by_id.get(i, w)) for i in range(1, len(bank.names) + 1)]
        stacks[path] = jnp.stack([w, *options])
    return stacks


def _with_picked(base: PyTree, stacks: Mapping[tuple[str, ...], jax.Array], adapter: Any) -> PyTree:
    """The base with each replaced leaf taken from its stack at the one id ``adapter``."""
    for path, stack in stacks.items():
        base = replace_at(
            base,
            "/".join(path[:-1]),
            lambda d, k=path[-1], s=stack: {**d, k: rebox(d[k], _bank_run.pick(s, adapter))},
        )
    return base


@dataclasses.dataclass(frozen=True)
class BankModel:
    """A linen model run with the adapters of an `AdapterBank`, chosen per call or per row.

    Attributes:
      model: the original, unmodified linen module.
    """

    model: Any

    def apply(
        self, variables: Any, *args: Any, adapter: Any, check_ids: bool = False, **kwargs: Any
    ) -> Any:
        """``model.apply`` with the chosen adapter(s) active. Same arguments, same output.

        Args:
          variables: ``{"params": bank, ...}`` (or the bank itself).
          *args: the model's inputs.
          adapter: which adapter: a name; an int id (0 = base, see `AdapterBank.index`),
            which may be traced, so switching never recompiles; or a ``(batch,)`` int
            array of ids, one per row of the inputs (their leading axis), to mix
            adapters in one batch. Concrete ids out of range are an error; traced ones
            give NaN outputs for their rows, or, with ``check_ids=True``, a
            ``checkify`` error (wrap the caller in ``jax.experimental.checkify.checkify``).
          check_ids: check traced ids with ``checkify``.
          **kwargs: the model's keyword arguments (``rngs``, ``mutable``, flags).
        """
        bank, rebuild = bank_of(variables)
        if not isinstance(bank, AdapterBank):
            raise TypeError(
                "BankModel.apply takes {'params': AdapterBank}; for one adapted tree use "
                "jaxlora.LoraModel, or bank.select(name)."
            )
        ids = _bank_run.checked_ids(adapter, bank.names, check_ids)
        configs = [bank.config(n) for n in bank.names]
        rngs = kwargs.get("rngs")
        key = _bank_run.dropout_key(
            configs, lambda stream: rngs.get(stream) if isinstance(rngs, Mapping) else None
        )
        root = "params/" if bank is not variables else ""
        per_adapter = [
            adapters_of(unwrap_trainable(_overlay(bank.base, own)))
            for own in bank.adapters.values()
        ]
        stacked = {root + p: f for p, f in _bank_run.stack(per_adapter, bank.names).items()}
        stacks = _leaf_stacks(bank)
        if ids.ndim == 0:  # one adapter: its copies replace the base's leaves
            base, stacks = _with_picked(bank.base, stacks, ids), {}
        else:  # each row its own copies
            base = bank.base
        leaf_stacks = {root + "/".join(p): s for p, s in stacks.items()}
        return _bank_run.run(
            self.model.apply,
            rebuild(base),
            stacked,
            ids,
            args,
            kwargs,
            configs,
            key,
            leaf_stacks=leaf_stacks,
        )


def merge(bank: AdapterBank, names: str | Sequence[str], dtype: Any = jnp.bfloat16) -> PyTree:
    """Plain base params with the adapters ``names`` folded in (``W + Σ scale·A⊗B``)."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"merge: name the adapters to fold, among {list(bank.names)}.")
    taken: dict[tuple[str, ...], str] = {}
    params = bank.base
    for name in names:
        bank._check_name(name)
        for path in _replaced(bank.adapters[name]):
            if path in taken:
                raise ValueError(
                    f"merge: adapters {taken[path]!r} and {name!r} both train "
                    f"{'/'.join(path)!r} in full; merge one of them."
                )
            taken[path] = name
        params = _tree.merge(_overlay(params, bank.adapters[name]), dtype)
    return params


def lorafy(
    model: Any,
    params: Any,
    config: LoraConfig,
    *inputs: Any,
    key: jax.Array,
    name: str,
    rank_axis: str | None = None,
    **kwargs: Any,
) -> tuple[BankModel, Any]:
    """Adds a new adapter ``name`` to a bank, or starts a bank on base params."""
    inner, rebuild = bank_of(params)
    if not isinstance(inner, AdapterBank) and has_adapters(inner):
        raise ValueError(
            f"lorafy(..., name={name!r}): these params already hold an unnamed adapter. Start "
            "a bank from them with jaxlora.AdapterBank.from_adapted('default', params, "
            "config), then add to it."
        )
    bank = inner if isinstance(inner, AdapterBank) else AdapterBank(inner)
    _, adapted = _linen.lorafy(
        model, rebuild(bank.base), config, *inputs, key=key, rank_axis=rank_axis, **kwargs
    )
    return BankModel(model), rebuild(bank.add(name, params_of(adapted)[0], config))
