"""`LoraConfig`: what to adapt and how, validated when it is built."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp

from jaxlora import _init_from_weights

ALL_LINEAR = "all-linear"
# Adapters of weights named like Flax's own layers' are named after their layer.
LAYER_WEIGHTS = ("kernel", "embedding")
_INITS = ("kaiming", "gaussian")
_BIAS_MODES = ("none", "lora_only", "all")
_QUANTIZE = (None, "nf4", "int8", "fp8")


def path_matches(path: str, pattern: str) -> bool:
    """Whether a layer path like ``"encoder/layer_0/query"`` matches one pattern.

    Args:
      path: ``/``-joined layer path.
      pattern: ``"re:<regex>"`` (full match on the path); a glob containing ``/``
        (matched against the whole path); or a bare name/glob without ``/``, matched
        against the last path component, like PEFT's ``target_modules=["q_proj"]``.

    Returns:
      True if the pattern selects the path.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern)


def node_key(kind: str, weight: str) -> str:
    """The key of what jaxlora keeps beside a weight in its module's params: ``kind``
    (``"lora"``, ``"tokens"``) beside a layer's ``kernel``/``embedding``, ``"<kind>_<weight>"``
    beside any other weight."""
    return kind if weight in LAYER_WEIGHTS else f"{kind}_{weight}"


def weight_of_node(kind: str, layer: Mapping[str, Any], key: str) -> str:
    """The weight a `node_key` ``key`` of ``kind`` belongs to, in ``layer``."""
    if key == kind:
        return "embedding" if "embedding" in layer else "kernel"
    return key[len(kind) + 1 :]


def format_paths(items: Sequence[str], *, limit: int = 40, bullet: str = "") -> str:
    """Indented lines, one per item (layer paths, mismatches), for error messages.

    Args:
      items: what to list, in order.
      limit: list at most this many, then say how many more there are.
      bullet: put in front of each item, e.g. ``"- "``.

    Returns:
      ``"  <bullet>item"`` lines joined by newlines (no leading or trailing newline).
    """
    lines = [f"  {bullet}{item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def listing(items: Sequence[str]) -> str:
    """A newline, then a bulleted, truncated listing of ``items``, for error messages."""
    return "\n" + format_paths(items, limit=20, bullet="- ")


def _any_match(paths: str | Sequence[str], pattern: str) -> bool:
    return any(path_matches(p, pattern) for p in _as_tuple(paths))


def _first_match(paths: str | Sequence[str], table: Mapping[str, Any]) -> Any | None:
    return next((value for pattern, value in table.items() if _any_match(paths, pattern)), None)


def adapter_name(module: str, weight: str) -> str:
    """The name of the adapter of ``weight`` in the module at path ``module``.

    A layer's ``kernel``/``embedding`` adapter is named after the layer (``"encoder/query"``);
    any other weight's after the weight itself (``"layers/0/attn/q_proj/w"``).
    """
    if weight in LAYER_WEIGHTS:
        return module
    return f"{module}/{weight}" if module else weight


def target_paths(name: str, weight: str) -> tuple[str, ...]:
    """The paths that patterns are matched against for one adapter.

    Args:
      name: the adapter's name: a layer's path for a ``kernel``/``embedding`` weight, else
        the weight's own path (``"layers/0/attn/q_proj/w"``).
      weight: the weight's key in its module.

    Returns:
      The module's path, then the weight's own path: ``"q_proj"`` names the weight ``w``
      of a custom ``q_proj`` module, and ``"kernel"`` every Dense kernel.
    """
    if weight in LAYER_WEIGHTS:
        return (name, f"{name}/{weight}" if name else weight)
    module = name.rpartition("/")[0]
    return (module, name) if module else (name,)


def _as_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _patterns(name: str, value: str | Sequence[str]) -> tuple[str, ...]:
    patterns = _as_tuple(value)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(
            f"LoraConfig: {name} holds {bad!r}, which are not strings; patterns are layer "
            "paths, globs or 're:' regexes, e.g. ['query', 'value']."
        )
    return patterns


def _dtype_name(dtype: Any) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError as e:
        raise TypeError(
            f"LoraConfig: dtype={dtype!r} is not a dtype; use e.g. 'float32' or 'bfloat16'."
        ) from e
    if not jnp.issubdtype(name, jnp.floating):
        raise ValueError(
            f"LoraConfig: dtype={name!r} cannot train (adapters need a floating dtype); use "
            "e.g. 'float32' or 'bfloat16'."
        )
    return name


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """How to adapt a model with LoRA.

    ``y = base(x) + scale · dropout(x) @ A @ B`` with ``scale = alpha / rank``
    (``alpha / sqrt(rank)`` with ``rslora=True``). B starts at zero, so the adapted
    model equals the base model at initialisation.

    Attributes:
      rank: adapter rank r (> 0).
      alpha: scaling numerator (> 0).
      targets: ``"all-linear"`` (every weight the model consumes in a contraction:
        Flax's layers, the model's own einsum modules, bare params, expert weights;
        unlike PEFT's, an untied output head too: add ``exclude=["lm_head"]``) or a list
        of patterns (see `path_matches` and `target_paths`): bare names ``"query"``,
        globs ``"*/attn/*"``, regexes ``"re:.*layer_[0-3]/query"``. Embeddings (weights
        looked up by row) are adapted only when a pattern names them. A pattern that
        matches nothing is an error.
      exclude: patterns removed from the selection.
      rank_pattern: per-pattern rank overrides, first matching pattern wins.
      alpha_pattern: per-pattern alpha overrides, first matching pattern wins.
      dropout: LoRA dropout rate on the adapter input, in [0, 1). Active only when the
        ``dropout_rng`` stream is passed to ``apply`` (as for Flax's own Dropout).
      rslora: use ``alpha / sqrt(rank)`` as the scale.
      init: ``"kaiming"`` (He-uniform A, as PEFT) or ``"gaussian"`` (A ~ N(0, 1/r)), B
        zero; or from the base weight, PEFT's ``init_lora_weights`` of the same names:
        ``"pissa"`` (top-r singular vectors and values), ``"pissa_niter_<N>"`` (randomised
        SVD, N subspace iterations) or ``"olora"`` (QR), the frozen weight becoming the
        residual ``W - scale · A ⊗ B`` (linear weights only; see `jaxlora.lorafy`).
      dtype: dtype of the adapter parameters (float32 by default, whatever the base).
      modules_to_save: patterns of modules trained in full (e.g. a new head).
      bias: ``"none"``, ``"lora_only"`` (biases of adapted layers train) or ``"all"``.
      dropout_rng: name of the rng stream driving LoRA dropout.
      quantize: store the frozen base quantized (QLoRA): ``"nf4"`` (4-bit NormalFloat,
        blocks of 64 along an input axis), ``"int8"`` or ``"fp8"`` (e4m3; both with one
        scale per output channel); None keeps
        it as it is. Every weight ``"all-linear"`` selects is quantized, adapted or not
        (embeddings are not); each is dequantized inside the step where it is used.
      quantize_exclude: patterns of weights kept in float (e.g. ``["lm_head"]``).
      double_quant: nf4: store the block scales in 8 bits too (QLoRA's double
        quantization, 4.13 bits per weight instead of 4.5).
      trainable_token_indices: train only these rows of an embedding (new tokens), as
        PEFT's option of the same name: a list of ids for the model's input embedding
        (the one table it looks up), or ``{pattern: ids}`` per weight (``{"embed_tokens":
        [...], "lm_head": [...]}`` for an untied head). A tied head uses the same rows.
        With ``targets=[]`` only the rows train.
      use_dora: weight-decomposed LoRA (DoRA, PEFT's ``use_dora``): each adapted weight
        also gets a trainable magnitude ``m`` per output feature, initialised to the norms
        of ``W + scale · A ⊗ B`` over its input axes, and its outputs become
        ``m / ‖W + scale · A ⊗ B‖ · (W x + scale · x A B)``, the norm treated as a
        constant in the backward pass (see `jaxlora.lorafy`). Linear, einsum and
        embedding weights; not convolutions or expert weights.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | Sequence[str] = ALL_LINEAR
    exclude: Sequence[str] = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    dtype: str = "float32"
    modules_to_save: Sequence[str] = ()
    bias: Literal["none", "lora_only", "all"] = "none"
    dropout_rng: str = "dropout"
    quantize: Literal["nf4", "int8", "fp8"] | None = None
    quantize_exclude: Sequence[str] = ()
    double_quant: bool = True
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    use_dora: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "targets", _patterns("targets", self.targets))
        set_(self, "exclude", _patterns("exclude", self.exclude))
        set_(self, "modules_to_save", _patterns("modules_to_save", self.modules_to_save))
        set_(self, "quantize_exclude", _patterns("quantize_exclude", self.quantize_exclude))
        set_(self, "rank_pattern", dict(self.rank_pattern))
        set_(self, "alpha_pattern", dict(self.alpha_pattern))
        _patterns("rank_pattern", list(self.rank_pattern))
        _patterns("alpha_pattern", list(self.alpha_pattern))
        set_(self, "dtype", _dtype_name(self.dtype))
        set_(self, "rank", _check_rank("rank", self.rank))
        set_(self, "alpha", _check_alpha("alpha", self.alpha))
        set_(
            self,
            "rank_pattern",
            {p: _check_rank(f"rank_pattern[{p!r}]", r) for p, r in self.rank_pattern.items()},
        )
        set_(
            self,
            "alpha_pattern",
            {p: _check_alpha(f"alpha_pattern[{p!r}]", a) for p, a in self.alpha_pattern.items()},
        )
        set_(self, "dropout", _check_dropout(self.dropout))
        set_(self, "trainable_token_indices", _token_indices(self.trainable_token_indices))
        if self.init not in _INITS and not _init_from_weights.check_init(self.init):
            raise ValueError(
                f"LoraConfig: unknown init={self.init!r}; use one of {_INITS}, "
                f"{_init_from_weights.PISSA!r}, 'pissa_niter_<N>' (N >= 1, e.g. "
                f"'pissa_niter_4') or {_init_from_weights.OLORA!r}."
            )
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"LoraConfig: unknown bias={self.bias!r}; use one of {_BIAS_MODES}.")
        if self.quantize not in _QUANTIZE:
            raise ValueError(
                f"LoraConfig: unknown quantize={self.quantize!r}; use one of {_QUANTIZE}."
            )
        if self.quantize is not None and self.init not in _INITS:
            # The residual W - s·A·B would have to be quantized after the decomposition
            # and the adapter re-fitted to the quantized residual (PEFT's LoftQ): not built.
            raise ValueError(
                f"LoraConfig: init={self.init!r} with quantize={self.quantize!r} is not "
                "supported: initialising from the base weights changes them, and jaxlora "
                'does not quantize the residual. Use init="kaiming" with quantize, or '
                "quantize=None with this init."
            )
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"LoraConfig: use_dora={self.use_dora!r} must be True or False.")
        if self.use_dora and self.quantize is not None:
            # the norm of W + s·A·B would need W dequantized in every step (PEFT does that
            # for bitsandbytes); jaxlora does not build it
            raise ValueError(
                f"LoraConfig: use_dora=True with quantize={self.quantize!r} is not supported "
                "(DoRA's weight norm needs the dense base weight in every step). Use "
                "quantize=None with DoRA, or use_dora=False with quantize."
            )
        if not self.targets and self.trainable_token_indices is None:
            raise ValueError('LoraConfig: targets is empty; name layers or use "all-linear".')
        patterns = (*self.targets, *self.exclude, *self.quantize_exclude)
        for pattern in (*patterns, *self.rank_pattern, *self.alpha_pattern):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ValueError(f"LoraConfig: bad regex {pattern!r}: {e}.") from None

    def selects(self, path: str | Sequence[str], *, is_linear: bool) -> bool:
        """Whether the layer at ``path`` gets an adapter.

        Args:
          path: ``/``-joined layer path, or several (see `target_paths`): a pattern
            matching any of them counts.
          is_linear: whether the layer is Dense-like (``"all-linear"`` takes only those).
        """
        if any(_any_match(path, p) for p in self.exclude):
            return False
        return (ALL_LINEAR in self.targets and is_linear) or any(
            _any_match(path, p) for p in self.targets if p != ALL_LINEAR
        )

    def token_table(self) -> dict[str | None, tuple[int, ...]]:
        """``trainable_token_indices`` as ``{pattern: ids}``, the key None for a plain list."""
        value = self.trainable_token_indices
        if value is None:
            return {}
        return {None: value} if isinstance(value, tuple) else dict(value)

    def rank_for(self, path: str | Sequence[str]) -> int:
        """The adapter rank of the layer at ``path`` (or paths, see `selects`)."""
        rank = _first_match(path, self.rank_pattern)
        return self.rank if rank is None else rank

    def alpha_for(self, path: str | Sequence[str]) -> float:
        """The LoRA alpha of the layer at ``path``: its `alpha_pattern` entry, else ``alpha``.

        Example:
          >>> LoraConfig(alpha=16, alpha_pattern={"query": 32}).alpha_for("layer_0/query")
          32
        """
        alpha = _first_match(path, self.alpha_pattern)
        return self.alpha if alpha is None else alpha

    def scale_for(self, path: str | Sequence[str]) -> float:
        """The LoRA scale (alpha/r, or alpha/sqrt(r) with rslora) of the layer at ``path``."""
        rank = self.rank_for(path)
        return float(self.alpha_for(path)) / (math.sqrt(rank) if self.rslora else rank)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `LoraConfig(**d)` rebuilds the config."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _token_indices(indices: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """``trainable_token_indices`` checked and normalised: a tuple of ids (the model's input
    embedding), ``{pattern: ids}``, or None when not given.

    Raises:
      ValueError: an id that is not a non-negative int, a repeated id, an empty list.
    """
    if indices is None:
        return None
    table = dict(indices) if isinstance(indices, Mapping) else {None: indices}
    if not table:
        raise ValueError(
            "LoraConfig: trainable_token_indices is an empty dict; give the ids per embedding, "
            "e.g. {'embed_tokens': [32000, 32001]}, or a list for the input embedding."
        )
    out = {}
    for layer, ids in table.items():
        where = "trainable_token_indices" + ("" if layer is None else f"[{layer!r}]")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(
                f"LoraConfig: trainable_token_indices has key {layer!r}; keys are layer "
                "patterns like 'embed_tokens'."
            )
        ids = list(ids) if hasattr(ids, "tolist") else ids  # a numpy array of ids
        if isinstance(ids, str) or not isinstance(ids, Sequence) or not len(ids):
            raise ValueError(
                f"LoraConfig: {where}={ids!r} must be a non-empty list of token ids, e.g. "
                "[32000, 32001]."
            )
        bad = [i for i in ids if not _is_id(i)]
        if bad:
            raise ValueError(
                f"LoraConfig: {where} holds {bad!r}, which are not token ids (non-negative ints)."
            )
        ids = tuple(int(i) for i in ids)
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(
                f"LoraConfig: {where} repeats token ids {repeated}; list each id once."
            )
        out[layer] = ids
    return out.get(None, out)


def _is_id(i: Any) -> bool:
    return isinstance(i, numbers.Integral) and not isinstance(i, bool) and int(i) >= 0


def _is_number(x: Any) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_rank(name: str, rank: Any) -> int:
    """``rank`` as a Python int (numpy integers accepted); raises unless it is positive."""
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"LoraConfig: {name}={rank!r} must be a positive int (e.g. 8).")
    return int(rank)


def _check_alpha(name: str, alpha: Any) -> int | float:
    """``alpha`` as a Python int or float (numpy scalars accepted); raises unless finite and > 0."""
    if not _is_number(alpha) or not math.isfinite(alpha) or not alpha > 0:
        raise ValueError(
            f"LoraConfig: {name}={alpha!r} must be a finite positive number (e.g. 16)."
        )
    return int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)


def _check_dropout(dropout: Any) -> float:
    """``dropout`` as a Python float (numpy scalars accepted); raises unless in [0, 1)."""
    if not _is_number(dropout) or not math.isfinite(dropout):
        raise ValueError(
            f"LoraConfig: dropout={dropout!r} must be a finite number in [0, 1) (e.g. 0.05)."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoraConfig: dropout={dropout!r} is outside [0, 1).")
    return float(dropout)
