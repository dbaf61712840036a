"""Hugging Face torch twins of `tunix_zoo` models, with the tunix weights copied in.

`llama` builds a ``transformers.LlamaForCausalLM`` and `qwen3_moe` a
``Qwen3MoeForCausalLM`` of the zoo's tiny sizes; each returns the same logits as the tunix
model it was copied from (to 3.4e-6 for llama3, 1.7e-6 for qwen3_moe).
`gemma` builds a ``Gemma2ForCausalLM`` (zoo "gemma") or ``Gemma3ForCausalLM`` ("gemma3")
whose attention and MLP projections hold the tunix weights (the fused ``qkv_einsum`` /
``kv_einsum`` split into ``q_proj``/``k_proj``/``v_proj``); only the projections are
compared, not the whole model.

RoPE: tunix's llama3 and qwen3 call ``apply_rope`` without their config's ``rope_theta``, so
they always rotate with its default base 1e6, whatever the config says; the twins use
``rope_theta=1e6`` to match. Both use the rotate-half convention of Hugging Face.

Weights are copied the way tunix's own safetensors loaders read them, inverted: a torch
``(heads·head_dim, d)`` projection is the tunix ``(d, heads, head_dim)`` weight reshaped
to ``(d, heads·head_dim)`` and transposed.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import nnx

from tests.support import tunix_zoo as zoo

TUNIX_ROPE_THETA = 1_000_000.0


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))


def _heads_out(w) -> torch.Tensor:
    """``(d, heads, head_dim)`` -> torch ``(heads·head_dim, d)``."""
    return _t(w).reshape(w.shape[0], -1).T


def _heads_in(w) -> torch.Tensor:
    """``(heads, head_dim, d)`` -> torch ``(d, heads·head_dim)``."""
    return _t(w).reshape(-1, w.shape[-1]).T


def _attention(layer: nnx.Module, prefix: str) -> dict[str, torch.Tensor]:
    attn = layer.attn
    return {
        f"{prefix}self_attn.q_proj.weight": _heads_out(attn.q_proj.w[...]),
        f"{prefix}self_attn.k_proj.weight": _heads_out(attn.k_proj.w[...]),
        f"{prefix}self_attn.v_proj.weight": _heads_out(attn.v_proj.w[...]),
        f"{prefix}self_attn.o_proj.weight": _heads_in(attn.o_proj.w[...]),
        f"{prefix}input_layernorm.weight": _t(layer.input_layernorm.w[...]),
        f"{prefix}post_attention_layernorm.weight": _t(layer.post_attention_layernorm.w[...]),
    }


def _common(module: nnx.Module) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": _t(module.embedder.input_embedding[...]),
        "model.norm.weight": _t(module.final_norm.w[...]),
        "lm_head.weight": _t(module.lm_head.w[...]).T,
    }


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(state, strict=True)
    return model.eval()


def _sizes(built: zoo.Zoo) -> dict:
    """The Hugging Face config fields every twin shares with the zoo's sizes (untied head)."""
    return {
        "vocab_size": zoo.VOCAB,
        "hidden_size": zoo.EMBED,
        "intermediate_size": zoo.HIDDEN,
        "num_hidden_layers": zoo.LAYERS,
        "num_attention_heads": zoo.HEADS,
        "num_key_value_heads": zoo.KV_HEADS,
        "head_dim": zoo.HEAD_DIM,
        "rope_theta": TUNIX_ROPE_THETA,
        "rms_norm_eps": built.config.norm_eps,
        "tie_word_embeddings": False,
    }


def llama(built: zoo.Zoo) -> transformers.LlamaForCausalLM:
    """A ``LlamaForCausalLM`` holding the weights of the zoo's llama3 (untied head)."""
    module = built.module
    config = transformers.LlamaConfig(**_sizes(built))
    state = _common(module)
    for i, layer in enumerate(module.layers):
        prefix = f"model.layers.{i}."
        state.update(_attention(layer, prefix))
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[f"{prefix}mlp.{name}.weight"] = _t(getattr(layer.mlp, name).kernel[...]).T
    torch.manual_seed(0)
    return _load(transformers.LlamaForCausalLM(config), state)


def qwen3_moe(built: zoo.Zoo) -> transformers.Qwen3MoeForCausalLM:
    """A ``Qwen3MoeForCausalLM`` holding the weights of the zoo's qwen3_moe.

    tunix keeps ``gate_proj``/``up_proj`` ``(experts, d, f)`` apart; Hugging Face fuses them
    into ``experts.gate_up_proj`` ``(experts, 2f, d)``, gate first.
    """
    module = built.module
    config = transformers.Qwen3MoeConfig(
        **_sizes(built),
        moe_intermediate_size=zoo.EXPERT_HIDDEN,
        num_experts=zoo.EXPERTS,
        num_experts_per_tok=zoo.TOP_K,
        norm_topk_prob=True,
    )
    state = _common(module)
    for i, layer in enumerate(module.layers):
        prefix = f"model.layers.{i}."
        state.update(_attention(layer, prefix))
        state[f"{prefix}self_attn.q_norm.weight"] = _t(layer.attn.q_norm.w[...])
        state[f"{prefix}self_attn.k_norm.weight"] = _t(layer.attn.k_norm.w[...])
        mlp = layer.mlp
        state[f"{prefix}mlp.gate.weight"] = _t(mlp.router.kernel[...]).T
        gate_up = np.concatenate([mlp.gate_proj[...], mlp.up_proj[...]], axis=-1)
        state[f"{prefix}mlp.experts.gate_up_proj"] = _t(gate_up).transpose(1, 2)
        state[f"{prefix}mlp.experts.down_proj"] = _t(mlp.down_proj[...]).transpose(1, 2)
    torch.manual_seed(0)
    return _load(transformers.Qwen3MoeForCausalLM(config), state)


def gemma_projections(module: nnx.Module) -> dict[str, np.ndarray]:
    """The torch ``(out, in)`` weight of every attention and MLP projection of a tunix gemma
    or gemma3 module, by Hugging Face module name: ``qkv_einsum`` ``(3, heads, d, head_dim)``
    and ``kv_einsum`` ``(2, kv_heads, d, head_dim)`` split along their first axis."""
    weights = {}
    for i, layer in enumerate(module.layers):
        prefix, attn = f"model.layers.{i}.", layer.attn
        if hasattr(attn, "qkv_einsum"):
            q, k, v = np.asarray(attn.qkv_einsum.w[...])
        else:
            q, (k, v) = np.asarray(attn.q_einsum.w[...]), np.asarray(attn.kv_einsum.w[...])
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):  # (heads, d, head_dim)
            weights[f"{prefix}self_attn.{name}"] = w.transpose(0, 2, 1).reshape(-1, w.shape[1])
        o = np.asarray(attn.attn_vec_einsum.w[...])  # (heads, head_dim, d)
        weights[f"{prefix}self_attn.o_proj"] = o.reshape(-1, o.shape[-1]).T
        for name in ("gate_proj", "up_proj", "down_proj"):
            weights[f"{prefix}mlp.{name}"] = np.asarray(getattr(layer.mlp, name).kernel[...]).T
    return weights


def gemma(built: zoo.Zoo) -> torch.nn.Module:
    """A Hugging Face ``Gemma2ForCausalLM`` (zoo "gemma") or ``Gemma3ForCausalLM`` ("gemma3")
    whose projections hold the tunix weights (`gemma_projections`); its other weights
    (norms, embeddings) are left random: compare projections, not logits."""
    kv_heads = zoo.HEADS if built.name == "gemma" else zoo.KV_HEADS
    sizes = {
        "vocab_size": zoo.VOCAB,
        "hidden_size": zoo.EMBED,
        "intermediate_size": zoo.HIDDEN,
        "num_hidden_layers": zoo.LAYERS,
        "num_attention_heads": zoo.HEADS,
        "num_key_value_heads": kv_heads,
        "head_dim": zoo.HEAD_DIM,
    }
    if built.name == "gemma":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**sizes))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**sizes))
    state = {f"{n}.weight": _t(w) for n, w in gemma_projections(built.module).items()}
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"not weights of {type(model).__name__}: {unexpected}")
    return model.eval()


def logits(model: torch.nn.Module, tokens) -> np.ndarray:
    """``model(tokens).logits`` as numpy, ``(batch, length, vocab)``."""
    with torch.no_grad():
        return model(torch.from_numpy(np.array(tokens)).long()).logits.numpy()
