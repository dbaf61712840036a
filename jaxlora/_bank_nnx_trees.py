"""An NNX `LoraBank` as the pure trees linen's bank functions take, and back.

`as_adapter_bank` views a `LoraBank` as an `AdapterBank`: the base module's params as a
nested dict, each adapter's factors as `LoraAdapter` beside its weight and its whole
leaves (``modules_to_save``, biases) as `Trainable` at their paths. Bank files
(`save_bank`/`load_bank`: one `save_adapter` directory per adapter), combination
(`add_weighted_adapter`) and `summary` then run linen's code, written once. `put_tree`
adds an adapter from such a tree (a loaded or combined one) back to the `LoraBank`.
"""

from __future__ import annotations

from typing import Any

from flax.core import meta

from jaxlora import _bank
from jaxlora._bank import AdapterBank
from jaxlora._bank_nnx import LoraBank, base_tree, holding, weight_at
from jaxlora._config import LoraConfig
from jaxlora._tree import (
    LoraAdapter,
    PyTree,
    Trainable,
    adapter_at,
    adapter_key,
    iter_adapters,
    params_of,
)


def _set(tree: dict, path: str, value: Any) -> None:
    *modules, key = path.split("/")
    for k in modules:
        tree = tree.setdefault(k, {})
    tree[key] = value


def as_adapter_bank(bank: LoraBank) -> AdapterBank:
    """The `AdapterBank` holding the same base weights and adapters as ``bank``.

    Args:
      bank: an NNX `LoraBank`.

    Returns:
      An `AdapterBank` whose base is the base module's ``nnx.Param`` values as a nested
      dict (``str`` keys, list indices as ``"0"``) and whose adapters are ``bank``'s,
      under the same names and configs; its arrays are ``bank``'s (not copies).
    """
    adapters = {}
    for name, paths, _, leaf_paths in bank.jaxlora_entries:
        own: dict = {}
        for path, w in zip(paths, bank.adapters[name], strict=True):
            module, _, weight = path.rpartition("/")
            factors = LoraAdapter(w.lora_a[...], w.lora_b[...], w.scale, w.delta_eq)
            _set(own, f"{module}/{adapter_key(weight)}" if module else adapter_key(weight), factors)
        for path, leaf in zip(leaf_paths, bank.leaves[name], strict=True):
            _set(own, path, Trainable(leaf[...]))
        adapters[name] = own
    return AdapterBank(base_tree(bank.base), adapters, {n: bank.config(n) for n in bank.names})


def put_tree(
    bank: LoraBank, name: str, adapted: PyTree, config: LoraConfig, rngs: Any = None
) -> None:
    """Adds to ``bank`` the adapter of an adapted tree on its `as_adapter_bank` base.

    Args:
      bank: the NNX `LoraBank` (changed in place).
      name: the new adapter's name.
      adapted: an adapted params tree (``load_adapter``, ``import_peft`` on
        ``as_adapter_bank(bank).base``, or ``AdapterBank.select``).
      config: its `LoraConfig`.
      rngs: ``nnx.Rngs`` for LoRA dropout (see `LoraBank.put`).
    """
    inner, _ = params_of(adapted)
    adapters = {}
    for _, module, weight, layer in iter_adapters(inner):
        path = f"{module}/{weight}" if module else weight
        factors = adapter_at(layer, weight)
        adapters[path] = holding(
            weight_at(bank.base, path),
            meta.unbox(factors.a),
            meta.unbox(factors.b),
            factors.scale,
            factors.delta_eq,
        )
    replaced = _bank._replaced(_bank._own(inner))
    leaves = {"/".join(p): meta.unbox(v) for p, v in replaced.items()}
    bank.put(name, config, adapters, leaves, rngs=rngs)
