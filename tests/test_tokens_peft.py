"""New tokens against real PEFT: ``LoraConfig(trainable_token_indices=...)`` on a Hugging
Face ``LlamaForCausalLM`` (tied and untied head) and its linen twin from
``experiments/models/llama.py``, exported to PEFT and imported from it, same logits."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors
import torch
import transformers
from flax import nnx

import jaxlora
from experiments.models.llama import LlamaConfig, LlamaForCausalLM
from experiments.models.loading import flax_to_hf_state_dict
from tests.support import hf_twins
from tests.support import tunix_zoo as zoo
from tests.support.steps import moved

SIZES = {
    "vocab_size": 48,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
}
NEW = [40, 45, 47]  # "added" tokens at the end of the vocabulary
TOLERANCE = 1e-5
MOVED = 0.05  # the trained rows move the logits by more than this
IDS = np.array([[1, 40, 7, 45, 3, 47, 2], [47, 5, 40, 9, 45, 11, 6]], np.int64)
KEY = "base_model.model.{}.token_adapter.trainable_tokens_delta"
KEY_JAX = jax.random.key(2)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def twins(request):
    """``(linen model, its params, the torch model with the same weights)``."""
    config = LlamaConfig(**SIZES, tie_word_embeddings=request.param)
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(0), jnp.asarray(IDS, jnp.int32))["params"]
    hf = transformers.LlamaConfig(**SIZES, tie_word_embeddings=request.param)
    torch.manual_seed(0)
    twin = transformers.LlamaForCausalLM(hf).eval()
    state = {k: torch.tensor(v) for k, v in flax_to_hf_state_dict(params).items()}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if request.param else [])
    assert np.abs(_torch_logits(twin) - _logits(model, params)).max() <= TOLERANCE
    return model, params, twin


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def _logits(model, params, config=None):
    ids = jnp.asarray(IDS, jnp.int32)
    if config is None:
        return np.asarray(model.apply({"params": params}, ids))
    return np.asarray(jaxlora.LoraModel(model, config).apply({"params": params}, ids))


def _moved(params, scale=0.2):
    return moved(params, scale)


def test_export_loads_in_peft_with_the_same_logits(tmp_path, twins):
    model, params, twin = twins
    tied = "lm_head" not in params
    indices = NEW if tied else {"embed_tokens": NEW, "lm_head": NEW[:2]}
    cfg = jaxlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"], trainable_token_indices=indices)
    _, lora_params = jaxlora.lorafy(model, params, cfg, jnp.asarray(IDS, jnp.int32), key=KEY_JAX)
    moved = _moved(lora_params)
    want = _logits(model, moved, cfg)
    assert np.abs(want - _logits(model, params)).max() > MOVED

    jaxlora.export_peft(tmp_path, moved, cfg, module_map=jaxlora.peft_module_maps["llama"])
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    with safetensors.safe_open(tmp_path / "adapter_model.safetensors", "np") as f:
        keys = {k for k in f.keys() if "token_adapter" in k}  # noqa: SIM118
    if tied:  # PEFT ties the head to the embedding's rows itself
        assert saved["trainable_token_indices"] == {"model.embed_tokens": NEW}
        assert keys == {KEY.format("model.embed_tokens")}
    else:
        assert saved["trainable_token_indices"] == {"model.embed_tokens": NEW, "lm_head": NEW[:2]}
        assert keys == {KEY.format("model.embed_tokens"), KEY.format("lm_head")}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path).eval()
    assert np.abs(_torch_logits(loaded) - want).max() <= TOLERANCE


def test_peft_adapter_imports_with_the_same_logits(tmp_path, twins):
    model, params, twin = twins
    tied = "lm_head" not in params
    peft_model = peft.get_peft_model(
        copy.deepcopy(twin),
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj", "o_proj"],
            trainable_token_indices=NEW if tied else {"embed_tokens": NEW, "lm_head": NEW[1:]},
        ),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    peft_model.eval().save_pretrained(tmp_path)
    want = _torch_logits(peft_model)
    assert np.abs(want - _logits(model, params)).max() > MOVED

    config, imported = jaxlora.import_peft(
        tmp_path, params, module_map=jaxlora.peft_module_maps["llama"]
    )
    embed = imported["model"]["embed_tokens"]["tokens"]
    assert embed.indices == tuple(NEW)
    assert ("lm_head" in imported) is not tied
    if not tied:
        assert imported["lm_head"]["tokens"].indices == tuple(NEW[1:])
    assert np.abs(_logits(model, imported, config) - want).max() <= TOLERANCE
    merged = jaxlora.merge(imported)
    assert np.abs(_logits(model, merged) - want).max() <= TOLERANCE


TUNIX_NEW = [100, 120, 127]


@pytest.fixture(scope="module")
def tunix_llama():
    built = zoo.build("llama3")
    twin = hf_twins.llama(built)
    assert (
        np.abs(hf_twins.logits(twin, built.tokens) - _tunix_logits(built, None)).max() <= TOLERANCE
    )
    return built, twin


@nnx.jit
def _tunix_forward(module, tokens):
    return module(*zoo.model_inputs(tokens))[0]


def _tunix_logits(built, module):
    return np.asarray(_tunix_forward(built.module if module is None else module, built.tokens))


@pytest.mark.filterwarnings(zoo.PYTEST_WARNINGS)
def test_tunix_llama3_rows_go_to_peft_and_back(tmp_path, tunix_llama):
    built, twin = tunix_llama
    cfg = jaxlora.LoraConfig(
        rank=2,
        targets=["q_proj", "v_proj"],
        trainable_token_indices={"input_embedding": TUNIX_NEW, "lm_head": TUNIX_NEW[:2]},
    )
    module = jaxlora.lorafy(nnx.clone(built.module), cfg, *built.inputs, rngs=nnx.Rngs(0))
    state = nnx.state(module, jaxlora.TrainableParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))
    want = _tunix_logits(built, module)
    assert np.abs(want - _tunix_logits(built, None)).max() > MOVED
    module_map = jaxlora.peft_module_maps["tunix-llama3"]

    jaxlora.export_peft(tmp_path / "out", module, cfg, module_map=module_map)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == {
        "model.embed_tokens": TUNIX_NEW,
        "lm_head": TUNIX_NEW[:2],
    }
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "out").eval()
    assert np.abs(hf_twins.logits(loaded, built.tokens) - want).max() <= TOLERANCE

    peft_model = peft.get_peft_model(
        copy.deepcopy(twin),
        peft.LoraConfig(
            r=2,
            target_modules=["k_proj"],
            trainable_token_indices={"embed_tokens": TUNIX_NEW[1:], "lm_head": TUNIX_NEW},
        ),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    peft_model.eval().save_pretrained(tmp_path / "peft")
    config, imported = jaxlora.import_peft(
        tmp_path / "peft", built.module, *built.inputs, module_map=module_map
    )
    assert config.trainable_token_indices == {
        "re:embedder/input_embedding": tuple(TUNIX_NEW[1:]),
        "re:lm_head/w": tuple(TUNIX_NEW),
    }
    peft_logits = hf_twins.logits(peft_model, built.tokens)
    assert np.abs(_tunix_logits(built, imported) - peft_logits).max() <= TOLERANCE
    assert np.abs(_tunix_logits(built, jaxlora.merge(imported)) - peft_logits).max() <= TOLERANCE


class _TiedLlamaMap:
    """The "llama" module map, naming the torch head tied to the embedding (any callable
    works as a module map; ``tied`` is read from it as from jaxlora's own maps)."""

    tied = ("lm_head", "model.embed_tokens")

    def __call__(self, path):
        return jaxlora.peft_module_maps["llama"](path)


# PEFT warns that its TrainableTokensModel does not tie adapters on a tied model (it saves the
# head's copy of the rows); the logits below show both sides agree.
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_rows_without_lora_are_peft_trainable_tokens_both_ways(tmp_path, twins):
    model, params, twin = twins
    tied = "lm_head" not in params
    tables = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    cfg = jaxlora.LoraConfig(targets=[], trainable_token_indices=dict.fromkeys(tables, NEW))
    _, lora_params = jaxlora.lorafy(model, params, cfg, jnp.asarray(IDS, jnp.int32), key=KEY_JAX)
    moved = _moved(lora_params)
    want = _logits(model, moved, cfg)
    assert np.abs(want - _logits(model, params)).max() > MOVED
    module_map = jaxlora.peft_module_maps["llama"]
    if tied:  # PEFT keeps a copy of the rows for the tied head: name it to export them
        module_map = _TiedLlamaMap()
    jaxlora.export_peft(tmp_path / "out", moved, cfg, module_map=module_map)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TRAINABLE_TOKENS" and saved["token_indices"] == NEW
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "out").eval()
    assert np.abs(_torch_logits(loaded) - want).max() <= TOLERANCE

    peft_model = peft.get_peft_model(
        copy.deepcopy(twin), peft.TrainableTokensConfig(target_modules=tables, token_indices=NEW)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    peft_model.eval().save_pretrained(tmp_path / "peft")
    config, imported = jaxlora.import_peft(tmp_path / "peft", params, module_map=module_map)
    assert config.targets == () and set(config.trainable_token_indices) == {
        f"re:{'model/' if t == 'embed_tokens' else ''}{t}" for t in tables
    }
    assert np.abs(_logits(model, imported, config) - _torch_logits(peft_model)).max() <= TOLERANCE
