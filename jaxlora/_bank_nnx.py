"""Many named adapters on one NNX module: `LoraBank` wraps the base module once.

The base module is kept as it is; each adapter is a list of `WeightAdapter` (A and B as
`LoraParam`), one per weight it targets, found by tracing the module as `lorafy` does for
weights outside Flax's layers (`_rewrite.discover`), so any weight the base contracts or
looks up can carry adapters, plus its own copies (`TrainableParam`) of the base leaves it
trains whole (``modules_to_save``, biases). A call runs the base module's traced program
with the adapters stacked (`_bank_run`): ``bank(x, adapter=id)`` for one, ``adapter=ids``
per row, each adapter with its own LoRA dropout rate.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import _bank, _bank_run, _layout, _linen, _rewrite, _targeting
from jaxlora._config import LoraConfig
from jaxlora._nnx_wrappers import TrainableParam, WeightAdapter
from jaxlora._views import factors_for


def weight_at(module: nnx.Module, path: str) -> nnx.Variable:
    """The variable at a `/`-joined attribute/index path of ``module``."""
    node: Any = module
    for k in path.split("/"):
        node = node[int(k)] if k.isdigit() else getattr(node, k)
    return node


def _str_keys(tree: Any) -> Any:
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def base_tree(module: nnx.Module) -> dict[str, Any]:
    """The ``nnx.Param`` values of ``module`` as a nested dict with ``str`` keys: the
    params tree linen's pure functions (files, merge arithmetic) take."""
    return _str_keys(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def holding(
    weight: nnx.Variable, a: jax.Array, b: jax.Array, scale: float, delta_eq: str
) -> WeightAdapter:
    """A `WeightAdapter` of ``weight`` holding the given factors (loaded or combined)."""
    a_labels, b_labels, kernel = _layout.delta_labels(delta_eq)
    stack = weight.ndim - len(kernel)
    a_core, b_core = a.shape[a.ndim - len(a_labels) :], b.shape[b.ndim - len(b_labels) :]
    layout = _layout.Layout(
        "linear",
        tuple(weight.shape[stack:]),
        a_core,
        b_core,
        int(np.prod(a_core[:-1])),
        int(np.prod(b_core[1:])),
        delta_eq,
    )
    adapter = WeightAdapter(weight, layout, scale=scale, key=jax.random.key(0), config=LoraConfig())
    adapter.lora_a.set_value(jnp.asarray(a))
    adapter.lora_b.set_value(jnp.asarray(b))
    return adapter


class LoraBank(nnx.Module):
    """Named LoRA adapters on one NNX module, chosen per call or per row.

    Attributes:
      base: the original module, unchanged (its weights held once).
      adapters: ``nnx.Dict`` name -> ``nnx.List`` of `WeightAdapter`, one per adapted weight.
      leaves: ``nnx.Dict`` name -> ``nnx.List`` of `TrainableParam`: the adapter's own
        copies of the base leaves it trains whole (``modules_to_save``, biases), chosen
        by its id in place of the base's.
      dropout: the ``nnx.Dropout`` whose rngs and ``train()``/``eval()`` mode drive the
        adapters' LoRA dropout (None: no adapter has dropout).

    Train one adapter with an NNX filter on its path, e.g.
    ``nnx.Optimizer(bank, tx, wrt=nnx.All(jaxlora.TrainableParam, nnx.PathContains("a")))``.

    Example:
      >>> bank = jaxlora.LoraBank(model)
      >>> bank.add("a", cfg_a, x, rngs=nnx.Rngs(0))
      >>> bank.add("b", cfg_b, x, rngs=nnx.Rngs(1))
      >>> y = bank(x, adapter=bank.ids(["a", "b", "a", None]))
    """

    BASE = _bank_run.BASE

    def __init__(self, base: nnx.Module):
        self.base = base
        self.adapters = nnx.Dict()
        self.leaves = nnx.Dict()  # name -> nnx.List of its TrainableParam leaf copies
        self.dropout: nnx.Dropout | None = nnx.data(None)  # LoRA dropout: rngs, train/eval
        # (name, weight paths, config JSON, leaf paths) per adapter, in id order: static
        self.jaxlora_entries: tuple[tuple[str, tuple[str, ...], str, tuple[str, ...]], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names, in id order (the first has id 1)."""
        return tuple(e[0] for e in self.jaxlora_entries)

    def config(self, name: str) -> LoraConfig:
        """The `LoraConfig` adapter ``name`` was made with."""
        return LoraConfig(**json.loads(self._entry(name)[2]))

    def _entry(self, name: str) -> tuple[str, tuple[str, ...], str, tuple[str, ...]]:
        for entry in self.jaxlora_entries:
            if entry[0] == name:
                return entry
        raise KeyError(f"LoraBank: no adapter named {name!r}; this bank holds {list(self.names)}.")

    def index(self, name: str) -> int:
        """The id of adapter ``name`` (`BASE` is 0)."""
        return 0 if name == self.BASE else self.names.index(self._entry(name)[0]) + 1

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """Per-row adapter ids ``(batch,)`` int32 from names (`BASE` or None: the base)."""
        return np.asarray([0 if n is None else self.index(n) for n in names], np.int32)

    def add(
        self,
        name: str,
        config: LoraConfig,
        *inputs: Any,
        rngs: nnx.Rngs,
        rank_axis: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Adds adapter ``name``: ``config``'s targets among the weights ``base(*inputs)`` uses.

        ``modules_to_save`` and ``bias`` give the adapter its own copies of those base
        leaves (`TrainableParam`); LoRA dropout draws from ``rngs``'s ``dropout_rng``
        stream while the bank is in ``train()`` mode (the default), as `lorafy` does.

        Raises:
          ValueError: the name is taken, a target or ``modules_to_save`` pattern
            matches nothing, or the config trains token rows or uses DoRA.
        """
        self._check_new(name)
        if config.trainable_token_indices is not None:
            raise ValueError(
                f"LoraBank.add({name!r}): the config trains token rows "
                "(trainable_token_indices), which a bank does not hold; adapt a module of its "
                "own with jaxlora.lorafy instead, or leave trainable_token_indices out."
            )
        if config.use_dora:
            raise ValueError(
                f"LoraBank.add({name!r}): DoRA adapters (use_dora=True) cannot join a bank: a "
                "batch mixing adapters applies LoRA factors only. Use jaxlora.lorafy on the "
                "module itself."
            )
        graphdef, state = nnx.split(self.base)

        def run(state, *args, **kw):
            return nnx.merge(graphdef, state)(*args, **kw)

        found = _targeting.candidates(_rewrite.discover(run, state, inputs, kwargs))
        selected = _targeting.select(config, found, who="LoraBank.add")
        key = rngs.params()
        paths, adapters = [], []
        for c in selected:
            path = f"{c.module}/{c.weight}" if c.module else c.weight
            adapters.append(
                WeightAdapter(
                    weight_at(self.base, path),
                    c.layout(config),
                    scale=config.scale_for(c.paths()),
                    key=jax.random.fold_in(key, zlib.crc32(c.name.encode())),
                    config=config,
                    rank_axis=rank_axis,
                )
            )
            paths.append(path)
        modules = [c.module for c in selected]
        marked = _linen._mark_full_training(base_tree(self.base), config, modules)
        leaves = {"/".join(p): v for p, v in _bank._replaced(_bank._own(marked)).items()}
        self.put(name, config, dict(zip(paths, adapters, strict=True)), leaves, rngs=rngs)

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or name in self.names or name == self.BASE or not name:
            raise ValueError(
                f"LoraBank: an adapter named {name!r} is already in this bank (or the name is "
                "reserved); remove or rename it first."
            )

    def put(
        self,
        name: str,
        config: LoraConfig,
        adapters: dict[str, WeightAdapter],
        leaves: dict[str, Any],
        *,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        """Adds adapter ``name`` from its parts (used by `add`, `load_bank`,
        `add_weighted_adapter`).

        Args:
          name: the new adapter's name.
          config: its `LoraConfig`.
          adapters: weight path (``"layers/0/attn/q_proj/kernel"``) -> its `WeightAdapter`.
          leaves: base leaf path -> the adapter's own value of it (``modules_to_save``,
            biases).
          rngs: the rng streams of LoRA dropout, when ``config`` has dropout and the bank
            has none yet (default ``nnx.Rngs(0)``, as `import_peft`).
        """
        self._check_new(name)
        if config.dropout and self.dropout is None:
            self.dropout = nnx.Dropout(
                config.dropout, rng_collection=config.dropout_rng, rngs=rngs or nnx.Rngs(0)
            )
        self.adapters[name] = nnx.List(list(adapters.values()))
        self.leaves[name] = nnx.List([TrainableParam(v) for v in leaves.values()])
        entry = (
            name,
            tuple(adapters),
            json.dumps(config.to_dict(), sort_keys=True),
            tuple(leaves),
        )
        self.jaxlora_entries = (*self.jaxlora_entries, entry)

    def remove(self, name: str) -> None:
        """Deletes adapter ``name`` (ids of the adapters after it shift down)."""
        self._entry(name)
        del self.adapters[name]
        del self.leaves[name]
        self.jaxlora_entries = tuple(e for e in self.jaxlora_entries if e[0] != name)

    def rename(self, old: str, new: str) -> None:
        """Calls adapter ``old`` ``new`` (same id)."""
        self._entry(old)
        if new in self.names or new == self.BASE:
            raise ValueError(f"LoraBank: {new!r} is already taken; pick another name.")
        for held in (self.adapters, self.leaves):
            held[new] = held[old]
            del held[old]
        self.jaxlora_entries = tuple(
            (new, *e[1:]) if e[0] == old else e for e in self.jaxlora_entries
        )

    def merge(self, name: str) -> nnx.Module:
        """A plain copy of the base module with adapter ``name`` folded into its weights
        (and its own ``modules_to_save``/bias leaves in place of the base's)."""
        merged = nnx.clone(self.base)
        _, paths, _, leaf_paths = self._entry(name)
        for path, adapter in zip(paths, self.adapters[name], strict=True):
            weight = weight_at(merged, path)
            w = weight[...]
            weight[...] = (w.astype(jnp.float32) + adapter.delta_weight()).astype(w.dtype)
        for path, leaf in zip(leaf_paths, self.leaves[name], strict=True):
            weight_at(merged, path)[...] = leaf[...]
        return merged

    def _with_leaves(self, state: Any, ids: jax.Array) -> tuple[Any, dict[str, Any]]:
        """``state`` with each leaf some adapter trains whole chosen by the one id ``ids``,
        and the base values of those leaves by path."""
        variants: dict[str, dict[int, Any]] = {}
        for i, (name, *_, leaf_paths) in enumerate(self.jaxlora_entries, start=1):
            for path, leaf in zip(leaf_paths, self.leaves[name], strict=True):
                variants.setdefault(path, {})[i] = leaf[...]
        if not variants:
            return state, {}
        if ids.ndim:
            raise ValueError(
                "LoraBank: a batch mixing adapters cannot use adapters that train whole "
                f"leaves (modules_to_save or biases): {sorted(variants)[:3]}. Pass one "
                "adapter id (adapter=<id>), or run each adapter's rows on its own."
            )
        leaves, treedef = jax.tree.flatten(state)
        paths = _rewrite.weight_paths(state)
        base = {p: x for p, x in zip(paths, leaves, strict=True) if p in variants}
        chosen = {}
        for path, by_id in variants.items():
            options = [by_id.get(i, base[path]) for i in range(1, len(self.names) + 1)]
            chosen[path] = _bank_run.pick(jnp.stack([base[path], *options]), ids)
        new = [chosen.get(p, x) for p, x in zip(paths, leaves, strict=True)]
        return jax.tree.unflatten(treedef, new), base

    def _dropout_key(self, stream: str) -> jax.Array | None:
        if self.dropout is None or self.dropout.deterministic:
            return None
        rngs = self.dropout.rngs
        return rngs[stream]() if isinstance(rngs, nnx.Rngs) else rngs()

    def __call__(self, *args: Any, adapter: Any, check_ids: bool = False, **kwargs: Any) -> Any:
        """``base(*args, **kwargs)`` with the chosen adapter(s) active.

        Args:
          *args: the base module's inputs.
          adapter: a name, an int id (0 = the base; may be traced: switching never
            recompiles) or a ``(batch,)`` int array of ids, one per row of the inputs'
            leading axis. Out-of-range ids: as `jaxlora.BankModel.apply`.
          check_ids: check traced ids with ``checkify``.
          **kwargs: the base module's keyword arguments.
        """
        graphdef, base_state = nnx.split(self.base)

        def run(state, *call_args, **call_kwargs):
            module = nnx.merge(graphdef, state)
            return module(*call_args, **call_kwargs), nnx.state(module)

        ids = _bank_run.checked_ids(adapter, self.names, check_ids)
        state, replaced = self._with_leaves(base_state, ids)
        ndim = {
            path: x.ndim
            for path, x in zip(_rewrite.weight_paths(state), jax.tree.leaves(state), strict=True)
        }
        per_adapter = [
            {
                path: factors_for(a.lora_a[...], a.lora_b[...], a.delta_eq, ndim[path], a.scale)
                for path, a in zip(paths, self.adapters[name], strict=True)
            }
            for name, paths, *_ in self.jaxlora_entries
        ]
        stacked = _bank_run.stack(per_adapter, self.names)
        configs = [self.config(n) for n in self.names]
        key = _bank_run.dropout_key(configs, self._dropout_key)
        out, new_state = _bank_run.run(run, state, stacked, ids, args, kwargs, configs, key)
        # write back only what the call changed (a cache, a counter), never a chosen leaf
        paths = _rewrite.weight_paths(new_state)
        new, treedef = jax.tree.flatten(new_state)
        new = [replaced.get(p, x) for p, x in zip(paths, new, strict=True)]
        if any(a is not b for a, b in zip(jax.tree.leaves(base_state), new, strict=True)):
            nnx.update(self.base, jax.tree.unflatten(treedef, new))
        return out
