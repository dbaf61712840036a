"""Many named adapters on one NNX module: `LoraBank` wraps the base module once.

The base module is kept as it is; each adapter is a list of `WeightAdapter` (A and B as
`LoraParam`), one per weight it targets, found by tracing the module as `lorafy` does for
weights outside Flax's layers (`_rewrite.discover`), so any weight the base contracts or
looks up can carry adapters. A call runs the base module's traced program with the
adapters stacked (`_bank_run`): ``bank(x, adapter=id)`` for one, ``adapter=ids`` per row.
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

from jaxlora import _bank_run, _rewrite, _targeting
from jaxlora._config import LoraConfig
from jaxlora._nnx_wrappers import WeightAdapter
from jaxlora._views import factors_for


def _weight(module: nnx.Module, path: str) -> nnx.Variable:
    node: Any = module
    for k in path.split("/"):
        node = node[int(k)] if k.isdigit() else getattr(node, k)
    return node


class LoraBank(nnx.Module):
    """Named LoRA adapters on one NNX module, chosen per call or per row.

    Attributes:
      base: the original module, unchanged (its weights held once).
      adapters: ``nnx.Dict`` name -> ``nnx.List`` of `WeightAdapter`, one per adapted weight.

    Train one adapter with an NNX filter on its path, e.g.
    ``nnx.Optimizer(bank, tx, wrt=nnx.All(jaxlora.LoraParam, nnx.PathContains("a")))``.

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
        # (name, weight paths, config JSON) per adapter, in id order: static structure
        self.jaxlora_entries: tuple[tuple[str, tuple[str, ...], str], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names, in id order (the first has id 1)."""
        return tuple(e[0] for e in self.jaxlora_entries)

    def config(self, name: str) -> LoraConfig:
        """The `LoraConfig` adapter ``name`` was made with."""
        return LoraConfig(**json.loads(self._entry(name)[2]))

    def _entry(self, name: str) -> tuple[str, tuple[str, ...], str]:
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

        Raises:
          ValueError: the name is taken, or the config trains whole modules or biases
            (``modules_to_save``, ``bias``) or uses LoRA dropout, which banks on NNX do
            not hold yet.
        """
        if name in self.names or name == self.BASE or not name:
            raise ValueError(
                f"LoraBank: an adapter named {name!r} is already in this bank (or the name is "
                "reserved); remove or rename it first."
            )
        if config.use_dora:
            raise ValueError(
                f"LoraBank.add({name!r}): DoRA adapters (use_dora=True) cannot join a bank: a "
                "batch mixing adapters applies LoRA factors only. Use jaxlora.lorafy on the "
                "module itself."
            )
        if config.modules_to_save or config.bias != "none" or config.dropout:
            raise ValueError(
                f"LoraBank.add({name!r}): NNX banks hold LoRA factors only, without dropout; "
                "leave modules_to_save, bias and dropout at their defaults (linen's "
                "jaxlora.AdapterBank holds them)."
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
                    _weight(self.base, path),
                    c.layout(config),
                    scale=config.scale_for(c.paths()),
                    key=jax.random.fold_in(key, zlib.crc32(c.name.encode())),
                    config=config,
                    rank_axis=rank_axis,
                )
            )
            paths.append(path)
        self.adapters[name] = nnx.List(adapters)
        entry = (name, tuple(paths), json.dumps(config.to_dict(), sort_keys=True))
        self.jaxlora_entries = (*self.jaxlora_entries, entry)

    def remove(self, name: str) -> None:
        """Deletes adapter ``name`` (ids of the adapters after it shift down)."""
        self._entry(name)
        del self.adapters[name]
        self.jaxlora_entries = tuple(e for e in self.jaxlora_entries if e[0] != name)

    def rename(self, old: str, new: str) -> None:
        """Calls adapter ``old`` ``new`` (same id)."""
        self._entry(old)
        if new in self.names or new == self.BASE:
            raise ValueError(f"LoraBank: {new!r} is already taken; pick another name.")
        self.adapters[new] = self.adapters[old]
        del self.adapters[old]
        self.jaxlora_entries = tuple(
            (new, *e[1:]) if e[0] == old else e for e in self.jaxlora_entries
        )

    def merge(self, name: str) -> nnx.Module:
        """A plain copy of the base module with adapter ``name`` folded into its weights."""
        merged = nnx.clone(self.base)
        for path, adapter in zip(self._entry(name)[1], self.adapters[name], strict=True):
            weight = _weight(merged, path)
            w = weight[...]
            weight[...] = (w.astype(jnp.float32) + adapter.delta_weight()).astype(w.dtype)
        return merged

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
        graphdef, state = nnx.split(self.base)

        def run(state, *call_args, **call_kwargs):
            module = nnx.merge(graphdef, state)
            return module(*call_args, **call_kwargs), nnx.state(module)

        ndim = {
            path: x.ndim
            for path, x in zip(_rewrite.weight_paths(state), jax.tree.leaves(state), strict=True)
        }
        per_adapter = [
            {
                path: factors_for(a.lora_a[...], a.lora_b[...], a.delta_eq, ndim[path], a.scale)
                for path, a in zip(paths, self.adapters[name], strict=True)
            }
            for name, paths, _ in self.jaxlora_entries
        ]
        ids = _bank_run.checked_ids(adapter, self.names, check_ids)
        stacked = _bank_run.stack(per_adapter, self.names)
        configs = [self.config(n) for n in self.names]
        out, new_state = _bank_run.run(run, state, stacked, ids, args, kwargs, configs, None)
        old, new = jax.tree.leaves(state), jax.tree.leaves(new_state)
        if any(a is not b for a, b in zip(old, new, strict=True)):  # a cache, a counter
            nnx.update(self.base, new_state)
        return out
