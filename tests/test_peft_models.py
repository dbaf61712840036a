"""PEFT interop on the weights PEFT's Linear-only view does not cover: einsum-shaped heads,
fused q/k/v, MoE experts (``target_parameters``) and convolutions, against real PEFT.

The tunix models (NNX, `tests.support.tunix_zoo`) have Hugging Face torch twins with their
weights copied (`tests.support.hf_twins`): llama3 and qwen3_moe give the same logits as the
twin, so adapters are compared on logits; for gemma/gemma3 only the projections are the
same, so adapters are compared on each projection's output.
"""

import copy
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors
import torch
from flax import nnx

import jaxlora
from tests.support import conv_twins, hf_twins
from tests.support import tunix_zoo as zoo
from tests.support.steps import moved

pytestmark = [
    # tunix's own code warns (deprecated JAX and flax APIs) on every call.
    pytest.mark.filterwarnings(zoo.PYTEST_WARNINGS),
    # PEFT says it saves the base embedding beside an adapted one; import_peft skips it.
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning:peft"),
]
TOLERANCE = 1e-5
# What LoRA moves the logits by in these tests, so that a parity within TOLERANCE means
# something: the adapters are trained to this size (measured 0.9 to 3.5).
MOVED = 0.1


def _noised(module, scale=0.1):
    """``module`` with every LoRA factor moved off its initial value (B no longer zero)."""
    state = nnx.state(module, jaxlora.LoraParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))
    return module


def _adapted(built, config):
    return _noised(jaxlora.lorafy(nnx.clone(built.module), config, *built.inputs, rngs=nnx.Rngs(0)))


def _moved(params, scale):
    return moved(params, scale)


def _peft_trained(model, config, scale=0.1):
    """A PEFT model on a copy of ``model`` with every LoRA factor moved off its init."""
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn_like(param))
    return peft_model.eval()


def _save(peft_model, directory):
    peft_model.save_pretrained(directory)
    return directory


@nnx.jit
def _forward(module, tokens):
    return module(*zoo.model_inputs(tokens))[0]


def _logits(built, module):
    """``(batch, length, vocab)`` logits of ``module`` (default: the base model)."""
    return np.asarray(_forward(built.module if module is None else module, built.tokens))


def _lora_state(module):
    return nnx.state(module, jaxlora.TrainableParam)


LLAMA_CONFIG = jaxlora.LoraConfig(
    rank=4,
    alpha=8,
    targets=["all-linear", "input_embedding"],
    rank_pattern={"o_proj": 2},
    alpha_pattern={"v_proj": 3},
)


@pytest.fixture(scope="module")
def llama():
    built = zoo.build("llama3")
    twin = hf_twins.llama(built)
    assert np.abs(hf_twins.logits(twin, built.tokens) - _logits(built, None)).max() <= TOLERANCE
    return built, twin


def test_tunix_llama3_exports_to_peft_with_parity(tmp_path, llama):
    built, twin = llama
    module = _adapted(built, LLAMA_CONFIG)
    module_map = jaxlora.peft_module_maps["tunix-llama3"]
    jaxlora.export_peft(tmp_path / "out", module, LLAMA_CONFIG, module_map=module_map)

    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "model.layers.1.self_attn.q_proj" in saved["target_modules"]
    assert {"lm_head", "model.embed_tokens"} <= set(saved["target_modules"])
    assert saved["rank_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 2 for i in (0, 1)}
    with _safe_open(tmp_path / "out") as f:  # (d, heads, head_dim) -> torch (heads·head_dim, d)
        assert f.get_slice(_key("model.layers.0.self_attn.q_proj", "B")).get_shape() == [32, 4]
        assert f.get_slice(_key("model.layers.0.self_attn.o_proj", "A")).get_shape() == [2, 32]

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "out").eval()
    want = _logits(built, module)
    assert np.abs(want - _logits(built, None)).max() > MOVED
    assert np.abs(hf_twins.logits(loaded, built.tokens) - want).max() <= TOLERANCE

    config, imported = jaxlora.import_peft(
        tmp_path / "out", built.module, *built.inputs, module_map=module_map
    )
    chex.assert_trees_all_equal(_lora_state(imported), _lora_state(module))
    assert jaxlora.summary(imported).layers == jaxlora.summary(module).layers
    assert config.rank_for("layers/0/attn/o_proj/w") == 2
    assert config.alpha_for("layers/1/attn/v_proj/w") == 3


def test_peft_adapter_imports_into_tunix_llama3_with_parity(tmp_path, llama):
    built, twin = llama
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    peft_model = _peft_trained(
        twin,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=[*targets, "embed_tokens", "lm_head"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"o_proj": 4},
        ),
    )
    directory = _save(peft_model, tmp_path / "peft")
    config, module = jaxlora.import_peft(
        directory,
        built.module,
        *built.inputs,
        module_map=jaxlora.peft_module_maps["tunix-llama3"],
    )
    want = hf_twins.logits(peft_model, built.tokens)
    assert np.abs(want - _logits(built, None)).max() > MOVED
    assert np.abs(_logits(built, module) - want).max() <= TOLERANCE
    layers = {layer.path: layer for layer in jaxlora.summary(module).layers}
    assert layers["layers/0/attn/q_proj/w"].a_shape == (32, 4)
    assert layers["layers/0/attn/q_proj/w"].b_shape == (4, 4, 8)
    assert layers["layers/1/attn/k_proj/w"].rank == 2
    assert layers["layers/0/attn/o_proj/w"].scale == 1.0
    assert "layers/0/mlp/up_proj" not in layers and config.targets[0].startswith("re:")


def _key(module, factor):
    return f"base_model.model.{module}.lora_{factor}.weight"


def _safe_open(directory):
    return safetensors.safe_open(directory / "adapter_model.safetensors", "np")


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_every_tunix_family_exports_and_imports_exactly(tmp_path, family):
    built = zoo.build(family)
    # gemma4's embedder (adapted: input_embedding) holds per_layer_model_projection (adapted
    # too): nested LoraModules
    config = jaxlora.LoraConfig(rank=2, alpha=4, targets=["all-linear", "input_embedding"])
    module = _adapted(built, config)
    name = family.replace("_moe", "-moe") if family == "qwen3_moe" else family.split("_")[0]
    module_map = jaxlora.peft_module_maps[f"tunix-{name}"]
    jaxlora.export_peft(tmp_path / "out", module, config, module_map=module_map)
    _, imported = jaxlora.import_peft(
        tmp_path / "out", built.module, *built.inputs, module_map=module_map
    )
    assert {layer.path for layer in jaxlora.summary(imported).layers} == {
        layer.path for layer in jaxlora.summary(module).layers
    }
    # gate/up of qwen3_moe come back from one fused torch weight with rank 2r: other factors,
    # the same weight updates.
    chex.assert_trees_all_close(_deltas(imported), _deltas(module), atol=1e-6)


def _deltas(module):
    """``{adapted weight: scale · A ⊗ B}`` of an adapted NNX module."""
    deltas = {}
    for path, wrapper in nnx.iter_modules(module):
        if isinstance(wrapper, jaxlora.LoraModule | jaxlora.LoraLayer):
            adapters = (
                wrapper.adapters if isinstance(wrapper, jaxlora.LoraModule) else {"": wrapper}
            )
            for weight, ad in adapters.items():
                a, b = np.asarray(ad.lora_a[...]), np.asarray(ad.lora_b[...])
                deltas[(*path, weight)] = ad.scale * np.einsum(ad.delta_eq, a, b)
    return deltas


@pytest.fixture(scope="module")
def qwen3_moe():
    built = zoo.build("qwen3_moe")
    twin = hf_twins.qwen3_moe(built)
    assert np.abs(hf_twins.logits(twin, built.tokens) - _logits(built, None)).max() <= TOLERANCE
    return built, twin


MOE_MAP = jaxlora.peft_module_maps["tunix-qwen3-moe"]


def test_moe_experts_export_as_peft_target_parameters(tmp_path, qwen3_moe):
    built, twin = qwen3_moe
    config = jaxlora.LoraConfig(
        rank=2, alpha=4, targets=["router", "gate_proj", "up_proj", "down_proj", "q_proj"]
    )
    module = _adapted(built, config)
    jaxlora.export_peft(tmp_path / "out", module, config, module_map=MOE_MAP)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == [
        f"model.layers.{i}.mlp.{p}"
        for i in (0, 1)
        for p in ("experts.down_proj", "experts.gate_up_proj", "gate.weight")
    ]
    # gate and up have their own A: the fused gate_up_proj gets both (rank 2r, B block-diagonal).
    assert saved["rank_pattern"]["model.layers.0.mlp.experts.gate_up_proj"] == 4
    with _safe_open(tmp_path / "out") as f:  # gate_up_proj wraps first, so it is inside
        inner = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
        assert f.get_slice(inner).get_shape() == [4 * zoo.EXPERTS, zoo.EMBED]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "out").eval()
    want = _logits(built, module)
    assert np.abs(want - _logits(built, None)).max() > MOVED
    assert np.abs(hf_twins.logits(loaded, built.tokens) - want).max() <= TOLERANCE


def test_peft_target_parameters_import_onto_tunix_experts(tmp_path, qwen3_moe):
    built, twin = qwen3_moe
    peft_model = _peft_trained(
        twin,
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["o_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"],
            rank_pattern={"down_proj": 3},
        ),
    )
    directory = _save(peft_model, tmp_path / "peft")
    _, module = jaxlora.import_peft(directory, built.module, *built.inputs, module_map=MOE_MAP)
    want = hf_twins.logits(peft_model, built.tokens)
    assert np.abs(want - _logits(built, None)).max() > MOVED
    assert np.abs(_logits(built, module) - want).max() <= TOLERANCE
    layers = {layer.path: layer for layer in jaxlora.summary(module).layers}
    # per expert: A (experts, d, r), B (experts, r, f); gate and up share PEFT's one A
    assert layers["layers/0/mlp/gate_proj"].a_shape == (zoo.EXPERTS, zoo.EMBED, 2)
    assert layers["layers/0/mlp/up_proj"].b_shape == (zoo.EXPERTS, 2, zoo.EXPERT_HIDDEN)
    assert layers["layers/1/mlp/down_proj"].rank == 3
    adapters = nnx.state(module, jaxlora.LoraParam)["layers"][0]["mlp"]["adapters"]
    chex.assert_trees_all_equal(adapters["gate_proj"]["lora_a"], adapters["up_proj"]["lora_a"])


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_fused_qkv_splits_into_q_k_v_projections(tmp_path, family):
    """gemma's qkv_einsum (3, heads, d, head_dim) and gemma3's kv_einsum (2, ...) are several
    torch modules: their projections agree with PEFT's both ways."""
    built = zoo.build(family)
    twin = hf_twins.gemma(built)
    module_map = jaxlora.peft_module_maps[f"tunix-{family}"]
    config = jaxlora.LoraConfig(rank=2, alpha=4, targets=["all-linear", "input_embedding"])
    module = _adapted(built, config)
    jaxlora.export_peft(tmp_path / "out", module, config, module_map=module_map)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["ensure_weight_tying"]  # the head reuses the adapted embedding, as in tunix
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "out").eval()
    _assert_projections_agree(loaded, jaxlora.merge(module))

    peft_model = _peft_trained(
        twin, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    directory = _save(peft_model, tmp_path / "peft")
    imported_config, imported = jaxlora.import_peft(
        directory, built.module, *built.inputs, module_map=module_map
    )
    _assert_projections_agree(peft_model, jaxlora.merge(imported))
    # PEFT's q, k, v have their own A: the fused weight stacks them (rank 3r or 2r).
    fused = "qkv_einsum" if family == "gemma" else "kv_einsum"
    assert imported_config.rank_for(f"layers/0/attn/{fused}/w") == 2 * (
        3 if family == "gemma" else 2
    )
    assert imported_config.scale_for(f"layers/0/attn/{fused}/w") == 2.0


def _assert_projections_agree(peft_model, merged):
    """Each torch projection (with PEFT's LoRA) against ``x @ W.T`` of the merged tunix weights."""
    rng = np.random.default_rng(0)
    for name, weight in hf_twins.gemma_projections(merged).items():
        x = rng.standard_normal((3, weight.shape[1]), np.float32)
        with torch.no_grad():
            got = peft_model.base_model.model.get_submodule(name)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, x @ weight.T, atol=TOLERANCE, err_msg=name)


# ---------------------------------------------------------------------------- convolutions

CONV_NOISE = 0.3  # the conv net's logits are ~0.2: its adapters must move them visibly
CONV_CONFIG = jaxlora.LoraConfig(rank=2, alpha=4, targets=["conv1", "conv2", "head"])
# linen's nn.Conv kernel (h, w, in, out) looks like a DenseGeneral's: the map names the
# convolutions. NNX's nnx.Conv is recognised by type.
CONV_MAPS = {
    "linen": jaxlora.peft_module_map(convs=("conv1", "conv2")),
    "nnx": jaxlora.peft_module_map(),
}


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    return conv_twins.TorchConvNet().eval()


class _Conv:
    """The flax twin of the conv net, linen or NNX, behind one interface."""

    def __init__(self, kind, torch_model):
        self.kind, self.x = kind, conv_twins.images()
        self.map = CONV_MAPS[kind]
        if kind == "linen":
            self.base = conv_twins.linen_params(torch_model)
        else:
            self.base = conv_twins.nnx_module(torch_model)

    def adapt(self):
        if self.kind == "nnx":
            adapted = jaxlora.lorafy(nnx.clone(self.base), CONV_CONFIG, self.x, rngs=nnx.Rngs(0))
            return _noised(adapted, scale=CONV_NOISE)
        _, params = jaxlora.lorafy(
            conv_twins.ConvNet(), self.base, CONV_CONFIG, self.x, key=jax.random.key(0)
        )
        trainable, frozen = jaxlora.split(params)
        leaves, treedef = jax.tree.flatten(trainable)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        moved = [
            x + CONV_NOISE * jax.random.normal(k, x.shape)
            for k, x in zip(keys, leaves, strict=True)
        ]
        return jaxlora.combine(jax.tree.unflatten(treedef, moved), frozen)

    def logits(self, adapted, config=CONV_CONFIG):
        if self.kind == "nnx":
            return np.asarray(adapted(self.x))
        return np.asarray(
            jaxlora.LoraModel(conv_twins.ConvNet(), config).apply({"params": adapted}, self.x)
        )

    def import_peft(self, directory):
        inputs = (self.x,) if self.kind == "nnx" else ()
        return jaxlora.import_peft(directory, self.base, *inputs, module_map=self.map)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_conv_lora_matches_peft_conv2d_both_ways(tmp_path, convnet, kind):
    conv = _Conv(kind, convnet)
    adapted = conv.adapt()
    jaxlora.export_peft(tmp_path / "out", adapted, CONV_CONFIG, module_map=conv.map)
    with _safe_open(tmp_path / "out") as f:  # A: a conv with r outputs; B: a 1x1 conv
        assert f.get_slice(_key("conv2", "A")).get_shape() == [2, conv_twins.WIDTH, 3, 3]
        assert f.get_slice(_key("conv2", "B")).get_shape() == [conv_twins.WIDTH, 2, 1, 1]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(convnet), tmp_path / "out").eval()
    want = conv.logits(adapted)
    assert np.abs(want - conv_twins.torch_logits(convnet, conv.x)).max() > MOVED
    assert np.abs(conv_twins.torch_logits(loaded, conv.x) - want).max() <= TOLERANCE

    peft_model = _peft_trained(
        convnet,
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2"]),
        scale=CONV_NOISE,
    )
    directory = _save(peft_model, tmp_path / "peft")
    config, imported = conv.import_peft(directory)
    want = conv_twins.torch_logits(peft_model, conv.x)
    assert np.abs(want - conv_twins.torch_logits(convnet, conv.x)).max() > MOVED
    assert np.abs(conv.logits(imported, config) - want).max() <= TOLERANCE


# ------------------------------------------------------------ linen einsum weights, errors


class _Heads(nn.Module):
    """Attention-shaped projections as bare params, like tunix's and gemma's Einsum modules."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.3)
        h = jnp.einsum("btd,dnh->btnh", x, self.param("w", init, (8, 2, 4)))
        return jnp.einsum("btnh,nhd->btd", h, self.param("o", init, (2, 4, 8)))


class _TorchHeads(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.q = torch.nn.Linear(8, 8, bias=False)
        self.o = torch.nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.q.weight.copy_(torch.from_numpy(np.array(params["w"]).reshape(8, 8).T))
            self.o.weight.copy_(torch.from_numpy(np.array(params["o"]).reshape(8, 8).T))

    def forward(self, x):
        return self.o(self.q(x))


def test_linen_einsum_weights_both_ways(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 8), np.float32)
    params = _Heads().init(jax.random.key(0), x)["params"]
    twin = _TorchHeads(params).eval()
    module_map = {"w": "q", "o": "o"}.get
    config = jaxlora.LoraConfig(rank=2, alpha=4, targets=["w", "o"])
    lora_model, adapted = jaxlora.lorafy(_Heads(), params, config, x, key=jax.random.key(1))
    adapted = _moved(adapted, 0.3)
    jaxlora.export_peft(tmp_path / "out", adapted, config, module_map=module_map)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "out").eval()
    with torch.no_grad():
        got = loaded(torch.from_numpy(x)).numpy()
    want = np.asarray(lora_model.apply({"params": adapted}, x))
    assert np.abs(want - np.asarray(_Heads().apply({"params": params}, x))).max() > MOVED
    assert np.abs(got - want).max() <= TOLERANCE

    # Which axes of w meet the input is only known from the model: the base params cannot say.
    with pytest.raises(ValueError, match=r"adapts 'o' \(2, 4, 8\).*Adapt the params first"):
        jaxlora.import_peft(tmp_path / "out", params, module_map=module_map)
    any_rank = jaxlora.LoraConfig(rank=1, targets=["w", "o"])
    _, layout_only = jaxlora.lorafy(_Heads(), params, any_rank, x, key=jax.random.key(2))
    _, imported = jaxlora.import_peft(tmp_path / "out", layout_only, module_map=module_map)
    chex.assert_trees_all_equal(imported, adapted)

    peft_model = _peft_trained(twin, peft.LoraConfig(r=3, target_modules=["q", "o"]), 0.3)
    config, imported = jaxlora.import_peft(
        _save(peft_model, tmp_path / "peft"), layout_only, module_map=module_map
    )
    with torch.no_grad():
        want = peft_model(torch.from_numpy(x)).numpy()
    got = jaxlora.LoraModel(_Heads(), config).apply({"params": imported}, x)
    assert np.abs(np.asarray(got) - want).max() <= TOLERANCE


def test_partly_adapted_fused_torch_weight_is_refused(tmp_path, qwen3_moe):
    built, _ = qwen3_moe
    config = jaxlora.LoraConfig(rank=2, targets=["gate_proj"])
    module = jaxlora.lorafy(nnx.clone(built.module), config, *built.inputs, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"'model.layers.0.mlp.experts.gate_up_proj' fuses .*"
        r"'layers/0/mlp/up_proj'.*target all of them or none",
    ):
        jaxlora.export_peft(tmp_path / "out", module, config, module_map=MOE_MAP)
    dropout = jaxlora.LoraConfig(rank=2, targets=["down_proj"], dropout=0.1)
    module = jaxlora.lorafy(nnx.clone(built.module), dropout, *built.inputs, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"lora_dropout on target_parameters.*dropout=0.0"):
        jaxlora.export_peft(tmp_path / "out", module, dropout, module_map=MOE_MAP)
    assert not (tmp_path / "out").exists()


def test_splitting_a_weight_along_an_input_axis_is_refused(tmp_path, llama):
    built, _ = llama
    config = jaxlora.LoraConfig(rank=2, targets=["o_proj"])
    module = jaxlora.lorafy(nnx.clone(built.module), config, *built.inputs, rngs=nnx.Rngs(0))

    # o_proj (heads, head_dim, d) contracts its heads axis: it is no stack of torch modules.
    def heads(path):
        return tuple(f"{path}.head{i}" for i in range(zoo.HEADS))

    with pytest.raises(
        ValueError,
        match=r"'layers/0/attn/o_proj/w'.*first axis must be an "
        r"output axis of size 4",
    ):
        jaxlora.export_peft(tmp_path / "out", module, config, module_map=heads)


def test_nnx_import_needs_a_base_module_and_inputs(tmp_path, llama):
    built, _ = llama
    config = jaxlora.LoraConfig(rank=2, targets=["q_proj"])
    module = _adapted(built, config)
    module_map = jaxlora.peft_module_maps["tunix-llama3"]
    jaxlora.export_peft(tmp_path / "out", module, config, module_map=module_map)
    with pytest.raises(ValueError, match="already holds LoRA layers; import into the base"):
        jaxlora.import_peft(tmp_path / "out", module, *built.inputs, module_map=module_map)
    with (
        pytest.warns(UserWarning, match="not examined"),
        pytest.raises(ValueError, match=r"pass example inputs of its __call__"),
    ):
        jaxlora.import_peft(tmp_path / "out", built.module, module_map=module_map)
