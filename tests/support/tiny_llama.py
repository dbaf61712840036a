"""A tiny random Llama written as a Hugging Face directory, for the experiment tests."""

import json
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from experiments import data
from experiments.models.llama import LlamaConfig, LlamaForCausalLM
from experiments.models.loading import flax_to_hf_state_dict

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "eos_token_id": 0,
}


def write_tiny_llama(path: Path, **config: int) -> Path:
    """A random Llama (`TINY_LLAMA`, updated by ``config``) as a Hugging Face directory, with a
    word-level tokenizer for Hamlet."""
    config = {**TINY_LLAMA, **config}
    path.mkdir(exist_ok=True)
    params = LlamaForCausalLM(LlamaConfig.from_dict(config)).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )
    save_file(flax_to_hf_state_dict(params["params"]), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    words = Counter(data.load_hamlet().split()).most_common(config["vocab_size"] - 1)
    vocab = {"<unk>": 0, **{word: i + 1 for i, (word, _) in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    return path
