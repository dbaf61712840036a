"""lorafy on linen models nobody here wrote: layer coverage, math, apply arguments, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from tests.support import models

KEY = jax.random.key(0)
IDS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64


def _set_b(params, value=0.05):
    """Adapted params with every B (and trained leaf) shifted, so adapters do something."""
    trainable, frozen = jaxlora.split(params)
    trainable = jax.tree.map(lambda x: x + jnp.asarray(value, x.dtype), trainable)
    return jaxlora.combine(trainable, frozen)


@pytest.fixture(scope="module")
def tiny_lm():
    model = models.TinyLM()
    return model, model.init(KEY, IDS)["params"]


def test_identity_at_init_is_bit_exact(tiny_lm):
    model, params = tiny_lm
    cfg = jaxlora.LoraConfig(rank=4, targets=["all-linear", "embed"])
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    chex.assert_trees_all_equal(
        model.apply({"params": params}, IDS), lora_model.apply({"params": lora_params}, IDS)
    )


def test_finds_every_layer_kind_and_reports_it(tiny_lm):
    model, params = tiny_lm
    cfg = jaxlora.LoraConfig(rank=4, targets=["all-linear", "embed"])
    _, lora_params = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    report = jaxlora.summary(lora_params)
    paths = [layer.path for layer in report.layers]
    assert "embed" in paths
    for name in ("query", "key", "value", "out"):
        assert f"block_1/attn/{name}" in paths
    assert "block_0/up" in paths and "block_0/down" in paths
    assert len(paths) == 1 + 2 * 6
    adapter_params = sum(layer.params for layer in report.layers)
    assert report.trainable_params == adapter_params
    base = sum(x.size for x in jax.tree.leaves(params))
    assert report.total_params == base + adapter_params
    text = str(report)
    assert "block_*/attn/query  2      (32, 32)   (32, 4)   (4, 32)   4  4      512" in text
    assert "trainable params: 4,992 || all params: 32,768 || trainable%: 15.2344" in text
    assert all(line == line.rstrip() for line in text.splitlines())


def test_summary_groups_layers_by_pattern_with_counts(tiny_lm):
    model, params = tiny_lm
    cfg = jaxlora.LoraConfig(rank=4, targets=["query", "up"], rank_pattern={"block_1/up": 2})
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    report = jaxlora.summary(lora_params, lora_model)
    assert [layer.path for layer in report.layers] == [  # the rows themselves stay per layer
        "block_0/attn/query",
        "block_0/up",
        "block_1/attn/query",
        "block_1/up",
    ]
    assert str(report).splitlines()[:4] == [
        "layer               count  kernel     A        B         r  scale  params",
        "block_*/attn/query  2      (32, 32)   (32, 4)  (4, 32)   4  4      512",
        "block_0/up          1      (32, 128)  (32, 4)  (4, 128)  4  4      640",
        "block_1/up          1      (32, 128)  (32, 2)  (2, 128)  2  8      320",
    ]
    assert "  block_*/attn/key: not targeted (2 layers)" in str(report).splitlines()


def test_adapter_delta_matches_the_formula():
    model = nn.Dense(6)
    x = jax.random.normal(KEY, (3, 5, 4))
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=2, alpha=3.0, targets=["re:.*"], rslora=True)
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, x, key=KEY)
    adapter = lora_params["lora"]
    b = jax.random.normal(jax.random.key(1), adapter.b.shape)
    lora_params = {**lora_params, "lora": jaxlora.LoraAdapter(adapter.a, b, **_static(adapter))}
    expected = x @ params["kernel"] + params["bias"] + (3.0 / np.sqrt(2)) * (x @ adapter.a @ b)
    chex.assert_trees_all_close(
        lora_model.apply({"params": lora_params}, x), expected, rtol=1e-5, atol=1e-5
    )


def _static(adapter):
    return {"scale": adapter.scale, "delta_eq": adapter.delta_eq}


def test_kaiming_and_gaussian_init():
    model = nn.Dense(64)
    x = jnp.ones((1, 256))
    params = model.init(KEY, x)["params"]
    for init, bound in (("kaiming", 1 / 16), ("gaussian", None)):
        cfg = jaxlora.LoraConfig(rank=8, targets=["re:.*"], init=init)
        _, lp = jaxlora.lorafy(model, params, cfg, x, key=KEY)
        a, b = lp["lora"].a, lp["lora"].b
        assert a.shape == (256, 8) and b.shape == (8, 64)
        assert not b.any()
        if bound is not None:
            assert float(jnp.abs(a).max()) <= bound
            assert float(jnp.abs(a).max()) > 0.9 * bound
        else:
            assert float(a.std()) == pytest.approx(1 / 8, rel=0.1)


def test_layers_differ_per_path(tiny_lm):
    model, params = tiny_lm
    cfg = jaxlora.LoraConfig(rank=4, targets=["query"])
    _, lp = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    a0 = lp["block_0"]["attn"]["query"]["lora"].a
    a1 = lp["block_1"]["attn"]["query"]["lora"].a
    assert not jnp.allclose(a0, a1)


def test_flax_attention_densegeneral_einsum_and_apply_arguments():
    model = models.FlaxAttentionModel()
    x = jax.random.normal(KEY, (2, 5, 16))
    variables = model.init(KEY, x)
    cfg = jaxlora.LoraConfig(rank=2, targets="all-linear")
    lora_model, lora_vars = jaxlora.lorafy(model, variables, cfg, x, key=KEY)
    assert set(lora_vars) == {"params", "batch_stats"}
    paths = {layer.path for layer in jaxlora.summary(lora_vars).layers}
    assert paths == {"mha/query", "mha/key", "mha/value", "mha/out", "proj", "merge_heads"}
    layers = {layer.path: layer for layer in jaxlora.summary(lora_vars).layers}
    assert layers["mha/query"].a_shape == (16, 2) and layers["mha/query"].b_shape == (2, 2, 8)
    assert layers["mha/out"].a_shape == (2, 8, 2) and layers["mha/out"].b_shape == (2, 16)
    assert layers["proj"].a_shape == (16, 2) and layers["proj"].b_shape == (2, 2, 8)

    lora_vars = _set_b(lora_vars)
    # mutable collections come back exactly as model.apply returns them
    y, updates = lora_model.apply(lora_vars, x, train=True, mutable=["batch_stats"])
    merged = jaxlora.merge(lora_vars)
    y_ref, updates_ref = model.apply(merged, x, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(updates, updates_ref, rtol=1e-5, atol=1e-5)
    # method= is passed through
    chex.assert_trees_all_close(
        lora_model.apply(lora_vars, x, method=models.FlaxAttentionModel.embed_only),
        model.apply(merged, x, method=models.FlaxAttentionModel.embed_only),
        rtol=1e-5,
        atol=1e-5,
    )


def test_scan_and_remat_layers_get_stacked_adapters():
    model = models.ScannedLM()
    params = model.init(KEY, IDS)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["*/attn/*", "up"])
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    layers = {layer.path: layer for layer in jaxlora.summary(lora_params).layers}
    assert set(layers) == {
        f"layers/block/{p}" for p in ("attn/query", "attn/key", "attn/value", "attn/out", "up")
    }
    assert layers["layers/block/up"].a_shape == (3, 32, 2)
    assert layers["layers/block/up"].b_shape == (3, 2, 128)
    chex.assert_trees_all_equal(
        model.apply({"params": params}, IDS), lora_model.apply({"params": lora_params}, IDS)
    )
    # each stacked layer keeps its own adapter: perturb layer 1 only
    adapter = lora_params["layers"]["block"]["up"]["lora"]
    b = adapter.b.at[1].set(0.1)
    lora_params["layers"]["block"]["up"]["lora"] = jaxlora.LoraAdapter(
        adapter.a, b, **_static(adapter)
    )
    chex.assert_trees_all_close(
        lora_model.apply({"params": lora_params}, IDS),
        model.apply({"params": jaxlora.merge(lora_params)}, IDS),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bfloat16_base_float32_adapters():
    model = nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.ones((2, 16), jnp.bfloat16)
    params = model.init(KEY, x)["params"]
    lora_model, lp = jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=2), x, key=KEY)
    assert lp["lora"].a.dtype == jnp.float32
    y = lora_model.apply({"params": _set_b(lp)}, x)
    assert y.dtype == jnp.bfloat16
    merged = jaxlora.merge(_set_b(lp))
    assert merged["kernel"].dtype == jnp.bfloat16


def test_lora_dropout_needs_its_rng_stream(tiny_lm):
    model, params = tiny_lm
    cfg = jaxlora.LoraConfig(rank=4, targets=["query", "value"], dropout=0.5)
    lora_model, lp = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    lp = _set_b(lp, 0.5)
    det = lora_model.apply({"params": lp}, IDS)
    rngs = {"dropout": jax.random.key(3)}
    no_drop = jaxlora.LoraModel(model, jaxlora.LoraConfig(rank=4, targets=["query", "value"]))
    # without the stream no LoRA dropout: the output of a rate-0 config
    chex.assert_trees_all_equal(det, no_drop.apply({"params": lp}, IDS))
    # the stream alone turns it on (the model's own dropout stays off: deterministic=True)
    chex.assert_trees_all_equal(det, no_drop.apply({"params": lp}, IDS, rngs=rngs))
    assert not jnp.allclose(det, lora_model.apply({"params": lp}, IDS, rngs=rngs))
    noisy = lora_model.apply({"params": lp}, IDS, deterministic=False, rngs=rngs)
    assert not jnp.allclose(det, noisy)
    # without adapters' dropout the only difference would be attention dropout; check the
    # stream drives LoRA dropout by turning the rate off
    clean = no_drop.apply({"params": lp}, IDS, deterministic=False, rngs=rngs)
    assert not jnp.allclose(clean, noisy)


def test_modules_to_save_and_bias_modes(tiny_lm):
    model, params = tiny_lm
    cfg = jaxlora.LoraConfig(rank=4, targets=["query"], modules_to_save=["ln_f"], bias="lora_only")
    _, lp = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    mask = jaxlora.trainable_mask(lp)
    assert mask["ln_f"]["scale"] and mask["ln_f"]["bias"]
    assert mask["block_0"]["attn"]["query"]["bias"]
    assert not mask["block_0"]["attn"]["query"]["kernel"]
    assert not mask["block_0"]["attn"]["key"]["bias"]
    n_query = 2 * (32 * 4 + 4 * 32 + 32)
    assert jaxlora.summary(lp).trainable_params == n_query + 2 * 32
    cfg_all = jaxlora.LoraConfig(rank=4, targets=["query"], bias="all")
    _, lp_all = jaxlora.lorafy(model, params, cfg_all, IDS, key=KEY)
    assert jaxlora.trainable_mask(lp_all)["block_1"]["up"]["bias"]


def test_no_match_lists_the_layers(tiny_lm):
    model, params = tiny_lm
    with pytest.raises(ValueError, match=r"(?s)matches no layer.*\n  block_0/attn/query"):
        jaxlora.lorafy(model, params, jaxlora.LoraConfig(targets=["q_proj"]), IDS, key=KEY)


def test_modules_to_save_no_match_and_clash(tiny_lm):
    model, params = tiny_lm
    with pytest.raises(ValueError, match=r"modules_to_save pattern 'classifier' matches no"):
        jaxlora.lorafy(
            model, params, jaxlora.LoraConfig(modules_to_save=["classifier"]), IDS, key=KEY
        )
    with pytest.raises(ValueError, match=r"both in modules_to_save and a LoRA target"):
        jaxlora.lorafy(
            model, params, jaxlora.LoraConfig(targets=["up"], modules_to_save=["up"]), IDS, key=KEY
        )


def test_rank_too_large_names_layer_and_shapes(tiny_lm):
    model, params = tiny_lm
    with pytest.raises(ValueError, match=r"rank 40 for layer 'block_0/attn/query' exceeds"):
        jaxlora.lorafy(model, params, jaxlora.LoraConfig(rank=40, targets=["query"]), IDS, key=KEY)


def test_params_of_another_model_are_rejected(tiny_lm):
    model, _ = tiny_lm
    other = models.TinyLM(d_model=16).init(KEY, IDS)["params"]
    with pytest.raises(ValueError, match=r"model.apply failed on these params"):
        jaxlora.lorafy(model, other, jaxlora.LoraConfig(), IDS, key=KEY)


def test_lorafy_twice_is_an_error(tiny_lm):
    model, params = tiny_lm
    _, lp = jaxlora.lorafy(model, params, jaxlora.LoraConfig(targets=["query"]), IDS, key=KEY)
    with pytest.raises(ValueError, match=r"already hold LoRA adapters"):
        jaxlora.lorafy(model, lp, jaxlora.LoraConfig(targets=["query"]), IDS, key=KEY)


def test_wrong_call_forms_are_type_errors(tiny_lm):
    model, params = tiny_lm
    with pytest.raises(TypeError, match=r"key=jax.random.key"):
        jaxlora.lorafy(model, params, jaxlora.LoraConfig(), IDS)
    with pytest.raises(TypeError, match=r"LoraConfig"):
        jaxlora.lorafy(model, params, IDS, key=KEY)


def test_example_inputs_may_be_abstract(tiny_lm):
    model, params = tiny_lm
    spec = jax.ShapeDtypeStruct(IDS.shape, IDS.dtype)
    _, lp = jaxlora.lorafy(model, params, jaxlora.LoraConfig(targets=["up"]), spec, key=KEY)
    assert len(jaxlora.summary(lp).layers) == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"targets": ["query", "valeu"]}, r"targets pattern 'valeu' matches no layer"),
        ({"exclude": ["qurey"]}, r"exclude pattern 'qurey' matches no layer"),
        ({"targets": ["query"], "rank_pattern": {"value": 2}}, r"rank_pattern key 'value'"),
        ({"alpha_pattern": {"re:.*nope": 2.0}}, r"alpha_pattern key 're:.\*nope'"),
    ],
    ids=["target", "exclude", "rank_pattern", "alpha_pattern"],
)
def test_every_pattern_that_matches_nothing_is_an_error(tiny_lm, fields, message):
    """One misspelt entry among good ones used to be ignored silently."""
    model, params = tiny_lm
    with pytest.raises(ValueError, match=message):
        jaxlora.lorafy(model, params, jaxlora.LoraConfig(**fields), IDS, key=KEY)
