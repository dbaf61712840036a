"""Shared fixtures of the experiment tests: a tiny random Llama as a local model directory."""

import json
from collections import Counter

import jax
import jax.numpy as jnp
import pytest
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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random Llama as a Hugging Face directory, with a word-level tokenizer for Hamlet."""
    path = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig.from_dict(TINY_LLAMA)
    params = LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    save_file(flax_to_hf_state_dict(params["params"]), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    words = Counter(data.load_hamlet().split()).most_common(TINY_LLAMA["vocab_size"] - 1)
    vocab = {"<unk>": 0, **{word: i + 1 for i, (word, _) in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    return path
