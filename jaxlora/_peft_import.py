"""`import_peft`: a PEFT LoRA adapter onto a linen params tree or an NNX module.

In two steps. Matching, which needs no knowledge of how the model uses its weights: every
torch module (or parameter) of the file finds its flax weight through the module map, and
each flax weight gets its rank and scale (`_peft_match`). Converting, which does: the factors
are laid out over the weight's input and output axes (`_peft_factors`), which a linen
tree's 2-D kernels, embeddings and conv kernels say by themselves, an adapter already on
the weight says by its ``delta_eq``, and for an NNX module `lorafy` finds by tracing it;
then they are attached to the tree or put into the module (`_peft_attach`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlora import (
    _base_checks,
    _config,
    _peft_attach,
    _peft_files,
    _peft_tokens,
    _records,
    _token_records,
)
from jaxlora._config import LoraConfig
from jaxlora._peft_files import PREFIX, TORCH_LEAF
from jaxlora._peft_flax import base_tree
from jaxlora._peft_match import Plan, index_of, plans_of, resolve, targeted_missing
from jaxlora._peft_names import ModuleMap
from jaxlora._tree import PyTree, subtree, unwrap_trainable, without_adapters


def _flax_leaf(module: Mapping[str, Any], torch_leaf: str) -> str | None:
    candidates = [k for k, v in TORCH_LEAF.items() if v == torch_leaf and k in module]
    return candidates[0] if len(candidates) == 1 else None


def _leaf(
    name: str, torch_leaf: str, value: np.ndarray, path: str, node: Any
) -> tuple[_records.LeafSpec, np.ndarray]:
    """A fully trained flax leaf from a PEFT tensor (kernels transposed, base dtype kept)."""
    leaf = _flax_leaf(node, torch_leaf) if isinstance(node, Mapping) else None
    if leaf is None:
        raise ValueError(
            f"import_peft: {PREFIX}{name}.{torch_leaf} has no flax counterpart: module "
            f"{path!r} has no single leaf among "
            f"{[k for k, v in TORCH_LEAF.items() if v == torch_leaf]}; check module_map."
        )
    base = _records.unmark(node[leaf])
    array = value.T if leaf == "kernel" else value
    if array.shape != base.shape:
        raise ValueError(
            f"import_peft: {PREFIX}{name}.{torch_leaf} has shape {value.shape}; the flax "
            f"{leaf} {path}/{leaf} is {base.shape}"
            + (", stored transposed from torch's (out, in)" if leaf == "kernel" else "")
            + ". The adapter was trained for another base."
        )
    spec = _records.LeafSpec(f"{path}/{leaf}", tuple(base.shape), jax.numpy.dtype(base.dtype).name)
    return spec, array.astype(base.dtype)


def _leaves(
    tensors: Mapping[tuple[str, str], np.ndarray],
    modules: Mapping[str, str],
    plain: Mapping[str, Any],
    peft_config: Mapping[str, Any],
) -> tuple[list[tuple[_records.LeafSpec, np.ndarray]], list[str]]:
    """The fully trained leaves of the file, and what does not match (both ways)."""
    leaves, unmatched = [], []
    biases = peft_config.get("bias", "none") != "none"
    for (name, torch_leaf), value in tensors.items():
        path = modules.get(name)
        key = f"{PREFIX}{name}.{torch_leaf}"
        if path is None:
            unmatched.append(f"{key}: no flax module")
        elif not (
            _peft_files.in_modules_to_save(peft_config, name) or (biases and torch_leaf == "bias")
        ):
            unmatched.append(f"{key}: neither in modules_to_save nor a bias PEFT trains")
        else:
            leaves.append(_leaf(name, torch_leaf, value, path, subtree(plain, path)))
    loaded = {spec.path for spec, _ in leaves}
    for name, path in modules.items():
        if not _peft_files.in_modules_to_save(peft_config, name):
            continue
        node = subtree(plain, path)
        for leaf, value in node.items() if isinstance(node, Mapping) else ():
            missing = f"{path}/{leaf}" not in loaded
            if leaf in TORCH_LEAF and not isinstance(value, Mapping) and missing:
                unmatched.append(
                    f"{PREFIX}{name}.{TORCH_LEAF[leaf]} (modules_to_save) is missing from the file"
                )
    return leaves, unmatched


def _exact(path: str) -> str:
    return "re:" + re.escape(path)


def _lora_config(
    peft_config: Mapping[str, Any],
    plans: Sequence[Plan],
    leaves: Sequence[_records.LeafSpec],
    modules: Mapping[str, str],
    dtype: str,
) -> LoraConfig:
    """The `LoraConfig` of an imported adapter, naming its layers exactly."""
    r, alpha = peft_config["r"], peft_config["lora_alpha"]
    names = {path: name for name, path in modules.items()}
    saved = set()
    for leaf in leaves:
        parts = leaf.path.split("/")[:-1]
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        top = next(
            (p for p in prefixes if _peft_files.in_modules_to_save(peft_config, names.get(p, ""))),
            None,
        )
        if top is not None:
            saved.add(top)
    return LoraConfig(
        rank=r,
        alpha=alpha,
        targets=[_exact(p.path) for p in plans],
        rank_pattern={_exact(p.path): p.rank for p in plans if p.rank != r},
        alpha_pattern={_exact(p.path): p.alpha for p in plans if p.alpha != alpha},
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        rslora=bool(peft_config.get("use_rslora")),
        dtype=dtype,
        modules_to_save=[_exact(p) for p in sorted(saved)],
        bias=peft_config.get("bias", "none"),
        init=_peft_files.init_of(peft_config),
        use_dora=bool(peft_config.get("use_dora")),
    )


def import_peft(
    directory: str | os.PathLike,
    model: PyTree | nnx.Module,
    *inputs: Any,
    module_map: ModuleMap,
    rngs: nnx.Rngs | None = None,
    sharding: jax.sharding.Sharding | None = None,
    allow_unmatched: bool = False,
) -> tuple[LoraConfig, PyTree | nnx.Module]:
    """Loads a PEFT LoRA adapter (``adapter_config.json`` + safetensors) onto a flax model.

    Every key must find its flax weight through ``module_map`` with the expected shapes
    (PEFT's layouts, see `export_peft`): r and alpha from ``r``/``rank_pattern`` and
    ``lora_alpha``/``alpha_pattern`` (PEFT's matching rules), ``use_rslora`` honoured,
    ``target_parameters`` (expert weights, routers) and Conv LoRA read. Torch modules that a
    flax weight fuses (``q_proj``/``k_proj``/``v_proj`` of a ``qkv_einsum``) load onto it
    with one A when theirs are equal, else with their As stacked along the rank and B
    block-diagonal (rank the sum of theirs: exact); a fused torch weight (``gate_up_proj``)
    gives each flax weight its block of B and the shared A. The head factors PEFT saves
    for an embedding tied to it (``ensure_weight_tying``) are the embedding's own.

    **linen** (``model`` a params tree, base or adapted): adapters replace those already
    there. Which axes of a weight meet the input is known for a 2-D ``kernel``/
    ``embedding`` and a conv kernel ``(*window, in, out)``; any other weight (an einsum's
    ``w``) must already carry an adapter, from `lorafy` with any rank, whose layout is kept.
    **NNX** (``model`` a base module): a copy is adapted by `lorafy` with the imported
    config, given example ``inputs`` of its ``__call__`` when it has weights outside Flax's
    layers (tunix models do), and the factors are put in. Arrays are placed like the
    weights they adapt (see `load_adapter`), or on ``sharding``.

    Args:
      directory: a directory written by PEFT's ``save_pretrained`` (or `export_peft`).
      model: base params (or an adapted tree whose adapters are replaced), or an NNX module.
      *inputs: NNX: example positional inputs of ``model.__call__``.
      module_map: flax name -> torch name (see `peft_module_map`, `peft_module_maps`).
      rngs: NNX: ``nnx.Rngs`` for the adapted module (LoRA dropout); default ``nnx.Rngs(0)``.
      sharding: put every array here instead of following the base.
      allow_unmatched: load what matches and warn about the rest (keys with no flax
        layer, targeted layers or ``modules_to_save`` weights missing from the file),
        instead of raising.

    Returns:
      ``(config, adapted)``: a `LoraConfig` naming the adapted weights exactly
      (``"re:<path>"`` patterns) with PEFT's rank, alpha, dropout, rsLoRA, bias and
      ``modules_to_save``; and the adapted tree, or the adapted copy of the NNX module.

    Raises:
      FileNotFoundError: no ``adapter_config.json`` or ``adapter_model.safetensors``
        (pickle ``.bin`` files are never read).
      ValueError: a corrupt file, a key without PEFT's prefix, unknown or missing keys
        (without ``allow_unmatched``), shapes of another base, transposed factors, a rank
        that disagrees with the config, or an unsupported PEFT option.

    Example:
      >>> cfg, lora_params = jaxlora.import_peft(
      ...     "peft_dir", base_params, module_map=jaxlora.peft_module_maps["bert"])
      >>> jaxlora.LoraModel(model, cfg).apply({"params": lora_params}, ids)
      >>> cfg, lora_llama = jaxlora.import_peft(
      ...     "peft_dir", llama, *inputs, module_map=jaxlora.peft_module_maps["tunix-llama3"])
    """
    who = "import_peft"
    path = Path(directory)
    source = f"PEFT adapter {str(path)!r}"
    peft_config = _peft_files.read_config(path)
    tensors = _peft_files.read_tensors(path)
    token_rows, tensors = _peft_tokens.split(tensors)
    if peft_config["peft_type"] == _peft_tokens.ROWS_ONLY:
        return _rows_only(
            model, inputs, token_rows, tensors, peft_config, module_map, source, rngs, sharding
        )
    factors, leaf_tensors = _peft_files.group(tensors, path / _peft_files.WEIGHTS_NAME)
    if not factors:
        raise ValueError(f"import_peft: {source} holds no LoRA factors (lora_A / lora_B).")
    inner = base_tree(model, who=who)
    plain = without_adapters(unwrap_trainable(inner))
    index = index_of(plain, module_map, who=who)
    by_name, unmatched = resolve(factors, index, peft_config, module_map)
    plans, more = plans_of(by_name, index, plain, peft_config)
    unmatched += more + targeted_missing(index, by_name, plain, peft_config)
    if not plans:
        raise ValueError(
            f"import_peft: no LoRA factor of {source} matches a layer of these params, so "
            f"there is nothing to load (allow_unmatched=True loads a part, not none):"
            f"{_config.listing(unmatched)}\nCheck module_map: it must send the flax "
            "layer paths to the torch module names in the file."
        )
    modules = {n: e[0].path for n, e in index.items() if e[0].block is None and e[0].parts == 1}
    leaves, unmatched_leaves = _leaves(leaf_tensors, modules, plain, peft_config)
    dtype = by_name[plans[0].sources[0]].a.dtype.name
    config = _lora_config(peft_config, plans, [spec for spec, _ in leaves], modules, dtype)
    tokens = _peft_tokens.specs(token_rows, peft_config, index, plain, source)
    if tokens[0]:
        ids = {_exact(spec.name): spec.indices for spec in tokens[0]}
        config = dataclasses.replace(config, trainable_token_indices=ids)
    unmatched += unmatched_leaves
    match = _peft_attach.Match(plans, by_name, peft_config, leaves, unmatched)
    if isinstance(model, nnx.Module):
        _base_checks.report_unmatched(
            unmatched, source=source, who=who, allow_unmatched=allow_unmatched
        )
        module = _peft_attach.into_nnx(model, config, match, inputs, rngs, sharding)
        _peft_tokens.set_rows(module, *tokens, sharding)
        return config, module
    adapted = _peft_attach.into_linen(
        model, inner, match, source, sharding, allow_unmatched, config.init
    )
    values = _token_records.placed(adapted, *tokens, sharding)
    return config, _token_records.attach(adapted, tokens[0], values)


def _rows_only(
    model: PyTree | nnx.Module,
    inputs: tuple,
    rows: dict[str, np.ndarray],
    rest: Mapping[str, np.ndarray],
    peft_config: Mapping[str, Any],
    module_map: ModuleMap,
    source: str,
    rngs: nnx.Rngs | None,
    sharding: jax.sharding.Sharding | None,
) -> tuple[LoraConfig, PyTree | nnx.Module]:
    """A PEFT ``TrainableTokensConfig`` adapter: token rows without LoRA (`_peft_tokens`)."""
    if rest or not rows:
        raise ValueError(
            f"import_peft: {source} is a TRAINABLE_TOKENS adapter but holds "
            f"{sorted(rest) or 'no token rows'}; expected only "
            "'base_model.model.<module>.trainable_tokens_delta' tensors."
        )
    plain = without_adapters(unwrap_trainable(base_tree(model, who="import_peft")))
    index = index_of(plain, module_map, who="import_peft")
    rows = _peft_tokens.without_tied_copies(rows, index)
    specs, values = _peft_tokens.specs(rows, peft_config, index, plain, source)
    config = LoraConfig(
        targets=[],
        dtype=values[0].dtype.name,
        trainable_token_indices={_exact(spec.name): spec.indices for spec in specs},
    )
    if isinstance(model, nnx.Module):
        module = _peft_attach.adapted_copy(model, config, inputs, rngs)
        _peft_tokens.set_rows(module, specs, values, sharding)
        return config, module
    placed = _token_records.placed(model, specs, values, sharding)
    return config, _token_records.attach(model, specs, placed)
