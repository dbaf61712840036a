"""DoRA (``LoraConfig(use_dora=True)``) against real PEFT (torch CPU) and its own definition."""

import copy
import dataclasses
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import safetensors.numpy
import torch
from flax import nnx

import jaxlora
from tests.support import conv_twins, models, peft_models
from tests.support.steps import compiled_dot_shapes, full_finetune_step, moved
from tests.test_custom_layers import Block as CustomBlock
from tests.test_custom_layers import Experts as CustomExperts
from tests.test_custom_layers import Scanned as CustomScanned

KEY = jax.random.key(0)
IDS = peft_models.ids()
TOLERANCE = 1e-5
TARGETS = ["q_proj", "v_proj", "embed"]
CFG = jaxlora.LoraConfig(rank=4, alpha=8, targets=TARGETS, use_dora=True)
LOSS_WEIGHTS = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
MODULE_MAP = jaxlora.peft_module_map()
LINEAR = [f"layers_{i}/{n}" for i in range(peft_models.LAYERS) for n in ("q_proj", "v_proj")]


def _layer(params, path):
    for key in path.split("/"):
        params = params[key]
    return params


def _nnx_keys(path):
    """``"layers_1/q_proj"`` -> ``("layers", 1, "q_proj")``: where `nnx_net` holds a layer."""
    keys = []
    for part in path.split("/"):
        keys += ["layers", int(part[len("layers_") :])] if part.startswith("layers_") else [part]
    return keys


def _nnx_layer(module, path):
    for key in _nnx_keys(path):
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def _torch_name(path):
    return "base_model.model." + path.replace("layers_", "layers.").replace("/", ".")


def _peft_copy(torch_base, lora_params, **config):
    """A PEFT DoRA model on a copy of ``torch_base`` holding ``lora_params``' adapters."""
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, **config)
    model = peft.get_peft_model(copy.deepcopy(torch_base), pc)
    state = {}
    for path in LINEAR:
        adapter = _layer(lora_params, path)["lora"]
        name = _torch_name(path)
        state[f"{name}.lora_A.default.weight"] = adapter.a.T
        state[f"{name}.lora_B.default.weight"] = adapter.b.T
        state[f"{name}.lora_magnitude_vector.default.weight"] = adapter.magnitude
    embed = lora_params["embed"]["lora"]
    state["base_model.model.embed.lora_embedding_A.default"] = embed.a.T
    state["base_model.model.embed.lora_embedding_B.default"] = embed.b.T
    state["base_model.model.embed.lora_magnitude_vector.default.weight"] = embed.magnitude
    state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    assert not model.load_state_dict(state, strict=False).unexpected_keys
    return model


def _torch_grads(model, ids=IDS):
    """Gradients of ``sum(logits * LOSS_WEIGHTS)`` by PEFT parameter name."""
    model.zero_grad()
    (model(torch.from_numpy(ids)) * torch.from_numpy(LOSS_WEIGHTS)).sum().backward()
    return {n: p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_match(grads_of, torch_grads):
    """``grads_of(path)`` gives jaxlora's ``(dA, dB, dm)`` of one adapted layer."""
    for path in [*LINEAR, "embed"]:
        da, db, dm = (np.asarray(g) for g in grads_of(path))
        name = _torch_name(path)
        if path == "embed":
            want_a = torch_grads[f"{name}.lora_embedding_A.default"]
            want_b = torch_grads[f"{name}.lora_embedding_B.default"]
        else:
            want_a = torch_grads[f"{name}.lora_A.default.weight"]
            want_b = torch_grads[f"{name}.lora_B.default.weight"]
        want_m = torch_grads[f"{name}.lora_magnitude_vector.default.weight"]
        np.testing.assert_allclose(da.T, want_a, rtol=0, atol=TOLERANCE, err_msg=path)
        np.testing.assert_allclose(db.T, want_b, rtol=0, atol=TOLERANCE, err_msg=path)
        np.testing.assert_allclose(dm, want_m, rtol=0, atol=TOLERANCE, err_msg=path)
        assert np.abs(want_m).max() > 1e-3  # the magnitude's gradient is not trivially zero


@pytest.fixture(scope="module")
def trained(base_params):
    """``Net`` adapted with DoRA, every trainable leaf moved off its initial value."""
    return peft_models.lorafied_and_moved(base_params, CFG, KEY)


def test_at_init_the_magnitude_is_the_column_norm_and_the_model_is_the_base(base_params):
    _, lora_params = jaxlora.lorafy(peft_models.Net(), base_params, CFG, IDS, key=KEY)
    q = lora_params["layers_0"]["q_proj"]
    chex.assert_trees_all_close(q["lora"].magnitude, jnp.linalg.norm(q["kernel"], axis=0))
    embed = lora_params["embed"]
    chex.assert_trees_all_close(
        embed["lora"].magnitude, jnp.linalg.norm(embed["embedding"], axis=0)
    )
    base = peft_models.Net().apply({"params": base_params}, IDS)
    adapted = peft_models.jax_logits(CFG, lora_params, IDS)
    np.testing.assert_allclose(adapted, base, rtol=0, atol=1e-6)


def test_linen_outputs_and_gradients_match_peft(torch_base, trained):
    peft_model = _peft_copy(torch_base, trained).eval()
    peft_models.assert_same_logits(peft_model, CFG, trained, IDS, TOLERANCE)
    moved = peft_models.torch_logits(peft_model, IDS) - peft_models.torch_logits(torch_base, IDS)
    assert np.abs(moved).max() > 0.05  # DoRA moved the logits by far more than TOLERANCE
    lora_model = jaxlora.LoraModel(peft_models.Net(), CFG)

    def loss(trainable, frozen):
        logits = lora_model.apply({"params": jaxlora.combine(trainable, frozen)}, IDS)
        return jnp.sum(logits * LOSS_WEIGHTS)

    trainable, frozen = jaxlora.split(trained)
    grads = jax.grad(loss)(trainable, frozen)

    def grads_of(path):
        adapter = _layer(grads, path)["lora"]
        return adapter.a, adapter.b, adapter.magnitude

    _assert_grads_match(grads_of, _torch_grads(peft_model))


def test_nnx_outputs_and_gradients_match_peft(torch_base, base_params, trained):
    module = jaxlora.lorafy(peft_models.nnx_net(torch_base), CFG, rngs=nnx.Rngs(0))
    for path in [*LINEAR, "embed"]:
        layer, adapter = _nnx_layer(module, path), _layer(trained, path)["lora"]
        layer.lora_a[...], layer.lora_b[...] = adapter.a, adapter.b
        layer.lora_magnitude[...] = adapter.magnitude
    peft_model = _peft_copy(torch_base, trained).eval()
    got = np.asarray(module(IDS))
    np.testing.assert_allclose(
        got, peft_models.torch_logits(peft_model, IDS), rtol=0, atol=TOLERANCE
    )

    def loss(module):
        return jnp.sum(module(IDS) * LOSS_WEIGHTS)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, jaxlora.LoraParam))(module)

    def grads_of(path):
        node = grads
        for key in _nnx_keys(path):
            node = node[key]
        return node["lora_a"][...], node["lora_b"][...], node["lora_magnitude"][...]

    _assert_grads_match(grads_of, _torch_grads(peft_model))


class _TorchProj(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(peft_models.WIDTH, peft_models.WIDTH)

    def forward(self, x):
        return self.proj(x)


class _Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(peft_models.WIDTH, name="proj")(x)


class _FixedDropout(torch.nn.Module):
    """Dropout with a given mask: PEFT's ``lora_dropout`` with jaxlora's random draw."""

    def __init__(self, keep, rate):
        super().__init__()
        self.keep, self.rate = torch.from_numpy(keep), rate

    def forward(self, x):
        return x * self.keep / (1.0 - self.rate)


def test_lora_dropout_as_peft_applies_it():
    """PEFT's DoRA with dropout: ``y + (g - 1) · W drop(x) + g · s · B A drop(x)``."""
    torch.manual_seed(0)
    torch_model = _TorchProj()
    w, bias = (p.detach().numpy() for p in (torch_model.proj.weight, torch_model.proj.bias))
    params = {"proj": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(bias)}}
    x = np.random.default_rng(0).normal(size=(4, 5, peft_models.WIDTH)).astype(np.float32)
    cfg = jaxlora.LoraConfig(rank=4, alpha=8, targets=["proj"], dropout=0.3, use_dora=True)
    lora_model, lora_params = jaxlora.lorafy(_Proj(), params, cfg, x, key=KEY)
    trainable, frozen = jaxlora.split(lora_params)
    keys = iter(jax.random.split(jax.random.key(1), 3))
    trainable = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape), trainable)
    rngs = {"dropout": jax.random.key(7)}

    def apply(trainable):
        params = jaxlora.combine(trainable, frozen)
        return lora_model.apply({"params": params}, x, rngs=rngs)

    # jaxlora's mask, through the public API: with B = 0 and m = 2·‖W‖ (g = 2) the output
    # is x W + bias + drop(x) W
    probe = jax.tree.map(lambda v: v, trainable)
    adapter = probe["proj"]["lora"]
    probe["proj"]["lora"] = jaxlora.LoraAdapter(
        adapter.a, 0 * adapter.b, adapter.scale, adapter.delta_eq, 2 * jnp.linalg.norm(w.T, axis=0)
    )
    dropped = (np.asarray(apply(probe)) - x @ w.T - bias) @ np.linalg.inv(w.T)
    keep = ~np.isclose(dropped, 0.0, atol=1e-4)
    assert 0.5 < keep.mean() < 0.9  # rate 0.3

    adapter = trainable["proj"]["lora"]
    pc = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.3, use_dora=True
    )
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), pc)
    state = {
        "base_model.model.proj.lora_A.default.weight": adapter.a.T,
        "base_model.model.proj.lora_B.default.weight": adapter.b.T,
        "base_model.model.proj.lora_magnitude_vector.default.weight": adapter.magnitude,
    }
    state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    assert not peft_model.load_state_dict(state, strict=False).unexpected_keys
    peft_model.base_model.model.proj.lora_dropout["default"] = _FixedDropout(keep, 0.3)
    peft_model.train()
    want = peft_model(torch.from_numpy(x))
    np.testing.assert_allclose(apply(trainable), want.detach().numpy(), rtol=0, atol=TOLERANCE)
    # dropout is on: the same adapter without it gives other outputs
    eval_mode = lora_model.apply({"params": jaxlora.combine(trainable, frozen)}, x)
    assert np.abs(np.asarray(apply(trainable)) - np.asarray(eval_mode)).max() > 0.05

    weights = np.random.default_rng(1).normal(size=want.shape).astype(np.float32)
    (want * torch.from_numpy(weights)).sum().backward()
    grads = jax.grad(lambda t: jnp.sum(apply(t) * weights))(trainable)["proj"]["lora"]
    lora = peft_model.base_model.model.proj
    for got, param in (
        (grads.a.T, lora.lora_A["default"].weight),
        (grads.b.T, lora.lora_B["default"].weight),
        (grads.magnitude, lora.lora_magnitude_vector["default"].weight),
    ):
        np.testing.assert_allclose(got, param.grad.numpy(), rtol=0, atol=TOLERANCE)


def _moved(params, scale=0.1):
    return moved(params, scale)


class _TiedLm(nn.Module):
    """A table looked up and used transposed as the head, and a reshaped, transposed weight."""

    @nn.compact
    def __call__(self, ids):
        table = self.param("table", nn.initializers.normal(), (40, 16))
        w = self.param("proj", nn.initializers.normal(), (2, 8, 16))
        x = table[ids]
        x = x + x @ w.reshape(16, 16).T
        return x @ table.T


class _Heads(nn.Module):
    """DenseGeneral to heads and back: several output axes, then several input axes."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 8), name="split")(x)
        return nn.DenseGeneral(16, axis=(-2, -1), name="merge")(jnp.tanh(h))


_X = jax.random.normal(jax.random.key(1), (2, 5, 16))
_CUSTOM = {
    "dense_general": (_Heads(), _X, "all-linear"),
    "einsum": (CustomBlock(), _X, "all-linear"),
    "scan_axis_1": (CustomScanned(), _X, "all-linear"),
    "nn_scan_remat": (
        models.ScannedLM(),
        jnp.arange(10).reshape(2, 5),
        ["embed", "query", "up"],
    ),
    "tied_reshaped": (_TiedLm(), jnp.arange(10).reshape(2, 5), ["table", "proj"]),
}


@pytest.mark.parametrize("name", list(_CUSTOM))
def test_custom_weights_identity_merge_unmerge_and_magnitude_is_the_merged_norm(name):
    """Einsum kernels (several input or output axes), sliced, scanned, jitted, tied and
    reshaped weights: identity at init, the merged model is the adapted one, unmerge
    restores, and each merged weight's norm over its input axes is |magnitude|."""
    model, x, targets = _CUSTOM[name]
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=targets, use_dora=True)
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, x, key=KEY)
    base = model.apply({"params": params}, x)
    chex.assert_trees_all_close(lora_model.apply({"params": lora_params}, x), base, atol=1e-5)
    p = _moved(lora_params)
    adapted = lora_model.apply({"params": p}, x)
    assert float(jnp.abs(adapted - base).max()) > 100 * TOLERANCE  # the adapters moved it
    merged = jaxlora.merge(p, jnp.float32)
    chex.assert_trees_all_close(model.apply({"params": merged}, x), adapted, atol=TOLERANCE)
    restored = jaxlora.unmerge(merged, p)
    chex.assert_trees_all_close(restored, p, atol=TOLERANCE)
    for row in jaxlora.summary(p).layers:
        adapter, _ = _adapter_and_weight(p, row.path)
        _, weight = _adapter_and_weight(merged, row.path)
        chex.assert_trees_all_close(
            _norm_over_inputs(weight, adapter.delta_eq), jnp.abs(adapter.magnitude), atol=TOLERANCE
        )


def _adapter_and_weight(params, name):
    """The adapter named ``name`` (a layer's path, or a weight's) and its weight (None when
    ``params`` are merged)."""
    node = _layer(params, name)
    if isinstance(node, dict):
        weight = "embedding" if "embedding" in node else "kernel"
        return node.get("lora"), node[weight]
    module, _, weight = name.rpartition("/")
    node = _layer(params, module) if module else params
    return node.get(f"lora_{weight}"), node[weight]


def _norm_over_inputs(weight, delta_eq):
    """DoRA's definition: the norm over the weight's input axes (A's side only), laid out
    like the magnitude (B's axes without the rank)."""
    (a, b), kernel = (
        delta_eq.replace("...", "").split("->")[0].split(","),
        delta_eq[-len(delta_eq.split("->...")[1]) :],
    )
    ins = [c for c in kernel if c in a and c not in b]
    lead = weight.ndim - len(kernel)
    norm = jnp.sqrt(jnp.sum(weight**2, axis=tuple(lead + kernel.index(c) for c in ins)))
    kept = "".join(c for c in kernel if c not in ins)
    rank = next(c for c in a if c in b and c not in kernel)
    return jnp.einsum(f"...{kept}->...{b.replace(rank, '')}", norm)


def test_nnx_layers_identity_merge_unmerge():
    """Linear, LinearGeneral, Einsum and Embed (looked up and ``attend``-ed) with DoRA."""
    ids = jnp.arange(10).reshape(2, 5) % 32
    module = models.NnxModel(nnx.Rngs(0))
    base = module(ids)
    cfg = jaxlora.LoraConfig(
        rank=2, targets=["layers/*", "split_heads", "merge_heads", "embed"], use_dora=True
    )
    jaxlora.lorafy(module, cfg, rngs=nnx.Rngs(0))
    chex.assert_trees_all_close(module(ids), base, atol=1e-6)
    state = nnx.state(module, jaxlora.LoraParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    moved = [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(module, jax.tree.unflatten(treedef, moved))
    adapted = module(ids)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(adapted, base, strict=True)) > 1e-2
    merged = jaxlora.merge(module, jnp.float32)
    chex.assert_trees_all_close(merged(ids), adapted, atol=TOLERANCE)
    restored = jaxlora.unmerge(merged, module)
    chex.assert_trees_all_close(nnx.state(restored), nnx.state(module), atol=TOLERANCE)


def _mlp(**config):
    model = models.MLP(features=(96, 160, 48))
    x = jax.random.normal(KEY, (40, 96))
    y = jax.random.normal(jax.random.key(1), (40, 48))
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=8, alpha=16, use_dora=True, **config)
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, x, key=KEY)

    def loss(p, batch):
        return jnp.mean((lora_model.apply({"params": p}, batch[0]) - batch[1]) ** 2)

    return model, params, cfg, lora_params, (x, y), loss


def test_no_weight_gradient_in_the_compiled_step_and_the_magnitude_trains(tmp_path):
    """The norm needs W but gives it no gradient: no dot of a frozen weight's shape."""
    model, params, cfg, lora_params, batch, loss = _mlp()
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(loss, tx, donate=False)
    frozen_shapes = {w.shape for w in jax.tree.leaves(params) if w.ndim == 2}
    state = tx.init(lora_params)
    assert not compiled_dot_shapes(step, lora_params, state, batch) & frozen_shapes
    full_tx = optax.adam(1e-2)
    full = full_finetune_step(
        lambda p, b: jnp.mean((model.apply({"params": p}, b[0]) - b[1]) ** 2), full_tx
    )
    assert compiled_dot_shapes(full, params, full_tx.init(params), batch) & frozen_shapes
    # the magnitude is an adapter leaf: in the mask, in the optimizer state, and it moves
    mask = jaxlora.trainable_mask(lora_params)
    assert all(jax.tree.leaves(mask["dense_0"]["lora"]))
    magnitudes = [x.shape for x in jax.tree.leaves(state) if x.shape == (160,)]
    assert len(magnitudes) == 2  # Adam's two moments of dense_1's magnitude
    p = lora_params
    for _ in range(3):
        p, state, _ = step(p, state, batch)
    assert (
        float(
            jnp.abs(p["dense_1"]["lora"].magnitude - lora_params["dense_1"]["lora"].magnitude).max()
        )
        > 1e-3
    )
    # saved with the adapter and restored exactly
    jaxlora.save_adapter(tmp_path / "adapter", p, cfg)
    loaded_cfg, loaded = jaxlora.load_adapter(tmp_path / "adapter", params)
    assert loaded_cfg.use_dora
    chex.assert_trees_all_equal(loaded, p)
    assert jaxlora.summary(p).layers[0].params == 8 * (96 + 96) + 96  # A, B, magnitude


def test_refusals_name_the_layer_and_the_reason():
    x = jnp.asarray(conv_twins.images())
    conv = conv_twins.ConvNet()
    params = conv.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["conv1", "head"], use_dora=True)
    with pytest.raises(ValueError, match=r"'conv1'.*convolution kernel.*use_dora=False"):
        jaxlora.lorafy(conv, params, cfg, x, key=KEY)
    experts = CustomExperts()
    params = experts.init(KEY, _X)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["experts"], use_dora=True)
    with pytest.raises(ValueError, match=r"'experts'.*ragged_dot.*target_parameters"):
        jaxlora.lorafy(experts, params, cfg, _X, key=KEY)
    with pytest.raises(ValueError, match="use_dora=True with quantize='nf4'"):
        jaxlora.LoraConfig(use_dora=True, quantize="nf4")
    model, params, cfg, lora_params, (x, _), _ = _mlp()
    stored = {**params, "dense_1": {**params["dense_1"]}}  # a base already quantized (GGUF)
    stored["dense_1"]["kernel"] = jaxlora.quantize(params["dense_1"]["kernel"], "int8", (0,))
    with pytest.raises(ValueError, match=r"'dense_1': it is stored quantized.*use_dora=False"):
        jaxlora.lorafy(model, stored, cfg, x, key=KEY)
    with pytest.raises(ValueError, match=r"DoRA adapters .* cannot join a bank"):
        jaxlora.AdapterBank(params).add("a", lora_params, cfg)
    with pytest.raises(ValueError, match="is a DoRA adapter but the config has use_dora=False"):
        jaxlora.save_adapter("unused", lora_params, dataclasses.replace(cfg, use_dora=False))


def test_peft_dora_adapters_both_ways(tmp_path, torch_base, base_params, trained):
    """PEFT's DoRA files (``lora_magnitude_vector``, ``use_dora: true``) into jaxlora, linen
    and NNX, and jaxlora's DoRA adapters into PEFT, with the same logits."""
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    peft_model = peft.get_peft_model(copy.deepcopy(torch_base), pc)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "peft")
    want = peft_models.torch_logits(peft_model.eval(), IDS)
    cfg, params = jaxlora.import_peft(tmp_path / "peft", base_params, module_map=MODULE_MAP)
    assert cfg.use_dora
    np.testing.assert_allclose(peft_models.jax_logits(cfg, params, IDS), want, atol=TOLERANCE)
    _, module = jaxlora.import_peft(
        tmp_path / "peft", peft_models.nnx_net(torch_base), module_map=MODULE_MAP
    )
    np.testing.assert_allclose(np.asarray(module(IDS)), want, rtol=0, atol=TOLERANCE)

    jaxlora.export_peft(tmp_path / "ours", trained, CFG, module_map=MODULE_MAP)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["use_dora"] is True
    tensors = safetensors.numpy.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tensors["base_model.model.layers.0.q_proj.lora_magnitude_vector"].shape == (8,)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), tmp_path / "ours")
    got = peft_models.torch_logits(loaded.eval(), IDS)
    np.testing.assert_allclose(got, peft_models.jax_logits(CFG, trained, IDS), atol=TOLERANCE)
    # and back, bitwise
    _, again = jaxlora.import_peft(tmp_path / "ours", base_params, module_map=MODULE_MAP)
    chex.assert_trees_all_equal(
        jax.tree.leaves(jaxlora.split(again)[0]), jax.tree.leaves(jaxlora.split(trained)[0])
    )


def test_peft_variants_still_unsupported_are_refused_by_name(tmp_path, trained):
    jaxlora.export_peft(tmp_path / "ours", trained, CFG, module_map=MODULE_MAP)
    config_file = tmp_path / "ours" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_qalora": True}))
    with pytest.raises(ValueError, match="use_qalora"):
        jaxlora.import_peft(tmp_path / "ours", trained, module_map=MODULE_MAP)
    config_file.write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(ValueError, match=r"has a lora_magnitude_vector.*use_dora=False"):
        jaxlora.import_peft(tmp_path / "ours", trained, module_map=MODULE_MAP)


def test_magnitude_is_placed_like_b_without_its_rank(tmp_path):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = models.MLP(features=(64, 64, 32))
    x = jax.random.normal(KEY, (8, 64))
    params = model.init(KEY, x)["params"]
    params = jaxlora.shard_params(
        params, mesh, [("kernel", jax.sharding.PartitionSpec("data", "model"))]
    )
    cfg = jaxlora.LoraConfig(rank=4, use_dora=True)
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, x, key=KEY)
    P = jax.sharding.PartitionSpec
    assert lora_params["dense_0"]["lora"].b.sharding.spec == P(None, "model")
    assert lora_params["dense_0"]["lora"].magnitude.sharding.spec == P("model")
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", params)
    assert loaded["dense_0"]["lora"].magnitude.sharding.spec == P("model")
    chex.assert_trees_all_close(
        jax.jit(lora_model.apply)({"params": loaded}, x),
        model.apply({"params": params}, x),
        atol=1e-5,
    )
