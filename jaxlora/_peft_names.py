"""Module maps: which torch module (or parameter) of a Hugging Face model each adapter is.

A module map is any callable from a jaxlora adapter name — the layer path for a
``kernel``/``embedding`` (``"layers_0/q_proj"``), the weight's own path for any other weight
(``"layers/0/attn/q_proj/w"``) — or a module path (for ``modules_to_save`` and biases) to:

- ``"model.layers.0.self_attn.q_proj"``: one torch module (Linear, Embedding, ConvNd), or
  for names in the map's ``parameters`` one torch parameter (PEFT's ``target_parameters``),
  e.g. expert weights ``"model.layers.0.mlp.experts.down_proj"``.
- ``"<name>[i]"``: block ``i`` of the outputs of that torch weight, which fuses several
  flax weights along its output axis, in block order (Hugging Face's
  ``experts.gate_up_proj`` holds tunix's ``gate_proj`` then ``up_proj``).
- a tuple of names: a flax weight whose first axis stacks several torch modules (gemma's
  ``qkv_einsum`` ``(3, heads, d, head_dim)`` is ``q_proj``, ``k_proj``, ``v_proj``).
- None: the flax weight has no torch counterpart.

A `NameMap` also says what names alone cannot: which torch modules are Embeddings or
convolutions, which names are parameters, and the output head that shares the input
embedding's weight when the flax model has no head of its own (``tied``). Plain
callables work too; they then describe Linear modules and Flax's own Embed/Conv layers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

ModuleMap = Callable[[str], "str | tuple[str, ...] | None"]

_BLOCK = re.compile(r"(.+)\[(\d+)\]")


class NameMap:
    """A module map plus the facts about the torch model that names alone do not say.

    Attributes:
      embeddings: torch modules that are ``nn.Embedding`` (exact names or ``.``-suffixes).
      convs: torch modules that are ``nn.Conv1d/2d/3d``; a Flax kernel ``(*window, in,
        out)`` exports to them as PEFT's Conv LoRA.
      parameters: names that are torch parameters, adapted by PEFT's ``target_parameters``:
        expert weights ``(experts, ...)`` (the only stacked weights PEFT adapts) and 2-D
        parameters of modules that are not Linear (e.g. a router's ``gate.weight``).
      tied: ``(head, embedding)``: the torch output head that reuses the input embedding's
        weight when the flax model has no weight of its own mapped to the head (e.g.
        ``("lm_head", "model.embed_tokens")``). An adapted embedding then adapts the head
        too, in jaxlora as in PEFT's ``ensure_weight_tying``.
    """

    def __init__(
        self,
        name_of: Callable[[str], str | tuple[str, ...] | None],
        *,
        embeddings: Sequence[str] = (),
        convs: Sequence[str] = (),
        parameters: Sequence[str] = (),
        tied: tuple[str, str] | None = None,
    ):
        self._name_of = name_of
        self.embeddings = tuple(embeddings)
        self.convs = tuple(convs)
        self.parameters = tuple(parameters)
        self.tied = tied

    def __call__(self, path: str) -> str | tuple[str, ...] | None:
        """The torch name(s) of a flax adapter or module path (see the module docstring)."""
        return self._name_of(path)


def listed(name: str, names: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``names`` or ends with ``"." + one of them`` (PEFT's rule)."""
    return any(name == n or name.endswith("." + n) for n in names)


def facts(module_map: ModuleMap, attribute: str) -> tuple[str, ...]:
    """A `NameMap` attribute of any module map (empty for a plain callable)."""
    return tuple(getattr(module_map, attribute, ()) or ())


def _generic(prefix: str, heads: tuple[str, ...], path: str) -> str:
    parts = path.split("/")
    name = ".".join(re.sub(r"^(.+)_(\d+)$", r"\1.\2", p) for p in parts)
    return name if parts[0] in heads else prefix + name


def peft_module_map(
    prefix: str = "",
    *,
    heads: Sequence[str] = (),
    embeddings: Sequence[str] = (),
    convs: Sequence[str] = (),
    parameters: Sequence[str] = (),
) -> NameMap:
    """The usual flax-path -> torch-module-name rule, for models named after their HF modules.

    ``/`` becomes ``.`` and a linen list name ``name_<i>`` becomes ``name.<i>``:
    ``encoder/layer_0/attention/self/query`` -> ``encoder.layer.0.attention.self.query``.

    Args:
      prefix: put in front of every torch name, e.g. ``"bert."`` when the flax params are
        a bare ``BertModel`` and the torch model is ``BertForSequenceClassification``.
      heads: top-level flax modules that do not get the prefix (e.g. ``("classifier",)``).
      embeddings: torch modules that are ``nn.Embedding`` although their flax weight is not
        an ``embedding`` (Flax's own ``Embed`` layers need no entry).
      convs: torch modules that are convolutions: a linen ``nn.Conv`` kernel ``(*window, in,
        out)`` looks like a DenseGeneral's, so name them here to export them as PEFT's Conv
        LoRA (NNX ``nnx.Conv`` layers are recognised by type).
      parameters: torch parameters (PEFT ``target_parameters``), e.g. expert weights
        ``("experts.gate_up_proj", "experts.down_proj")``; see `NameMap`.

    Returns:
      The module map, for `export_peft` / `import_peft`.

    Example:
      >>> jaxlora.peft_module_map("bert.", heads=("classifier",))("encoder/layer_0/output/dense")
      'bert.encoder.layer.0.output.dense'
    """
    rule = functools.partial(_generic, prefix, tuple(heads))
    return NameMap(rule, embeddings=embeddings, convs=convs, parameters=parameters)


def _by_rules(rules: Sequence[tuple[str, str | tuple[str, ...]]], path: str):
    for pattern, template in rules:
        match = re.fullmatch(pattern, path)
        if match is None:
            continue
        if isinstance(template, tuple):
            return tuple(match.expand(t) for t in template)
        return match.expand(template)
    return None


_LAYER = r"layers/(\d+)"
_HF_LAYER = r"model.layers.\1"
_LLAMA_RULES = (
    (r"embedder/input_embedding", "model.embed_tokens"),
    (rf"{_LAYER}/attn/([qkvo])_proj/w", rf"{_HF_LAYER}.self_attn.\2_proj"),
    (rf"{_LAYER}/mlp/(gate|up|down)_proj", rf"{_HF_LAYER}.mlp.\2_proj"),
    (r"lm_head/w", "lm_head"),
)
_QWEN3_MOE_RULES = (
    (rf"{_LAYER}/mlp/router", rf"{_HF_LAYER}.mlp.gate.weight"),
    (rf"{_LAYER}/mlp/gate_proj", rf"{_HF_LAYER}.mlp.experts.gate_up_proj[0]"),
    (rf"{_LAYER}/mlp/up_proj", rf"{_HF_LAYER}.mlp.experts.gate_up_proj[1]"),
    (rf"{_LAYER}/mlp/down_proj", rf"{_HF_LAYER}.mlp.experts.down_proj"),
    *_LLAMA_RULES,
)
_ATTN = rf"{_HF_LAYER}.self_attn"
_GEMMA_RULES = (
    (r"embedder/input_embedding", "model.embed_tokens"),
    (rf"{_LAYER}/attn/qkv_einsum/w", (f"{_ATTN}.q_proj", f"{_ATTN}.k_proj", f"{_ATTN}.v_proj")),
    (rf"{_LAYER}/attn/kv_einsum/w", (f"{_ATTN}.k_proj", f"{_ATTN}.v_proj")),
    (rf"{_LAYER}/attn/q_einsum/w", f"{_ATTN}.q_proj"),
    (rf"{_LAYER}/attn/k_einsum/w", f"{_ATTN}.k_proj"),
    (rf"{_LAYER}/attn/attn_vec_einsum/w", f"{_ATTN}.o_proj"),
    (rf"{_LAYER}/mlp/(gate|up|down)_proj", rf"{_HF_LAYER}.mlp.\2_proj"),
    # gemma4: per-layer inputs, and MoE beside the dense MLP
    (r"embedder/per_layer_input_embedding", "model.embed_tokens_per_layer"),
    (r"embedder/per_layer_model_projection/w", "model.per_layer_model_projection"),
    (rf"{_LAYER}/(per_layer_input_gate|per_layer_projection)/w", rf"{_HF_LAYER}.\2"),
    (rf"{_LAYER}/moe/router_logits", rf"{_HF_LAYER}.router.proj"),
    (rf"{_LAYER}/moe/gating_einsum", rf"{_HF_LAYER}.experts.gate_up_proj"),
    (rf"{_LAYER}/moe/linear", rf"{_HF_LAYER}.experts.down_proj"),
)


_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def _tunix(rules, **torch_facts) -> NameMap:
    embeddings = ("model.embed_tokens", "model.embed_tokens_per_layer")
    return NameMap(
        functools.partial(_by_rules, rules),
        embeddings=embeddings,
        tied=("lm_head", "model.embed_tokens"),
        **torch_facts,
    )


class _ModuleMaps(Mapping[str, ModuleMap]):
    """Module maps (flax path -> torch name) by architecture, read-only.

    - ``"bert"``: ``encoder/layer_0/attention/self/query`` ->
      ``encoder.layer.0.attention.self.query``.
    - ``"bert-seq-cls"``: a flax BertModel body (``encoder/...``) plus a top-level
      ``classifier`` -> HF ``BertForSequenceClassification`` (``bert.encoder...``,
      ``classifier``).
    - ``"llama"``: ``model/layers_0/self_attn/q_proj`` -> ``model.layers.0.self_attn.q_proj``.
    - ``"llama-body"``: a flax LlamaModel body (``layers_0/...``) plus ``lm_head`` /
      ``score`` -> HF ``LlamaFor*`` (``model.layers.0...``, ``lm_head``, ``score``).
    - ``"tunix-llama3"``, ``"tunix-qwen2"``, ``"tunix-qwen3"``: Google Tunix's NNX models
      -> HF ``LlamaForCausalLM``/``Qwen2ForCausalLM``/``Qwen3ForCausalLM``:
      ``layers/0/attn/q_proj/w`` ``(d, heads, head_dim)`` -> ``model.layers.0.self_attn.
      q_proj`` (also k, v, o), ``layers/0/mlp/gate_proj`` -> ``model.layers.0.mlp.gate_proj``
      (also up, down), ``embedder/input_embedding`` -> ``model.embed_tokens``, ``lm_head/w``
      -> ``lm_head`` (a tied head is ``lm_head`` reusing the embedding).
    - ``"tunix-qwen3-moe"``: as ``"tunix-qwen3"``, with the MoE layer -> HF
      ``Qwen3MoeForCausalLM``: ``layers/0/mlp/router`` -> parameter ``model.layers.0.mlp.
      gate.weight``; expert weights ``gate_proj``/``up_proj`` ``(experts, d, f)`` -> blocks 0/1
      of ``model.layers.0.mlp.experts.gate_up_proj``, ``down_proj`` -> ``...experts.
      down_proj`` (PEFT ``target_parameters``).
    - ``"tunix-gemma"``, ``"tunix-gemma3"``, ``"tunix-gemma4"`` (one map for the three) ->
      HF ``Gemma2ForCausalLM``/``Gemma3ForCausalLM``/``Gemma4ForCausalLM``: ``q_einsum`` ->
      ``q_proj``, fused ``qkv_einsum`` ``(3, heads, d, head_dim)`` -> ``q_proj``, ``k_proj``,
      ``v_proj`` and ``kv_einsum`` ``(2, ...)`` -> ``k_proj``, ``v_proj`` (split along the
      first axis), ``k_einsum`` -> ``k_proj``, ``attn_vec_einsum`` -> ``o_proj``, the MLP as
      above; gemma4's ``per_layer_input_embedding`` -> ``model.embed_tokens_per_layer``,
      ``per_layer_model_projection``, ``per_layer_input_gate``, ``per_layer_projection``,
      and its MoE ``router_logits`` -> ``router.proj``, ``gating_einsum`` -> ``experts.
      gate_up_proj``, ``linear`` -> ``experts.down_proj``.

    ``"bert"`` and ``"llama"`` also cover flax models named exactly like the HF head
    models (``bert/...`` + ``classifier``, ``model/...`` + ``lm_head``).

    Example:
      >>> jaxlora.peft_module_maps["llama"]("model/layers_3/mlp/down_proj")
      'model.layers.3.mlp.down_proj'
      >>> jaxlora.peft_module_maps["tunix-llama3"]("layers/3/attn/o_proj/w")
      'model.layers.3.self_attn.o_proj'
    """

    def __init__(self, maps: Mapping[str, ModuleMap]):
        self._maps = dict(maps)

    def __getitem__(self, name: str) -> ModuleMap:
        if name not in self._maps:
            raise KeyError(
                f"peft_module_maps has no map {name!r}; it has {sorted(self._maps)}. For "
                "another model, pass module_map=jaxlora.peft_module_map(...) or a function."
            )
        return self._maps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


_GEMMA = _tunix(_GEMMA_RULES, parameters=_EXPERTS)
peft_module_maps = _ModuleMaps(
    {
        "bert": peft_module_map(),
        "bert-seq-cls": peft_module_map("bert.", heads=("classifier",)),
        "llama": peft_module_map(),
        "llama-body": peft_module_map("model.", heads=("lm_head", "score")),
        "tunix-llama3": _tunix(_LLAMA_RULES),
        "tunix-qwen2": _tunix(_LLAMA_RULES),
        "tunix-qwen3": _tunix(_LLAMA_RULES),
        "tunix-qwen3-moe": _tunix(_QWEN3_MOE_RULES, parameters=("mlp.gate.weight", *_EXPERTS)),
        "tunix-gemma": _GEMMA,
        "tunix-gemma3": _GEMMA,
        "tunix-gemma4": _GEMMA,
    }
)


def slots(module_map: ModuleMap, path: str, *, who: str) -> tuple[tuple[str, int | None], ...]:
    """Where the flax adapter ``path`` goes: ``((torch name, block or None), ...)``.

    Several entries mean the weight's first axis splits into those torch modules; a block
    index means the weight is that block of a fused torch weight's outputs. Empty: the map
    gives no torch name.

    Raises:
      ValueError: an answer that is not a name, a ``name[i]``, or a tuple of plain names.
    """
    answer = module_map(path)
    if answer is None:
        return ()
    names = answer if isinstance(answer, tuple) else (answer,)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"{who}: module_map({path!r}) gave {answer!r}; it must return a torch name, a tuple "
            "of torch names (a weight whose first axis stacks several torch modules), or None."
        )
    parsed = [_BLOCK.fullmatch(n) for n in names]
    if len(names) > 1 and any(parsed):
        raise ValueError(
            f"{who}: module_map({path!r}) gave {answer!r}: a weight split over several torch "
            "modules cannot also be a block of a fused one."
        )
    return tuple((m[1], int(m[2])) if m else (n, None) for m, n in zip(parsed, names, strict=True))
