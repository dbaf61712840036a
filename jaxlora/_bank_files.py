"""A bank on disk: one self-describing adapter per name, and PEFT adapters into one bank.

`save_bank` writes each adapter with `save_adapter` into ``<directory>/<name>`` (so each
loads alone with `load_adapter` and exports with `export_peft`) and the names in id
order into ``<directory>/bank.json``. `load_bank` reads them back onto base params;
each adapter's record carries fingerprints of the base it was trained on, and one trained
on another base is refused with its name. PEFT adapters (a directory holding
``adapter_config.json``, or PEFT's multi-adapter layout: the first adapter at the root,
the others in subdirectories) load into one bank the same way, with ``module_map``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlora._adapter_files import load_adapter, save_adapter
from jaxlora._bank import AdapterBank, bank_of
from jaxlora._peft_import import import_peft

_INDEX = "bank.json"
_PEFT_CONFIG = "adapter_config.json"


def save_bank(directory: str | os.PathLike, bank: AdapterBank) -> None:
    """Saves every adapter of ``bank`` as ``<directory>/<name>`` plus the list of names.

    Args:
      directory: where to write (created if missing).
      bank: the `AdapterBank` (its base is not written).
    """
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
    **kwargs: Any,
) -> Any:
    """Loads the adapters in ``directory`` into a bank on ``params``.

    Args:
      directory: written by `save_bank`, or holding PEFT adapters (pass ``module_map``).
      params: base params, or an `AdapterBank` to add to (either may sit in a variables
        dict under ``"params"``).
      *inputs: example inputs, for PEFT adapters on weights outside Flax's layers (see
        `import_peft`).
      names: load only these (default: all, in saved order).
      module_map: PEFT module names -> flax paths, for PEFT adapters.
      **kwargs: passed to `load_adapter` / `import_peft` (``sharding``, ...).

    Returns:
      The bank, in the form of ``params``.

    Raises:
      ValueError: no adapter there, a name already in the bank, or an adapter made for
        another base (the message names it).
    """
    root = Path(directory)
    inner, rebuild = bank_of(params)
    bank = inner if isinstance(inner, AdapterBank) else AdapterBank(inner)
    peft = _peft_dirs(root) if root.is_dir() else {}
    if (root / _INDEX).is_file():
        found = {n: root / n for n in json.loads((root / _INDEX).read_text())["adapters"]}
    elif peft:
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
        bank = bank.add(name, adapted, config)
    return rebuild(bank)
