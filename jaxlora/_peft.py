"""PEFT LoRA adapters both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names every tensor after the torch module it belongs to, under the ``PeftModel``
prefix ``base_model.model.``, in torch's ``(out, in)`` layout:

===================================================  ======================================
PEFT tensor                                          jaxlora
===================================================  ======================================
``<module>.lora_A.weight`` ``(r, in)``               A ``(*in, r)``, input axes flattened
``<module>.lora_B.weight`` ``(out, r)``              B ``(r, *out)``, output axes flattened
``<module>.lora_embedding_A/B``                      an embedding's A ``(vocab, r)`` / B
``<conv>.lora_A.weight`` ``(r, in, *window)``        A of a Conv kernel ``(*window, in, r)``
``<experts>[.base_layer].lora_A.weight``             A ``(experts, in, r)``
``(experts·r, in)`` (``target_parameters``)
``<module>.weight`` / ``.bias``                      ``modules_to_save`` leaves
``<module>.base_layer.bias``                         bias of an adapted layer
===================================================  ======================================

`_peft_layouts` converts the factors, `_peft_names` holds the module maps (flax names ->
torch names, fused and split weights), `_peft_files` reads and writes the files and
`_peft_flax` reads linen trees and NNX modules alike.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from jaxlora import _init_from_weights, _layout, _peft_files, _peft_tokens, _records, _token_records
from jaxlora import _peft_layouts as layouts
from jaxlora._config import LoraConfig, path_matches
from jaxlora._peft_files import PREFIX, TORCH_LEAF
from jaxlora._peft_flax import Adapted, Layer, adapted
from jaxlora._peft_names import ModuleMap, facts, listed, slots
from jaxlora._tree import PyTree


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _claim(owners: dict[str, str], name: str, path: str, *, who: str) -> None:
    if owners.setdefault(name, path) != path:
        raise ValueError(
            f"{who}: module_map sends both {owners[name]!r} and {path!r} to {name!r}; it "
            "must give each flax module its own torch name (PEFT keys tensors by it)."
        )


def _torch_name(module_map: ModuleMap, path: str, *, who: str) -> str:
    name = module_map(path)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{who}: module_map({path!r}) gave {name!r}; it must return the torch module "
            "name of every adapted or saved layer, e.g. jaxlora.peft_module_map()."
        )
    return name


def _saved_modules(modules: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The outermost module paths that ``modules_to_save`` patterns select."""
    matched = [p for p in modules if any(path_matches(p, q) for q in patterns)]
    return [p for p in matched if not any(p.startswith(m + "/") for m in matched)]


def _torch_leaf(path: str, value: np.ndarray, *, who: str) -> tuple[str, np.ndarray]:
    leaf = path.rsplit("/", 1)[-1]
    if leaf not in TORCH_LEAF or (leaf == "kernel" and value.ndim != 2):
        raise ValueError(
            f"{who}: trained parameter {path!r} of shape {value.shape} has no PEFT "
            f"equivalent; PEFT saves {sorted(TORCH_LEAF)} leaves (kernels 2-D)."
        )
    return TORCH_LEAF[leaf], value.T if leaf == "kernel" else value


# ------------------------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True)
class _Target:
    """One torch module (or parameter) PEFT adapts, and the flax adapters behind it.

    ``layers`` is one adapter, or the blocks of a torch weight that fuses several in
    order; ``part`` picks one of the ``parts`` torch modules a flax weight's first axis
    splits into.
    """

    name: str
    kind: str
    layers: tuple[Layer, ...]
    part: int = 0
    parts: int = 1


def _kind(name: str, layer: Layer, module_map: ModuleMap) -> str:
    if layer.spec.weight_key == "embedding" or listed(name, facts(module_map, "embeddings")):
        return layouts.EMBEDDING
    if layer.conv or listed(name, facts(module_map, "convs")):
        return layouts.CONV
    if listed(name, facts(module_map, "parameters")):
        return layouts.PARAMETER
    return layouts.LINEAR


def _blocks(
    name: str, entries: list, weights: Sequence[str], module_map: ModuleMap, who: str
) -> list:
    """The adapters fused into torch weight ``name``, in block order; all must be adapted."""
    blocks = sorted(entries, key=lambda e: e[0])
    expected = sorted(
        (block, w) for w in weights for n, block in slots(module_map, w, who=who) if n == name
    )
    missing = [w for block, w in expected if block not in {e[0] for e in blocks}]
    if missing or [e[0] for e in blocks] != list(range(len(blocks))):
        raise ValueError(
            f"{who}: torch weight {name!r} fuses the outputs of {[w for _, w in expected]} "
            f"(blocks in order) but only {[e[1].spec.path for e in blocks]} are adapted; "
            "PEFT adapts the fused weight as one, so target all of them or none."
        )
    return blocks


def _export_targets(
    layers: Sequence[Layer], weights: Sequence[str], module_map: ModuleMap, *, who: str
) -> list[_Target]:
    """Where each adapter goes in torch, checked for what PEFT can express."""
    by_name: dict[str, list] = {}
    for layer in layers:
        found = slots(module_map, layer.spec.path, who=who)
        if not found:
            _torch_name(module_map, layer.spec.path, who=who)  # raises, naming the layer
        for part, (name, block) in enumerate(found):
            by_name.setdefault(name, []).append((block, layer, part, len(found)))
    targets = []
    for name, entries in by_name.items():
        whole = [e for e in entries if e[0] is None]
        if whole and len(entries) > 1:
            other = next(e for e in entries if e is not whole[0])
            _claim({name: whole[0][1].spec.path}, name, other[1].spec.path, who=who)
        if not whole:
            entries = _blocks(name, entries, weights, module_map, who)
        _, layer, part, parts = entries[0]
        kind = _kind(name, layer, module_map)
        target = _Target(name, kind, tuple(e[1] for e in entries), part, parts)
        _check_expressible(target, who=who)
        targets.append(target)
    return targets


def _check_expressible(target: _Target, *, who: str) -> None:
    layer = target.layers[0].spec
    where = f"{who}: layer {layer.path!r} ({target.name}, {layer.kernel_shape} adapted as "
    where += f"{layer.delta_eq!r})"
    labels = _layout.delta_labels(layer.delta_eq)
    a, b, kernel = (set(s) for s in labels)
    stacked = layouts.stacked(layer.delta_eq, len(layer.kernel_shape))
    problem = None
    if stacked and target.kind != layouts.PARAMETER:
        problem = (
            "its weight has a stacked axis (nn.scan layers, experts); PEFT adapts stacked "
            "weights only as expert parameters (target_parameters): if it is one, name the "
            "torch parameter in the module map's parameters"
        )
    elif target.kind in (layouts.EMBEDDING, layouts.CONV) and (
        len(target.layers) > 1 or target.parts > 1
    ):
        problem = f"PEFT cannot fuse or split a {target.kind} layer"
    elif target.kind == layouts.CONV and (len(kernel) < 3 or b & kernel != {labels[2][-1]}):
        problem = "a conv kernel must be (*window, in, out), contracted over all but its last axis"
    elif target.parts > 1 and (
        stacked or labels[2][0] not in b - a or layer.kernel_shape[0] != target.parts
    ):
        problem = (
            f"its first axis must be an output axis of size {target.parts} to split it into "
            f"{target.parts} torch modules"
        )
    if problem:
        raise ValueError(f"{where}: {problem}. Exclude it from the targets to export the rest.")


def _flat(target: _Target) -> layouts.Flat:
    flats = [
        layouts.to_flat(
            layer.a,
            layer.b,
            layer.spec.delta_eq,
            layer.spec.kernel_shape,
            layer.spec.scale,
            where=f"layer {layer.spec.path!r}",
            magnitude=layer.magnitude,
        )
        for layer in target.layers
    ]
    if target.parts > 1:
        (flat,) = flats
        size = flat.b.shape[-1] // target.parts
        return layouts.split_outputs(flat, [size] * target.parts)[target.part]
    return layouts.concat_outputs(flats)


def _check_init_expressible(config: LoraConfig, targets: Sequence[_Target], *, who: str) -> None:
    """Refuses a PiSSA/OLoRA adapter that PEFT would not rebuild the same residual for.

    PEFT recomputes the residual of each torch Linear when it loads such an adapter; that
    equals jaxlora's only when the torch weight is the adapted flax weight itself, not an
    expert parameter (PEFT does not define these inits there) nor a block of a fused weight.
    """
    if not _init_from_weights.is_from_weights(config.init):
        return
    for t in targets:
        if t.kind != layouts.LINEAR or len(t.layers) != 1 or t.parts != 1:
            what = "fused or split weight" if t.kind == layouts.LINEAR else t.kind
            raise ValueError(
                f"{who}: init={config.init!r} adapter of {t.layers[0].spec.path!r} maps to "
                f"torch {t.name!r}, a {what}: "
                "PEFT would recompute another residual for it on loading. Convert it to plain "
                "LoRA first: plain_cfg, plain = jaxlora.convert_to_lora(params, base, cfg)."
            )


def _depths(targets: Sequence[_Target], *, who: str) -> dict[str, int]:
    """How deep PEFT nests each parameter target's factors under its module's ParamWrappers."""
    by_module: dict[str, list[str]] = {}
    for t in targets:
        if t.kind == layouts.PARAMETER:
            by_module.setdefault(t.name.rpartition(".")[0], []).append(t.name)
    depths = {}
    for module, names in by_module.items():
        ordered = _peft_files.wrapping_order(names, module, who=who)
        depths.update({name: len(ordered) - 1 - i for i, name in enumerate(ordered)})
    return depths


def _alpha(config: LoraConfig, layer: Layer, rank: int) -> float:
    """PEFT's alpha for an adapter of ``rank`` with ``layer``'s scale (a fused weight's rank
    is the sum of its blocks' when they do not share A)."""
    alpha = config.alpha_for(layer.spec.targets)
    if rank == layer.spec.rank:
        return alpha
    ratio = rank / layer.spec.rank
    return alpha * (math.sqrt(ratio) if config.rslora else ratio)


def _tied_head(
    module_map: ModuleMap, targets: Sequence[_Target], weights: Sequence[str]
) -> tuple[str, _Target] | None:
    """The torch head tied to an adapted input embedding (see `NameMap.tied`), if any: when
    no flax weight of this model maps to the head, the model reuses the embedding for it."""
    tied = getattr(module_map, "tied", None)
    if tied is None or any(module_map(w) == tied[0] for w in weights):
        return None
    embedding = next((t for t in targets if t.name == tied[1]), None)
    return None if embedding is None else (tied[0], embedding)


def export_peft(
    directory: str | os.PathLike,
    adapted_model: PyTree | nnx.Module,
    config: LoraConfig,
    *,
    module_map: ModuleMap,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Writes adapters as a PEFT LoRA adapter, loadable by ``PeftModel.from_pretrained``.

    Writes ``adapter_config.json`` (every field PEFT 0.22 writes; ``target_modules``,
    ``target_parameters``, ``rank_pattern`` and ``alpha_pattern`` name the exact torch
    modules) and ``adapter_model.safetensors`` in PEFT's layouts: ``lora_A.weight``
    ``(r, in)`` / ``lora_B.weight`` ``(out, r)`` with a weight's input and output axes
    flattened in its axis order (a ``(d, heads, head_dim)`` einsum weight is torch's
    ``(heads·head_dim, d)``), ``lora_embedding_A/B`` for embeddings, Conv LoRA ``(r, in,
    *window)`` / ``(out, r, 1, 1)`` for convolution kernels ``(*window, in, out)``, PEFT's
    ``target_parameters`` layout for expert weights ``(experts, ...)``, and the
    ``modules_to_save`` and bias tensors. A flax weight split over several torch modules
    (see `peft_module_map`) gives each its slice of B and the shared A; flax weights fused
    into one torch weight share one adapter (rank r if their A are equal, else the sum
    of their ranks with block-diagonal B: exact either way). An embedding the torch model
    ties to its output head (the module map's ``tied``) is exported with PEFT's
    ``ensure_weight_tying``, as jaxlora adapts both uses. The directory is replaced
    atomically; with several JAX processes every process calls it and process 0 writes.

    Args:
      directory: output directory; created, or replaced if it holds only a PEFT adapter.
      adapted_model: an adapted linen tree (params collection or variables dict) or NNX
        module.
      config: the `LoraConfig` it was adapted with.
      module_map: flax adapter name -> torch name (`peft_module_map()`, an entry of
        `peft_module_maps`, or any callable).
      base_model_name_or_path: recorded for PEFT (e.g. ``"bert-base-uncased"``).
      task_type: PEFT task type (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``) or None.

    Raises:
      ValueError: an adapter PEFT has no layout for (stacked axes other than leading
        experts, a fused torch weight with only some of its blocks adapted), a module map
        that gives two layers one name, or dropout on expert weights (PEFT refuses it).

    Example:
      >>> jaxlora.export_peft("out/peft", lora_params, cfg, module_map=jaxlora.peft_module_map())
      >>> # torch: PeftModel.from_pretrained(torch_model, "out/peft")
    """
    who = "export_peft"
    model = adapted(adapted_model, who=who)
    _records.check_config([layer.spec for layer in model.layers], config, who=who)
    nodes = _token_records.nodes_of(adapted_model)
    if nodes and not model.layers:  # rows trained without LoRA: PEFT's TrainableTokensConfig
        peft_config, tensors = _peft_tokens.rows_only_config(
            nodes, module_map, base_model_name_or_path, task_type, who=who
        )
        _peft_files.write(Path(directory), peft_config, tensors)
        return
    targets = _export_targets(model.layers, model.weights, module_map, who=who)
    if config.dropout and any(t.kind == layouts.PARAMETER for t in targets):
        raise ValueError(
            f"{who}: PEFT refuses lora_dropout on target_parameters (expert weights) but the "
            f"config has dropout={config.dropout}; export with "
            "dataclasses.replace(config, dropout=0.0) (dropout only acts in training)."
        )
    _check_init_expressible(config, targets, who=who)
    depths = _depths(targets, who=who)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas = {}, {}
    for t in targets:
        flat = _flat(t)
        window = t.layers[0].spec.kernel_shape[:-2]
        a_key, b_key = _peft_files.factor_keys(
            t.name.rpartition(".")[0] if t.kind == layouts.PARAMETER else t.name,
            depths.get(t.name, 0),
            t.kind == layouts.EMBEDDING,
        )
        tensors[a_key], tensors[b_key] = layouts.to_torch(t.kind, flat, window)
        if flat.magnitude is not None:
            tensors[PREFIX + t.name + _peft_files.MAGNITUDE] = flat.magnitude
        ranks[t.name], alphas[t.name] = flat.rank, _alpha(config, t.layers[0], flat.rank)
    tied = _tied_head(module_map, targets, model.weights)
    if tied is not None and config.use_dora:
        raise ValueError(
            f"{who}: the adapted embedding {tied[1].name!r} is tied to the torch head "
            f"{tied[0]!r}; PEFT applies DoRA to the head as a Linear of its own (a norm per "
            "vocabulary entry), not as jaxlora does (the embedding's merged weight). Exclude "
            "the embedding from the targets to export this DoRA adapter."
        )
    if tied is not None:
        head, embedding = tied
        a_key, b_key = _peft_files.factor_keys(embedding.name, 0, True)
        head_a, head_b = _peft_files.factor_keys(head, 0, False)
        tensors[head_a], tensors[head_b] = tensors[b_key].T, tensors[a_key].T
    tensors.update(_exported_leaves(model, targets, config, module_map, who=who))
    token_tensors, token_ids = _peft_tokens.exported(nodes, module_map, who=who)
    tensors.update(token_tensors)
    saved = _saved_modules(model.modules, config.modules_to_save)
    peft_config = {
        **_peft_files.CONFIG_DEFAULTS,
        "alpha_pattern": {n: _number(a) for n, a in alphas.items() if a != config.alpha},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": config.bias,
        "ensure_weight_tying": tied is not None,
        "init_lora_weights": _peft_files.init_name(config.init),
        "lora_alpha": _number(config.alpha),
        "lora_dropout": config.dropout,
        "modules_to_save": [_torch_name(module_map, m, who=who) for m in saved] or None,
        "r": config.rank,
        "rank_pattern": {n: r for n, r in ranks.items() if r != config.rank},
        "target_modules": sorted(n for n, d in ranks.items() if n not in depths) or None,
        "target_parameters": sorted(depths) or None,
        "task_type": task_type,
        "trainable_token_indices": token_ids or None,
        "use_dora": config.use_dora,
        "use_rslora": config.rslora,
    }
    _peft_files.write(Path(directory), peft_config, tensors)


def _exported_leaves(
    model: Adapted,
    targets: Sequence[_Target],
    config: LoraConfig,
    module_map: ModuleMap,
    *,
    who: str,
) -> dict[str, np.ndarray]:
    """``modules_to_save`` and bias tensors, by PEFT key."""
    owners = {t.name: t.layers[0].spec.path for t in targets if len(t.layers) == 1}
    adapted_layers = {
        t.layers[0].spec.path: t.name for t in targets if len(t.layers) == 1 and t.parts == 1
    }
    saved = _saved_modules(model.modules, config.modules_to_save)
    modules = [spec.path.rpartition("/")[0] for spec, _ in model.leaves]
    for module in dict.fromkeys([*saved, *modules]):
        if module not in adapted_layers:
            _claim(owners, _torch_name(module_map, module, who=who), module, who=who)
    tensors = {}
    for (spec, value), module in zip(model.leaves, modules, strict=True):
        torch_leaf, array = _torch_leaf(spec.path, value, who=who)
        if module in adapted_layers:  # a bias trained with the adapter (bias="lora_only"/"all")
            key = adapted_layers[module] + _peft_files.ADAPTED_BIAS
        else:  # modules_to_save, or bias="all" on a layer without adapter
            key = f"{_torch_name(module_map, module, who=who)}.{torch_leaf}"
        tensors[PREFIX + key] = array
    return tensors
