"""A bank on disk: one self-describing adapter per name, and PEFT adapters into one bank.

`save_bank` writes each adapter with `save_adapter` into ``<directory>/<name>`` (so each
loads alone with `load_adapter` and exports with `export_peft`) and the names in id
order into ``<directory>/bank.json``. `load_bank` reads them back onto base params;
each adapter's record carries fingerprints of the base it was trained on, and one trained
on another base is refused with its name. PEFT adapters (a directory holding
``adapter_config.json``, or PEFT's multi-adapter layout: the first adapter at the root,
the others in subdirectories) load into one bank the same way, with ``module_map``.
An NNX `LoraBank` is read and written through its `AdapterBank` view (`_bank_nnx_trees`):
the same files, loadable by either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlora._adapter_files import load_adapter, save_adapter
from jaxlora._bank import AdapterBank, bank_of
from jaxlora._bank_nnx import LoraBank
from jaxlora._bank_nnx_trees import as_adapter_bank, put_tree
from jaxlora._peft_import import import_peft

_INDEX = "bank.json"
_PEFT_CONFIG = "adapter_config.json"


def save_bank(directory: str | os.PathLike, bank: AdapterBank | LoraBank) -> None:
    """Saves every adapter of ``bank`` as ``<directory>/<name>`` plus the list of names.

    Args:
      directory: where to write (created if missing).
      bank: the `AdapterBank` or NNX `LoraBank` (its base is not written).
    """
    if isinstance(bank, LoraBank):
        bank = as_adapter_bank(bank)
    root = Path(directory)
    for name in bank.names:
        save_adapter(root / name, bank.select(name), bank.config(name))
    (root / _INDEX).write_text(json.dumps({"adapters": list(bank.names)}, indent=1))


def _peft_dirs(root: Path) -> dict[str, Path]:
    """PEFT's layout: ``{name: directory}``, the root's own adapter named ``default``."""
    found = {"default": root} if (root / _PEFT_CONFIG).is_file() else {}
    for sub in sorted(p for p in root.iterdir() if (p / _PEFT_CONFIG).is_file()):
        found[sub.name] = sub
    return found


def load_bank(
    directory: str | os.PathLike,
    params: Any,
    *inputs: Any,
    names: Sequence[str] | None = None,
    module_map: Any = None,
    rngs: Any = None,
    **kwargs: Any,
) -> Any:
    """Loads the adapters in ``directory`` into a bank on ``params``.

    Args:
      directory: written by `save_bank`, or holding PEFT adapters (pass ``module_map``).
      params: base params, or an `AdapterBank` to add to (either may sit in a variables
        dict under ``"params"``), or an NNX `LoraBank` to add to (in place; the base
        module must hold the weights the adapters were trained on).
      *inputs: example inputs, for PEFT adapters on weights outside Flax's layers (see
        `import_peft`).
      names: load only these (default: all, in saved order).
      module_map: PEFT module names -> flax paths, for PEFT adapters.
      rngs: NNX: ``nnx.Rngs`` for the LoRA dropout of loaded adapters (default
        ``nnx.Rngs(0)``).
      **kwargs: passed to `load_adapter` / `import_peft` (``sharding``, ...).

    Returns:
      The bank, in the form of ``params`` (the `LoraBank` itself for NNX).

    Raises:
      ValueError: no adapter there, a name already in the bank, or an adapter made for
        another base (the message names it).
    """
    root = Path(directory)
    nnx_bank = params if isinstance(params, LoraBank) else None
    inner, rebuild = bank_of(params) if nnx_bank is None else (nnx_bank, None)
    if nnx_bank is not None:
        bank = as_adapter_bank(nnx_bank)
    else:
        bank = inner if isinstance(inner, AdapterBank) else AdapterBank(inner)
    peft = _peft_dirs(root) if root.is_dir() else {}
    if (root / _INDEX).is_file():
        found = {n: root / n for n in json.loads((root / _INDEX).read_text())["adapters"]}
    elif peft:
        if nnx_bank is not None:
            raise ValueError(
                f"load_bank: {root} holds PEFT adapters {list(peft)}; an NNX LoraBank loads "
                "directories written by jaxlora.save_bank only. Import each with "
                "jaxlora.import_peft(path, module, *inputs), or load them into a linen "
                "AdapterBank."
            )
        if module_map is None:
            raise ValueError(
                f"load_bank: {root} holds PEFT adapters {list(peft)}; pass module_map= "
                "(e.g. jaxlora.peft_module_maps['llama'])."
            )
        found = peft
    else:
        raise ValueError(
            f"load_bank: {root} holds neither a bank written by jaxlora.save_bank ({_INDEX}) "
            f"nor PEFT adapters ({_PEFT_CONFIG})."
        )
    for name in found if names is None else names:
        if name not in found:
            raise ValueError(f"load_bank: no adapter {name!r} in {root}; it holds {list(found)}.")
        try:
            if found is peft:
                config, adapted = import_peft(
                    found[name], bank.base, *inputs, module_map=module_map, **kwargs
                )
            else:
                config, adapted = load_adapter(found[name], bank.base, **kwargs)
        except ValueError as e:
            raise ValueError(f"load_bank: adapter {name!r}: {e}") from e
        if nnx_bank is not None:
            put_tree(nnx_bank, name, adapted, config, rngs)
        else:
            bank = bank.add(name, adapted, config)
    return nnx_bank if nnx_bank is not None else rebuild(bank)
