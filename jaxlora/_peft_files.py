"""PEFT's files: ``adapter_config.json`` and ``adapter_model.safetensors``, read and written.

Also PEFT's own rules for reading them: which torch modules a config targets
(``target_modules``, ``target_parameters``, ``exclude_modules``), the ``rank_pattern``/
``alpha_pattern`` lookup, and how tensor keys are named (``base_model.model.<module>.
lora_A.weight``; ``<module>.base_layer.lora_A.weight`` for the inner of two parameters of
one module wrapped by PEFT's ``ParamWrapper``). Only safetensors files are read, never
pickles.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from jaxlora import _files, _init_from_weights
from jaxlora._distributed import is_primary

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEPT_ON_REPLACE = ("README.md",)

# adapter_config.json exactly as PEFT 0.22's LoraConfig.save_pretrained writes it; the
# fields jaxlora sets are filled in by `_peft.peft_config`.
CONFIG_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "astra_config": None,
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
    "astra_config",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "lora_bias",
    "monteclora_config",
    "use_bdlora",
    "use_qalora",
    "velora_config",
)
# PEFT inits that change the base weight in ways jaxlora does not compute (PiSSA and OLoRA
# it does): their adapters only mean something on that changed base.
_BASE_CHANGING_INITS = ("corda", "loftq", "astra", "lora_ga")
_FACTOR_SUFFIXES = {
    ".lora_A.weight": (False, "a"),
    ".lora_B.weight": (False, "b"),
    ".lora_embedding_A": (True, "a"),
    ".lora_embedding_B": (True, "b"),
}
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's magnitude, (out,), Linear and Embedding alike
ADAPTED_BIAS = ".base_layer.bias"
# flax leaf name -> torch parameter name, for modules_to_save and biases.
TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# The order in which transformers registers the parameters of its MoE experts modules
# (every ``*Experts`` class of transformers 5): PEFT nests one ParamWrapper per targeted
# parameter in this order, the first innermost (``<module>.base_layer.lora_A.weight``).
PARAMETER_ORDER = ("gate_up_proj", "down_proj")
_WRAPPED = ".base_layer"
# Copies PEFT writes under bias="all" for a modules_to_save wrapper: the frozen original
# and a duplicate of the trained module (also saved under the plain module name); and the
# frozen base weights it saves beside an adapted embedding (save_embedding_layers).
_COPIES = re.compile(r".*\.(original_module|modules_to_save)\..+|.*\.base_layer\.weight")


@dataclasses.dataclass
class Factors:
    """The LoRA factors of one torch module (or parameter) in a PEFT file.

    Attributes:
      module: the torch module name, without PEFT's prefix.
      depth: how many ``.base_layer`` wrappers sit between ``module`` and the factors:
        PEFT nests one ``ParamWrapper`` per targeted parameter of a module.
      embedding: whether they are ``lora_embedding_A/B`` (an ``nn.Embedding``).
      a: ``lora_A`` (None if missing).
      b: ``lora_B`` (None if missing).
      magnitude: DoRA's ``lora_magnitude_vector`` ``(out,)`` (None without DoRA).
    """

    module: str
    depth: int
    embedding: bool
    a: np.ndarray | None = None
    b: np.ndarray | None = None
    magnitude: np.ndarray | None = None

    def key(self, factor: str) -> str:
        """The file key of ``factor`` (``"A"`` or ``"B"``)."""
        wrapped = self.module + _WRAPPED * self.depth
        if self.embedding:
            return f"{PREFIX}{wrapped}.lora_embedding_{factor}"
        return f"{PREFIX}{wrapped}.lora_{factor}.weight"


def factor_keys(module: str, depth: int, embedding: bool) -> tuple[str, str]:
    """The file keys of A and B of a torch module (see `Factors`)."""
    factors = Factors(module, depth, embedding)
    return factors.key("A"), factors.key("B")


def group(
    tensors: Mapping[str, np.ndarray], file: Path
) -> tuple[list[Factors], dict[tuple[str, str], np.ndarray]]:
    """Splits PEFT keys into LoRA factors and fully trained leaves ``{(module, leaf)}``.

    Raises:
      ValueError: a key without PEFT's ``base_model.model.`` prefix.
    """
    factors: dict[tuple[str, int, bool], Factors] = {}
    leaves: dict[tuple[str, str], np.ndarray] = {}
    magnitudes: dict[tuple[str, int], np.ndarray] = {}
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
            embedding, factor = _FACTOR_SUFFIXES[suffix]
            module, depth = _unwrapped(rest[: -len(suffix)])
            entry = factors.setdefault(
                (module, depth, embedding), Factors(module, depth, embedding)
            )
            setattr(entry, factor, value)
        elif rest.endswith(MAGNITUDE):
            magnitudes[_unwrapped(rest[: -len(MAGNITUDE)])] = value
        elif rest.endswith(ADAPTED_BIAS):
            leaves[(rest[: -len(ADAPTED_BIAS)], "bias")] = value
        elif not _COPIES.fullmatch(rest):
            module, _, leaf = rest.rpartition(".")
            leaves[(module, leaf)] = value
    for entry in factors.values():
        entry.magnitude = magnitudes.pop((entry.module, entry.depth), None)
    for (module, _), value in magnitudes.items():  # reported with the unknown keys
        leaves[(module, MAGNITUDE[1:])] = value
    return list(factors.values()), leaves


def _unwrapped(module: str) -> tuple[str, int]:
    """A torch module name without PEFT's ``.base_layer`` wrappers, and how many there were."""
    depth = 0
    while module.endswith(_WRAPPED):
        module, depth = module[: -len(_WRAPPED)], depth + 1
    return module, depth


def wrapping_order(names: Sequence[str], module: str, *, who: str) -> list[str]:
    """Targeted parameters of one torch module in the order PEFT wraps them, innermost first.

    Raises:
      ValueError: several parameters whose registration order jaxlora does not know.
    """
    if len(names) == 1:
        return list(names)
    short = [n.rpartition(".")[2] for n in names]
    if any(s not in PARAMETER_ORDER for s in short):
        raise ValueError(
            f"{who}: torch module {module!r} has several adapted parameters {short}; PEFT nests "
            "their factors in the order the module registers them, which jaxlora knows only "
            f"for {list(PARAMETER_ORDER)}. Adapt one of them at a time."
        )
    return sorted(names, key=lambda n: PARAMETER_ORDER.index(n.rpartition(".")[2]))


def write(target: Path, peft_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Replaces ``target`` with a PEFT adapter directory, atomically (process 0 writes)."""
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
    with _files.replacing(target, who="export_peft") as new:
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


def read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter, checked for what jaxlora supports."""
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
    found = peft_config.get("peft_type") if isinstance(peft_config, dict) else None
    if found == "TRAINABLE_TOKENS":  # token rows without LoRA (`_peft_tokens`)
        return peft_config
    if found != "LORA":
        raise ValueError(
            f"import_peft: {file} has peft_type {found!r}; only LORA and TRAINABLE_TOKENS are "
            "supported."
        )
    on = [k for k in _UNSUPPORTED if peft_config.get(k)]
    if on:
        raise ValueError(
            f"import_peft: {file} uses PEFT options jaxlora does not implement: "
            f"{ {k: peft_config[k] for k in on} }. Only LoRA and DoRA (optionally rsLoRA, "
            "rank/alpha patterns, target_parameters, modules_to_save, bias) can be imported."
        )
    init = peft_config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"import_peft: {file} has init_lora_weights={init!r}, an init that changes the "
            "base weights, which jaxlora does not implement (it does 'pissa', "
            "'pissa_niter_<N>' and 'olora'). Convert it to plain LoRA in PEFT: "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...)."
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(peft_config.get(key), int | float):
            raise ValueError(f"import_peft: {file} has no numeric {key!r}.")
    return peft_config


def init_of(peft_config: Mapping[str, Any]) -> str:
    """jaxlora's ``LoraConfig.init`` for a PEFT ``init_lora_weights``: its PiSSA/OLoRA name
    (the base becomes the residual), else ``"kaiming"`` (the others leave the base as it is)."""
    init = peft_config.get("init_lora_weights")
    if isinstance(init, str) and _init_from_weights.check_init(init.lower()):
        return init.lower()
    return "kaiming"


def init_name(init: str) -> str | bool:
    """PEFT's ``init_lora_weights`` for jaxlora's ``init``: its PiSSA/OLoRA name, else True."""
    return init if _init_from_weights.is_from_weights(init) else True


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``adapter_model.safetensors`` (never a pickle)."""
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


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching a name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def rank_of(peft_config: Mapping[str, Any], name: str) -> int:
    """The rank PEFT gives the torch module (or parameter) ``name``."""
    return pattern_value(peft_config.get("rank_pattern") or {}, name, peft_config["r"])


def scale_of(peft_config: Mapping[str, Any], name: str) -> float:
    """PEFT's scaling of ``name``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = pattern_value(peft_config.get("alpha_pattern") or {}, name, peft_config["lora_alpha"])
    rank = rank_of(peft_config, name)
    return float(alpha) / (rank**0.5 if peft_config.get("use_rslora") else rank)


def in_modules_to_save(peft_config: Mapping[str, Any], name: str) -> bool:
    """Whether ``name`` is (inside) a ``modules_to_save`` module."""
    saved = peft_config.get("modules_to_save") or ()
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved)


def _listed(name: str, names: Any) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return bool(names) and (name in names or any(name.endswith("." + n) for n in names))


def targeted(peft_config: Mapping[str, Any], name: str, *, parameter: bool) -> bool:
    """Whether PEFT puts a LoRA layer on the torch module (or parameter) ``name``."""
    if parameter:
        return _listed(name, peft_config.get("target_parameters") or ())
    exclude = peft_config.get("exclude_modules")
    if exclude and _listed(name, exclude):
        return False
    if in_modules_to_save(peft_config, name):
        return False
    return _listed(name, peft_config.get("target_modules"))
