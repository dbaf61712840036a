"""PEFT LoRA adapters both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names every tensor after the torch module it belongs to, under the ``PeftModel``
prefix ``base_model.model.``, in torch's ``(out, in)`` layout:

==============================================  ========================================
PEFT tensor                                     jaxlora
==============================================  ========================================
``<module>.lora_A.weight`` ``(r, in)``          ``LoraAdapter.a.T`` of a Dense ``(in, r)``
``<module>.lora_B.weight`` ``(out, r)``         ``LoraAdapter.b.T`` ``(r, out)``
``<module>.lora_embedding_A`` ``(r, vocab)``    ``a.T`` of an Embed adapter ``(vocab, r)``
``<module>.lora_embedding_B`` ``(features, r)`` ``b.T`` ``(r, features)``
``<module>.weight`` / ``.bias``                 ``modules_to_save`` leaves (kernel transposed)
``<module>.base_layer.bias``                    bias of an adapted layer (``bias`` options)
==============================================  ========================================

A module map (any callable ``flax layer path -> torch module name``) connects the two
namings; `peft_module_map` builds the usual one. Only safetensors files are read, never
pickles.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy
from flax.core import meta

from jaxlora import _attach, _files, _layout
from jaxlora._config import LoraConfig, path_matches
from jaxlora._distributed import is_primary, to_host
from jaxlora._tree import LoraAdapter, PyTree, module_paths, params_of, subtree

ModuleMap = Callable[[str], "str | None"]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEPT_ON_REPLACE = ("README.md",)

# adapter_config.json exactly as PEFT 0.21's LoraConfig.save_pretrained writes it; the
# fields jaxlora sets are filled in by `_peft_config`.
_PEFT_CONFIG_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": None,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# PEFT features that change what the weights mean; importing them would be silently wrong.
_UNSUPPORTED = (
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "lora_bias",
    "monteclora_config",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "velora_config",
)
# flax leaf name -> torch parameter name, for modules_to_save and biases.
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("kernel", "a"),
    ".lora_B.weight": ("kernel", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
}
_ADAPTED_BIAS = ".base_layer.bias"
# Copies PEFT writes under bias="all" for a modules_to_save wrapper: the frozen original
# and a duplicate of the trained module (also saved under the plain module name).
_WRAPPER_COPIES = re.compile(r".*\.(original_module|modules_to_save)\..+")


def peft_module_map(prefix: str = "", *, heads: Sequence[str] = ()) -> ModuleMap:
    """The usual flax-path -> torch-module-name rule, for models named after their HF modules.

    ``/`` becomes ``.`` and a linen list name ``name_<i>`` becomes ``name.<i>``:
    ``encoder/layer_0/attention/self/query`` -> ``encoder.layer.0.attention.self.query``.

    Args:
      prefix: put in front of every torch name, e.g. ``"bert."`` when the flax params are
        a bare ``BertModel`` and the torch model is ``BertForSequenceClassification``.
      heads: top-level flax modules that do not get the prefix (e.g. ``("classifier",)``).

    Returns:
      The module map, for `export_peft` / `import_peft`.

    Example:
      >>> jaxlora.peft_module_map("bert.", heads=("classifier",))("encoder/layer_0/output/dense")
      'bert.encoder.layer.0.output.dense'
    """

    def module_map(path: str) -> str:
        parts = path.split("/")
        name = ".".join(re.sub(r"^(.+)_(\d+)$", r"\1.\2", p) for p in parts)
        return name if parts[0] in heads else prefix + name

    return module_map


class _ModuleMaps(Mapping[str, ModuleMap]):
    """Module maps (flax layer path -> torch module name) by architecture, read-only.

    - ``"bert"``: ``encoder/layer_0/attention/self/query`` ->
      ``encoder.layer.0.attention.self.query``.
    - ``"bert-seq-cls"``: a flax BertModel body (``encoder/...``) plus a top-level
      ``classifier`` -> HF ``BertForSequenceClassification`` (``bert.encoder...``,
      ``classifier``).
    - ``"llama"``: ``model/layers_0/self_attn/q_proj`` -> ``model.layers.0.self_attn.q_proj``.
    - ``"llama-body"``: a flax LlamaModel body (``layers_0/...``) plus ``lm_head`` /
      ``score`` -> HF ``LlamaFor*`` (``model.layers.0...``, ``lm_head``, ``score``).

    ``"bert"`` and ``"llama"`` also cover flax models named exactly like the HF head
    models (``bert/...`` + ``classifier``, ``model/...`` + ``lm_head``).

    Example:
      >>> jaxlora.peft_module_maps["llama"]("model/layers_3/mlp/down_proj")
      'model.layers.3.mlp.down_proj'
    """

    def __init__(self, maps: Mapping[str, ModuleMap]):
        self._maps = dict(maps)

    def __getitem__(self, name: str) -> ModuleMap:
        return self._maps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


peft_module_maps = _ModuleMaps(
    {
        "bert": peft_module_map(),
        "bert-seq-cls": peft_module_map("bert.", heads=("classifier",)),
        "llama": peft_module_map(),
        "llama-body": peft_module_map("model.", heads=("lm_head", "score")),
    }
)


def _torch_name(module_map: ModuleMap, path: str, *, who: str) -> str:
    name = module_map(path)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"{who}: module_map({path!r}) gave {name!r}; it must return the torch module "
            "name of every adapted or saved layer, e.g. jaxlora.peft_module_map()."
        )
    return name


def _torch_names(module_map: ModuleMap, paths: Sequence[str], *, who: str) -> dict[str, str]:
    """flax module path -> torch module name of each of ``paths``; two paths, one name: error."""
    names: dict[str, str] = {}
    owners: dict[str, str] = {}
    for path in paths:
        name = names[path] = _torch_name(module_map, path, who=who)
        if owners.setdefault(name, path) != path:
            raise ValueError(
                f"{who}: module_map sends both {owners[name]!r} and {path!r} to {name!r}; it "
                "must give each flax module its own torch name (PEFT keys tensors by it)."
            )
    return names


def _saved_modules(params: PyTree, patterns: Sequence[str]) -> list[str]:
    """The outermost module paths that ``modules_to_save`` patterns select."""
    matched = [p for p in module_paths(params) if any(path_matches(p, q) for q in patterns)]
    return [p for p in matched if not any(p.startswith(m + "/") for m in matched)]


def _check_dense(spec: _attach.LayerSpec, *, who: str) -> None:
    """Raises unless ``spec`` is a plain 2-D Dense or an Embed: the layouts PEFT has."""
    a, b, kernel = _layout.delta_labels(spec.delta_eq)
    if len(spec.kernel_shape) == 2 and len(a) == 2 and len(b) == 2 and kernel == a[0] + b[1]:
        return
    raise ValueError(
        f"{who}: layer {spec.path!r} has a {spec.kernel_shape} kernel adapted as "
        f"{spec.delta_eq!r}; PEFT only has 2-D Linear/Embedding LoRA layers (no "
        "DenseGeneral, Einsum or nn.scan-stacked layout). Exclude it from the targets to "
        "export the rest."
    )


def _torch_leaf(path: str, value: Any, *, who: str) -> tuple[str, np.ndarray]:
    leaf = path.rsplit("/", 1)[-1]
    value = to_host(value)
    if leaf not in _TORCH_LEAF or (leaf == "kernel" and value.ndim != 2):
        raise ValueError(
            f"{who}: trained parameter {path!r} of shape {value.shape} has no PEFT "
            f"equivalent; PEFT saves {sorted(_TORCH_LEAF)} leaves (kernels 2-D)."
        )
    return _TORCH_LEAF[leaf], value.T if leaf == "kernel" else value


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _peft_config(
    config: LoraConfig,
    adapted: Mapping[str, str],
    saved_modules: Sequence[str],
    *,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """``adapter_config.json``; ``adapted`` maps flax layer path -> torch module name."""
    ranks = {name: config.rank_for(path) for path, name in adapted.items()}
    alphas = {name: config.alpha_for(path) for path, name in adapted.items()}
    return {
        **_PEFT_CONFIG_DEFAULTS,
        "alpha_pattern": {n: _number(a) for n, a in alphas.items() if a != config.alpha},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": config.bias,
        "lora_alpha": _number(config.alpha),
        "lora_dropout": config.dropout,
        "modules_to_save": list(saved_modules) or None,
        "r": config.rank,
        "rank_pattern": {n: r for n, r in ranks.items() if r != config.rank},
        "target_modules": sorted(adapted.values()),
        "task_type": task_type,
        "use_rslora": config.rslora,
    }


def export_peft(
    directory: str | os.PathLike,
    params: PyTree,
    config: LoraConfig,
    *,
    module_map: ModuleMap,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Writes an adapted tree as a PEFT LoRA adapter, loadable by ``PeftModel.from_pretrained``.

    Writes ``adapter_config.json`` (every field PEFT 0.21 writes; ``target_modules``,
    ``rank_pattern`` and ``alpha_pattern`` name the exact torch modules) and
    ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` ``(r, in)``,
    ``lora_B.weight`` ``(out, r)``, ``lora_embedding_A/B`` for embeddings, and the
    ``modules_to_save`` and bias tensors). The directory is replaced atomically: written
    in full next to it, then renamed into place. With several JAX processes every
    process calls it (arrays spread over processes are gathered to host) and process 0
    writes the files on the filesystem they share; every process returns once they
    are in place.

    Args:
      directory: output directory; created, or replaced if it holds only a PEFT adapter.
      params: the adapted tree (params collection or variables dict). Only Dense layers
        with a 2-D kernel and Embed layers can be exported.
      config: the `LoraConfig` the params were adapted with.
      module_map: flax layer path -> torch module name (e.g. `peft_module_map()` or an
        entry of `peft_module_maps`).
      base_model_name_or_path: recorded for PEFT (e.g. ``"bert-base-uncased"``).
      task_type: PEFT task type (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``) or None.

    Example:
      >>> jaxlora.export_peft("out/peft", lora_params, cfg, module_map=jaxlora.peft_module_map())
      >>> # torch: PeftModel.from_pretrained(torch_model, "out/peft")
    """
    who = "export_peft"
    layers, leaves = _attach.collect(params, who=who)
    _attach.check_config([spec for spec, _, _ in layers], config, who=who)
    saved_modules = _saved_modules(params_of(params)[0], config.modules_to_save)
    leaf_modules = [spec.path.rpartition("/")[0] for spec, _ in leaves]
    layer_paths = [spec.path for spec, _, _ in layers]
    names = _torch_names(
        module_map, list(dict.fromkeys([*layer_paths, *saved_modules, *leaf_modules])), who=who
    )
    tensors: dict[str, np.ndarray] = {}
    adapted: dict[str, str] = {}
    for spec, a, b in layers:
        _check_dense(spec, who=who)
        name = adapted[spec.path] = names[spec.path]
        a_key, b_key = (
            (".lora_A.weight", ".lora_B.weight")
            if spec.weight_key == "kernel"
            else (".lora_embedding_A", ".lora_embedding_B")
        )
        tensors[PREFIX + name + a_key] = to_host(a).T
        tensors[PREFIX + name + b_key] = to_host(b).T
    for (spec, value), module in zip(leaves, leaf_modules, strict=True):
        torch_leaf, array = _torch_leaf(spec.path, value, who=who)
        if module in adapted:  # a bias trained with the adapter (bias="lora_only"/"all")
            key = adapted[module] + _ADAPTED_BIAS
        else:  # modules_to_save, or bias="all" on a layer without adapter
            key = f"{names[module]}.{torch_leaf}"
        tensors[PREFIX + key] = array
    peft_config = _peft_config(
        config,
        adapted,
        [names[m] for m in saved_modules],
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    _write(Path(directory), peft_config, tensors)


def _write(target: Path, peft_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    _files.check_parent(target, who="export_peft")
    ours = {CONFIG_NAME, WEIGHTS_NAME, *_KEPT_ON_REPLACE}
    foreign = (
        sorted(p.name for p in target.iterdir() if p.name not in ours) if target.is_dir() else []
    )
    if foreign or (target.exists() and not target.is_dir()):
        raise ValueError(
            f"export_peft: {target} exists and holds {foreign or 'a file'}, not just a PEFT "
            "adapter; refusing to replace it. Export to a new directory."
        )
    with _files.replacing(target) as new:
        if is_primary():  # process 0 writes the files for every process
            _write_files(new, target, peft_config, tensors)


def _write_files(
    new: Path, target: Path, peft_config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> None:
    """Writes the adapter to ``new``, which appears only once complete."""
    partial = new.with_name(new.name + ".partial")
    partial.mkdir()
    for name in _KEPT_ON_REPLACE:
        if (target / name).is_file():
            (partial / name).write_bytes((target / name).read_bytes())
    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    safetensors.numpy.save_file(contiguous, partial / WEIGHTS_NAME, metadata={"format": "pt"})
    (partial / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    partial.rename(new)


def _read_peft_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"import_peft: no {CONFIG_NAME} in {path}; pass the directory PEFT's "
            f"save_pretrained wrote.{_files.missing_hint(path)}"
        )
    try:
        peft_config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"import_peft: {file} is not valid JSON ({e}).") from e
    if not isinstance(peft_config, dict) or peft_config.get("peft_type") != "LORA":
        found = peft_config.get("peft_type") if isinstance(peft_config, dict) else None
        raise ValueError(f"import_peft: {file} has peft_type {found!r}; only LORA is supported.")
    on = [k for k in _UNSUPPORTED if peft_config.get(k)]
    if on:
        raise ValueError(
            f"import_peft: {file} uses PEFT options jaxlora does not implement: "
            f"{ {k: peft_config[k] for k in on} }. Only plain LoRA (optionally rsLoRA, "
            "rank/alpha patterns, modules_to_save, bias) can be imported."
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(peft_config.get(key), int | float):
            raise ValueError(f"import_peft: {file} has no numeric {key!r}.")
    return peft_config


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt")
        )
        why = (
            f" It holds {pickles}: jaxlora never reads pickle-based files; re-save with "
            "PEFT's save_pretrained(..., safe_serialization=True)."
            if pickles
            else ""
        )
        raise FileNotFoundError(f"import_peft: no {WEIGHTS_NAME} in {path}.{why}")
    try:
        with safetensors.safe_open(file, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"import_peft: {file} is truncated or corrupt ({e}); re-save it.") from e


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching a name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _in_modules_to_save(peft_config: Mapping[str, Any], name: str) -> bool:
    saved = peft_config.get("modules_to_save") or ()
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved)


def _targeted(peft_config: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT puts a LoRA layer on the torch module ``name`` (PEFT's own rules)."""
    exclude = peft_config.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, name):
            return False
    elif exclude and (name in exclude or any(name.endswith("." + e) for e in exclude)):
        return False
    if _in_modules_to_save(peft_config, name):
        return False
    targets = peft_config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return bool(targets) and (name in targets or any(name.endswith("." + t) for t in targets))


def _index(params: PyTree, module_map: ModuleMap, *, who: str) -> dict[str, str]:
    """torch module name -> flax module path, for every module of ``params``."""
    index: dict[str, str] = {}
    for path in module_paths(params):
        name = module_map(path)
        if name is None:
            continue
        if name in index:
            raise ValueError(
                f"{who}: module_map sends both {index[name]!r} and {path!r} to {name!r}; "
                "it must give each flax module its own torch name."
            )
        index[name] = path
    return index


def _prefix_hint(name: str, index: Mapping[str, str]) -> str:
    """A suggestion when ``name`` differs from a known torch name by a leading prefix."""
    for known, path in index.items():
        if name.endswith("." + known):
            extra = name[: -len(known)]
            return (
                f" (the flax module {path!r} maps to {known!r}: the file names carry an extra "
                f"prefix {extra!r}; use module_map=jaxlora.peft_module_map({extra!r}))"
            )
        if known.endswith("." + name):
            return (
                f" (the flax module {path!r} maps to {known!r}: the module map adds a prefix "
                f"{known[: -len(name)]!r} that the file does not have)"
            )
    return ""


def _group(tensors: Mapping[str, np.ndarray], file: Path) -> tuple[dict, dict]:
    """Splits PEFT keys into factors ``{module: {kind, a, b}}`` and leaves ``{(module, leaf)}``."""
    factors: dict[str, dict[str, Any]] = {}
    leaves: dict[tuple[str, str], np.ndarray] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(
                f"import_peft: key {key!r} in {file} lacks PEFT's {PREFIX!r} prefix; expected "
                f"names like '{PREFIX}<module>.lora_A.weight', as PeftModel.save_pretrained "
                "writes them."
            )
        rest = key[len(PREFIX) :]
        suffix = next((s for s in _FACTOR_SUFFIXES if rest.endswith(s)), None)
        if suffix is not None:
            weight_key, factor = _FACTOR_SUFFIXES[suffix]
            entry = factors.setdefault(rest[: -len(suffix)], {"weight_key": weight_key})
            entry[factor] = value
        elif rest.endswith(_ADAPTED_BIAS):
            leaves[(rest[: -len(_ADAPTED_BIAS)], "bias")] = value
        elif not _WRAPPER_COPIES.fullmatch(rest):
            module, _, leaf = rest.rpartition(".")
            leaves[(module, leaf)] = value
    return factors, leaves


def _check_factor(
    factor: str, got: tuple[int, ...], want: tuple[int, int], rank_axis: int, *, where: str
) -> None:
    """Raises unless a PEFT factor has the torch layout ``want`` (``(r, in)`` / ``(out, r)``)."""
    if got == want:
        return
    layout = "(r, in)" if factor == "A" else "(out, r)"
    if got == want[::-1]:
        why = "it looks transposed: PEFT files hold torch's (out, in) layout."
    elif len(got) == 2 and got[1 - rank_axis] == want[1 - rank_axis]:
        why = (
            f"its rank {got[rank_axis]} disagrees with r={want[rank_axis]} that "
            f"{CONFIG_NAME} gives this layer (r / rank_pattern); the file and config differ."
        )
    else:
        why = "the adapter was trained for another base (other layer sizes)."
    raise ValueError(
        f"import_peft: {where}: lora_{factor} has shape {got}, expected {layout} = {want}; {why}"
    )


def _layer(
    name: str,
    entry: Mapping[str, Any],
    path: str,
    node: Any,
    peft_config: Mapping[str, Any],
) -> tuple[_attach.LayerSpec, np.ndarray, np.ndarray]:
    """One adapted layer from PEFT factors, checked against the flax layer at ``path``."""
    weight_key = entry["weight_key"]
    key = PREFIX + name + (".lora_A.weight" if weight_key == "kernel" else ".lora_embedding_A")
    missing = [f for f in ("a", "b") if f not in entry]
    if missing:
        raise ValueError(
            f"import_peft: layer {path!r} ({name}) has only one LoRA factor in the file; "
            f"{'lora_A' if missing == ['a'] else 'lora_B'} is missing. Re-save the adapter."
        )
    weight = node.get(weight_key) if isinstance(node, Mapping) else None
    if weight is None or meta.unbox(weight).ndim != 2:
        kind = "Linear" if weight_key == "kernel" else "Embedding"
        raise ValueError(
            f"import_peft: {key!r} is a LoRA factor of a {kind} layer, but the flax layer "
            f"{path!r} has no 2-D {weight_key!r}; check module_map."
        )
    kernel = meta.unbox(weight)
    n_in, n_out = kernel.shape
    rank = _pattern_value(peft_config.get("rank_pattern") or {}, name, peft_config["r"])
    a, b = entry["a"], entry["b"]
    _check_factor("A", a.shape, (rank, n_in), 0, where=f"layer {path!r} ({name})")
    _check_factor("B", b.shape, (n_out, rank), 1, where=f"layer {path!r} ({name})")
    alpha = _pattern_value(peft_config.get("alpha_pattern") or {}, name, peft_config["lora_alpha"])
    rslora = bool(peft_config.get("use_rslora"))
    layout = (
        _layout.linear_layout((n_in,), (n_out,), rank)
        if weight_key == "kernel"
        else _layout.embed_layout(n_in, n_out, rank)
    )
    spec = _attach.LayerSpec(
        path=path,
        weight_key=weight_key,
        kernel_shape=(n_in, n_out),
        kernel_dtype=jax.numpy.dtype(kernel.dtype).name,
        a_shape=layout.a_shape,
        b_shape=layout.b_shape,
        dtype=a.dtype.name,
        scale=float(alpha) / (math.sqrt(rank) if rslora else rank),
        delta_eq=layout.delta_eq,
    )
    return spec, a.T, b.T


def _flax_leaf(module: Mapping[str, Any], torch_leaf: str) -> str | None:
    candidates = [k for k, v in _TORCH_LEAF.items() if v == torch_leaf and k in module]
    return candidates[0] if len(candidates) == 1 else None


def _leaf(
    name: str, torch_leaf: str, value: np.ndarray, path: str, node: Any
) -> tuple[_attach.LeafSpec, np.ndarray]:
    """A fully trained flax leaf from a PEFT tensor (kernels transposed, base dtype kept)."""
    leaf = _flax_leaf(node, torch_leaf) if isinstance(node, Mapping) else None
    if leaf is None:
        raise ValueError(
            f"import_peft: {PREFIX}{name}.{torch_leaf} has no flax counterpart: module "
            f"{path!r} has no single leaf among "
            f"{[k for k, v in _TORCH_LEAF.items() if v == torch_leaf]}; check module_map."
        )
    base = _attach.unmark(node[leaf])
    array = value.T if leaf == "kernel" else value
    if array.shape != base.shape:
        raise ValueError(
            f"import_peft: {PREFIX}{name}.{torch_leaf} has shape {value.shape}; the flax "
            f"{leaf} {path}/{leaf} is {base.shape}"
            + (", stored transposed from torch's (out, in)" if leaf == "kernel" else "")
            + ". The adapter was trained for another base."
        )
    spec = _attach.LeafSpec(f"{path}/{leaf}", tuple(base.shape), jax.numpy.dtype(base.dtype).name)
    return spec, array.astype(base.dtype)


def _expected_leaves(
    inner: PyTree, index: Mapping[str, str], peft_config: Mapping[str, Any]
) -> dict[str, str]:
    """``modules_to_save`` leaves PEFT would have saved: flax leaf path -> torch key."""
    expected = {}
    for name, path in index.items():
        if _in_modules_to_save(peft_config, name):
            for leaf, value in subtree(inner, path).items():
                if leaf in _TORCH_LEAF and not isinstance(value, Mapping):
                    expected[f"{path}/{leaf}"] = f"{PREFIX}{name}.{_TORCH_LEAF[leaf]}"
    return expected


def _is_lora_candidate(inner: PyTree, path: str) -> bool:
    node = subtree(inner, path)
    return any(not isinstance(node.get(k, {}), Mapping) for k in ("kernel", "embedding"))


def _layers(
    factors: Mapping[str, Mapping[str, Any]],
    index: Mapping[str, str],
    inner: PyTree,
    peft_config: Mapping[str, Any],
) -> tuple[list[tuple[_attach.LayerSpec, np.ndarray, np.ndarray]], list[str]]:
    """The adapted layers of the file, and what does not match (both ways)."""
    layers, unmatched = [], []
    for name, entry in factors.items():
        path = index.get(name)
        if path is None:
            unmatched.append(f"LoRA factors of {name!r}: no flax layer{_prefix_hint(name, index)}")
        else:
            layers.append(_layer(name, entry, path, subtree(inner, path), peft_config))
    found = {spec.path for spec, _, _ in layers}
    unmatched += [
        f"layer {path!r} ({name}) is targeted by {CONFIG_NAME} but has no factors in the file"
        for name, path in index.items()
        if path not in found and _targeted(peft_config, name) and _is_lora_candidate(inner, path)
    ]
    return layers, unmatched


def _leaves(
    tensors: Mapping[tuple[str, str], np.ndarray],
    index: Mapping[str, str],
    inner: PyTree,
    peft_config: Mapping[str, Any],
) -> tuple[list[tuple[_attach.LeafSpec, np.ndarray]], list[str]]:
    """The fully trained leaves of the file, and what does not match (both ways)."""
    leaves, unmatched = [], []
    biases = peft_config.get("bias", "none") != "none"
    for (name, torch_leaf), value in tensors.items():
        path = index.get(name)
        key = f"{PREFIX}{name}.{torch_leaf}"
        if path is None:
            unmatched.append(f"{key}: no flax module{_prefix_hint(name, index)}")
        elif not (_in_modules_to_save(peft_config, name) or (biases and torch_leaf == "bias")):
            unmatched.append(f"{key}: neither in modules_to_save nor a bias PEFT trains")
        else:
            leaves.append(_leaf(name, torch_leaf, value, path, subtree(inner, path)))
    loaded = {spec.path for spec, _ in leaves}
    unmatched += [
        f"{key} (modules_to_save) is missing from the file"
        for leaf_path, key in _expected_leaves(inner, index, peft_config).items()
        if leaf_path not in loaded
    ]
    return leaves, unmatched


def _exact(path: str) -> str:
    return "re:" + re.escape(path)


def _lora_config(
    peft_config: Mapping[str, Any],
    layers: Sequence[_attach.LayerSpec],
    leaves: Sequence[_attach.LeafSpec],
    index: Mapping[str, str],
) -> LoraConfig:
    """The `LoraConfig` of an imported adapter, naming its layers exactly."""
    r, alpha = peft_config["r"], peft_config["lora_alpha"]
    names = {path: name for name, path in index.items()}
    alphas = {
        s.path: _pattern_value(peft_config.get("alpha_pattern") or {}, names[s.path], alpha)
        for s in layers
    }
    saved = set()
    for leaf in leaves:
        modules = leaf.path.split("/")[:-1]
        prefixes = ["/".join(modules[: i + 1]) for i in range(len(modules))]
        top = next(
            (p for p in prefixes if _in_modules_to_save(peft_config, names.get(p, ""))), None
        )
        if top is not None:
            saved.add(top)
    return LoraConfig(
        rank=r,
        alpha=alpha,
        targets=[_exact(s.path) for s in layers],
        rank_pattern={_exact(s.path): s.rank for s in layers if s.rank != r},
        alpha_pattern={_exact(p): a for p, a in alphas.items() if a != alpha},
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        rslora=bool(peft_config.get("use_rslora")),
        dtype=layers[0].dtype,
        modules_to_save=[_exact(p) for p in sorted(saved)],
        bias=peft_config.get("bias", "none"),
    )


def import_peft(
    directory: str | os.PathLike,
    params: PyTree,
    *,
    module_map: ModuleMap,
    sharding: jax.sharding.Sharding | None = None,
    allow_unmatched: bool = False,
) -> tuple[LoraConfig, PyTree]:
    """Loads a PEFT LoRA adapter (``adapter_config.json`` + safetensors) onto flax params.

    Every key must find its flax layer through ``module_map`` with the expected shapes:
    ``lora_A.weight`` ``(r, in)``, ``lora_B.weight`` ``(out, r)`` against the flax kernel
    ``(in, out)``, r and alpha from ``r``/``rank_pattern`` and ``lora_alpha``/
    ``alpha_pattern`` (PEFT's matching rules), ``use_rslora`` honoured. Arrays are placed
    like their base kernels (see `load_adapter`).

    Args:
      directory: a directory written by PEFT's ``save_pretrained`` (or `export_peft`).
      params: base params (or an adapted tree whose adapters are replaced).
      module_map: flax layer path -> torch module name, e.g. `peft_module_map()`.
      sharding: put every array here instead of following the base.
      allow_unmatched: load what matches and warn about the rest (keys with no flax
        layer, targeted layers or ``modules_to_save`` weights missing from the file),
        instead of raising.

    Returns:
      ``(config, lora_params)``: a `LoraConfig` naming the adapted layers exactly
      (``"re:<path>"`` patterns) with PEFT's rank, alpha, dropout, rsLoRA, bias and
      ``modules_to_save``; and the adapted tree.

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
    """
    who = "import_peft"
    path = Path(directory)
    source = f"PEFT adapter {str(path)!r}"
    peft_config = _read_peft_config(path)
    factors, leaf_tensors = _group(_read_tensors(path), path / WEIGHTS_NAME)
    if not factors:
        raise ValueError(f"import_peft: {source} holds no LoRA factors (lora_A / lora_B).")
    inner = params_of(params)[0]
    index = _index(inner, module_map, who=who)
    layers, unmatched_layers = _layers(factors, index, inner, peft_config)
    if not layers:
        raise ValueError(
            f"import_peft: no LoRA factor of {source} matches a layer of these params, so "
            f"there is nothing to load (allow_unmatched=True loads a part, not none):"
            f"{_attach.listing(unmatched_layers)}\nCheck module_map: it must send the flax "
            "layer paths to the torch module names in the file."
        )
    leaves, unmatched_leaves = _leaves(leaf_tensors, index, inner, peft_config)
    _attach.plan(
        params,
        [spec for spec, _, _ in layers],
        [spec for spec, _ in leaves],
        source=source,
        who=who,
        allow_unmatched=allow_unmatched,
        unmatched=unmatched_layers + unmatched_leaves,
    )
    adapters = {}
    for spec, a, b in layers:
        a_sharding, b_sharding = _attach.layer_shardings(params, spec, sharding)
        adapters[spec.path] = LoraAdapter(
            jax.device_put(a, a_sharding),
            jax.device_put(b, b_sharding),
            scale=spec.scale,
            delta_eq=spec.delta_eq,
        )
    trainable = {
        spec.path: jax.device_put(value, _attach.leaf_sharding(params, spec, sharding))
        for spec, value in leaves
    }
    config = _lora_config(
        peft_config, [spec for spec, _, _ in layers], [spec for spec, _ in leaves], index
    )
    return config, _attach.attach(params, adapters, trainable)
