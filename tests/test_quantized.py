"""QLoRA: a frozen base stored nf4 or int8, dequantized inside the step where it is used."""

import re

import chex
import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from tests.support import models
from tests.support.steps import compiled_dot_shapes

KEY = jax.random.key(0)
IDS = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 64
FORMATS = ["nf4", "int8"]


def _weight(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _dequantized(tree):
    return jax.tree.map(
        lambda x: jaxlora.dequantize(x) if isinstance(x, jaxlora.QuantizedArray) else x,
        tree,
        is_leaf=lambda x: isinstance(x, jaxlora.QuantizedArray),
    )


def _lm(fmt, **cfg):
    model = models.TinyLM(d_model=64)
    params = model.init(KEY, IDS)["params"]
    config = jaxlora.LoraConfig(rank=4, targets=["query", "value"], quantize=fmt, **cfg)
    lora_model, lora_params = jaxlora.lorafy(model, params, config, IDS, key=KEY)
    return model, params, lora_model, lora_params


def _loss_fn(lora_model):
    def loss_fn(params, ids):
        logits = lora_model.apply({"params": params}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return loss_fn


# --- formats ---------------------------------------------------------------------------


def test_nf4_codes_are_bitsandbytes_codes():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = np.asarray(_weight((256, 96)))  # a kernel (in, out); PyTorch's weight is (out, in)
    q = jaxlora.quantize(jnp.asarray(w), "nf4", contracted=(0,), double_quant=False)
    packed, state = bnb.quantize_4bit(
        torch.from_numpy(w.T.copy()), blocksize=64, quant_type="nf4", compress_statistics=False
    )
    np.testing.assert_array_equal(np.asarray(q.codes).T, packed.numpy().reshape(96, 128))
    np.testing.assert_array_equal(np.asarray(q.scales).T.ravel(), state.absmax.numpy())
    np.testing.assert_array_equal(
        np.asarray(jaxlora.dequantize(q)), bnb.dequantize_4bit(packed, state).numpy().T
    )


def test_nf4_values_are_qloras_table_as_qwix_has_it():
    numerics = pytest.importorskip("qwix._src.core.numerics")
    codes = jnp.arange(16, dtype=jnp.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]  # one block of 64 holding each code 4 times
    q = jaxlora.quantize(jnp.ones((64, 1)), "nf4", contracted=(0,), double_quant=False)
    q = jaxlora.QuantizedArray(
        jnp.tile(packed, 4)[:, None], q.scales, None, None, "nf4", (64, 1), "float32", 0
    )
    values = np.asarray(jaxlora.dequantize(q))[:16, 0]
    np.testing.assert_array_equal(values, np.asarray(numerics.get_nf4_buckets(), np.float32))


@pytest.mark.parametrize(
    ("fmt", "double_quant", "dtype"),
    [
        ("nf4", True, jnp.float32),
        ("nf4", False, jnp.bfloat16),
        ("int8", True, jnp.float32),
        ("fp8", True, jnp.float32),
    ],
)
def test_dequantized_error_within_the_formats_bound(fmt, double_quant, dtype):
    w = _weight((3, 128, 80), dtype) * jnp.linspace(0.1, 3, 80, dtype=dtype)
    q = jax.jit(lambda w: jaxlora.quantize(w, fmt, (1,), double_quant=double_quant))(w)
    d = jaxlora.dequantize(q, jnp.float32)
    err = jnp.abs(d - w.astype(jnp.float32))
    assert jaxlora.dequantize(q).dtype == dtype
    assert bool(jnp.all(err <= q.error_bound() * (1 + 1e-5) + 1e-7))
    assert float(jnp.mean(err)) < 0.2 * float(jnp.mean(jnp.abs(w.astype(jnp.float32))))


def test_stored_bytes_against_bfloat16():
    w = _weight((512, 1024), jnp.bfloat16)
    nf4 = jaxlora.quantize(w, "nf4", (0,))
    int8 = jaxlora.quantize(w, "int8", (0,))
    assert nf4.nbytes <= 0.27 * w.nbytes  # 4.13 bits per weight
    assert abs(nf4.bits_per_weight - 4.129) < 0.01
    assert jaxlora.quantize(w, "nf4", (0,), double_quant=False).bits_per_weight == 4.5
    assert int8.nbytes <= 0.51 * w.nbytes
    fp8 = jaxlora.quantize(w, "fp8", (0,))
    assert fp8.codes.dtype == jnp.float8_e4m3fn and fp8.nbytes == int8.nbytes


# --- the adapted model on a quantized base ----------------------------------------------


# eager (no jit) nf4 dispatches every dequantizing op one by one: slow, and int8 covers it
@pytest.mark.parametrize(
    ("fmt", "jit"), [("nf4", True), ("int8", True), ("int8", False), ("fp8", True)]
)
def test_identity_at_init_equals_the_quantized_base(fmt, jit):
    model, _, lora_model, lora_params = _lm(fmt)
    kernel = lora_params["block_0"]["attn"]["query"]["kernel"]
    assert isinstance(kernel, jaxlora.QuantizedArray) and kernel.format == fmt
    # all-linear weights are quantized, adapted or not; the tied embedding is not
    assert isinstance(lora_params["block_1"]["up"]["kernel"], jaxlora.QuantizedArray)
    assert not isinstance(lora_params["embed"]["embedding"], jaxlora.QuantizedArray)
    apply = jax.jit(lora_model.apply) if jit else lora_model.apply
    chex.assert_trees_all_close(
        apply({"params": lora_params}, IDS),
        model.apply({"params": _dequantized(_strip_adapters(lora_params))}, IDS),
        rtol=1e-5,
        atol=1e-5,
    )


def _strip_adapters(tree):
    if not isinstance(tree, dict):
        return tree
    return {
        k: _strip_adapters(v) for k, v in tree.items() if not isinstance(v, jaxlora.LoraAdapter)
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_lowers_the_loss_and_keeps_the_codes(fmt):
    _, _, lora_model, lora_params = _lm(fmt)
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    opt_state = tx.init(lora_params)
    # the optimizer holds no state for codes or scales
    assert not any(x.dtype in (jnp.uint8, jnp.int8) for x in jax.tree.leaves(opt_state))
    step = jaxlora.make_train_step(_loss_fn(lora_model), tx, donate=False)
    frozen = jax.tree.map(np.asarray, jaxlora.split(lora_params)[1])
    losses = []
    for _ in range(10):
        lora_params, opt_state, loss = step(lora_params, opt_state, IDS)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, jaxlora.split(lora_params)[1]), frozen)


def test_no_weight_gradient_and_no_dense_residual(capsys):
    _, _, lora_model, lora_params = _lm("nf4")
    tx = jaxlora.optimizer(optax.sgd(1e-2), lora_params)
    loss_fn = _loss_fn(lora_model)
    step = jaxlora.make_train_step(loss_fn, tx, donate=False)
    trainable, frozen, _ = step._split(lora_params)
    shapes = compiled_dot_shapes(step.jitted, trainable, frozen, tx.init(lora_params), IDS)
    kernels = {(64, 64), (64, 256), (256, 64)}
    assert not shapes & kernels, f"a kernel-shaped dot (a weight gradient): {shapes & kernels}"
    # the backward pass dequantizes again: no dense kernel is kept from the forward pass
    jax.ad_checkpoint.print_saved_residuals(
        lambda t: loss_fn(jaxlora.combine(t, frozen), IDS), trainable
    )
    saved = capsys.readouterr().out
    assert "u8[" in saved  # the codes are what the backward pass reads
    assert not re.search(r"f32\[(64,256|256,64)\]", saved), saved


class _Stack(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = jnp.tanh(nn.Dense(x.shape[-1], name=f"dense_{i}")(x))
        return x


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_the_step_holds_one_dense_weight_at_a_time(fmt):
    """Each weight is dequantized after its layer's input (and again after its cotangent):
    XLA:CPU scheduled every layer's dequantization first and kept the dense weights for
    the backward pass, so that 8 more layers cost 8 dense kernels of temporary memory."""
    x = jnp.ones((16, 512))

    def temp_bytes(layers):
        model = _Stack(layers)
        params = model.init(jax.random.key(0), x)["params"]
        cfg = jaxlora.LoraConfig(rank=4, quantize=fmt)
        lora_model, lora_params = jaxlora.lorafy(model, params, cfg, x, key=jax.random.key(1))
        tx = jaxlora.optimizer(optax.sgd(1e-2), lora_params)
        step = jaxlora.make_train_step(
            lambda p, b: lora_model.apply({"params": p}, b).sum(), tx, donate=False
        )
        compiled = step.lower(lora_params, tx.init(lora_params), x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense_kernel = 512 * 512 * 4
    assert temp_bytes(16) - temp_bytes(8) < 2 * dense_kernel


@pytest.mark.parametrize("fmt", FORMATS)
def test_scanned_and_rematerialised_blocks(fmt):
    model = models.ScannedLM(d_model=64)
    params = model.init(KEY, IDS)["params"]
    cfg = jaxlora.LoraConfig(rank=4, targets=["query", "up"], quantize=fmt)
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
    stacked = lora_params["layers"]["block"]["attn"]["query"]["kernel"]
    assert isinstance(stacked, jaxlora.QuantizedArray) and stacked.shape == (3, 64, 64)
    chex.assert_trees_all_close(
        jax.jit(lora_model.apply)({"params": lora_params}, IDS),
        model.apply({"params": _dequantized(_strip_adapters(lora_params))}, IDS),
        rtol=1e-5,
        atol=1e-5,
    )
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(_loss_fn(lora_model), tx, donate=False)
    opt_state = tx.init(lora_params)
    first = None
    for _ in range(3):
        lora_params, opt_state, loss = step(lora_params, opt_state, IDS)
        first = float(loss) if first is None else first
    assert float(loss) < first


# --- merge, checkpoints, summary --------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_merge_gives_dense_weights_in_the_chosen_dtype(dtype):
    model, _, lora_model, lora_params = _lm("nf4")
    trainable, frozen = jaxlora.split(lora_params)
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    lora_params = jaxlora.combine(trainable, frozen)
    merged = jaxlora.merge(lora_params, dtype=dtype)
    assert not any(
        isinstance(x, jaxlora.QuantizedArray)
        for x in jax.tree.leaves(merged, is_leaf=lambda x: isinstance(x, jaxlora.QuantizedArray))
    )
    kernels = [merged["block_0"]["attn"]["query"]["kernel"], merged["block_1"]["up"]["kernel"]]
    assert all(k.dtype == dtype for k in kernels)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    chex.assert_trees_all_close(
        model.apply({"params": jax.tree.map(lambda x: x.astype(jnp.float32), merged)}, IDS),
        lora_model.apply({"params": lora_params}, IDS),
        rtol=tol,
        atol=tol,
    )
    with pytest.raises(ValueError, match="stored quantized"):
        jaxlora.unmerge(merged, lora_params)


def test_adapter_checkpoint_holds_no_codes_and_loads_onto_another_storage(tmp_path):
    model, params, lora_model, lora_params = _lm("nf4")
    trainable, frozen = jaxlora.split(lora_params)
    lora_params = jaxlora.combine(jax.tree.map(lambda x: x + 0.01, trainable), frozen)
    jaxlora.save_adapter(tmp_path / "a", lora_params, lora_model.config)
    saved = sum(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert saved < 200_000  # the adapters only: the codes alone are 100 KB
    # onto the same nf4 base: fingerprints of the codes compared
    _, same = jaxlora.load_adapter(tmp_path / "a", frozen)
    chex.assert_trees_all_equal(jaxlora.split(same)[0], jaxlora.split(lora_params)[0])
    # onto the float base: the base is stored otherwise, adapters load as they are
    config, on_float = jaxlora.load_adapter(tmp_path / "a", params)
    assert config.quantize == "nf4"  # what it was trained on
    assert not isinstance(on_float["block_0"]["attn"]["query"]["kernel"], jaxlora.QuantizedArray)
    assert "base:" not in str(jaxlora.summary(on_float))
    assert "base: 12 weights stored nf4" in str(jaxlora.summary(same))
    # onto another nf4 base: refused, as for float bases
    other = model.init(jax.random.key(7), IDS)["params"]
    _, other_q = jaxlora.lorafy(model, other, lora_model.config, IDS, key=KEY)
    with pytest.raises(ValueError, match="another base model"):
        jaxlora.load_adapter(tmp_path / "a", _strip_adapters(other_q))


def test_train_checkpointer_resumes_exactly_on_a_quantized_base(tmp_path):
    _, _, lora_model, lora_params = _lm("nf4", dropout=0.1)

    def loss_fn(params, ids, rng):
        logits = lora_model.apply({"params": params}, ids, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(loss_fn, tx, donate=False)

    def train(params, opt_state, start, stop):
        for i in range(start, stop):
            params, opt_state, _ = step(params, opt_state, (IDS + i) % 64, jax.random.key(i))
        return params, opt_state

    params, opt_state = train(lora_params, tx.init(lora_params), 0, 2)
    with jaxlora.TrainCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(2, params, opt_state, KEY, {"position": 2})
    saved = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    assert saved < 300_000  # adapters and their Adam moments; the codes alone are 100 KB
    expected = train(params, opt_state, 2, 4)
    # a fresh process: the base quantized again from the float weights, then resumed
    _, _, _, fresh = _lm("nf4", dropout=0.1)
    with jaxlora.TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        resumed = ckpt.restore_latest(fresh, tx.init(fresh))
    assert resumed.step == 2 and resumed.data_state == {"position": 2}
    chex.assert_trees_all_equal(jaxlora.split(resumed.params)[1], jaxlora.split(fresh)[1])
    chex.assert_trees_all_equal(train(resumed.params, resumed.opt_state, 2, 4), expected)


def test_summary_counts_dense_parameters():
    _, params, _, lora_params = _lm("nf4")
    s = jaxlora.summary(lora_params)
    total = sum(x.size for x in jax.tree.leaves(params))
    assert s.total_params == total + s.trainable_params
    assert "stored nf4 (double-quantized scales), 4.1" in s.base


# --- errors -----------------------------------------------------------------------------


def test_nf4_refuses_an_input_axis_not_a_multiple_of_64():
    model = models.MLP(features=(64, 8))
    x = jnp.ones((2, 48))
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=2, quantize="nf4")
    with pytest.raises(ValueError, match=r"'dense_0/kernel' \(48, 64\).*multiple of the block"):
        jaxlora.lorafy(model, params, cfg, x, key=KEY)
    cfg = jaxlora.LoraConfig(rank=2, quantize="nf4", quantize_exclude=["dense_0"])
    _, lora_params = jaxlora.lorafy(model, params, cfg, x, key=KEY)
    assert isinstance(lora_params["dense_1"]["kernel"], jaxlora.QuantizedArray)


def test_training_a_quantized_leaf_is_refused():
    _, _, _, lora_params = _lm("int8")
    marked = dict(lora_params)
    up = dict(marked["block_0"])
    up["up"] = {**up["up"], "kernel": jaxlora.Trainable(up["up"]["kernel"])}
    marked["block_0"] = up
    with pytest.raises(ValueError, match="stored quantized"):
        jaxlora.optimizer(optax.adam(1e-3), marked)


def test_bad_quantize_options():
    with pytest.raises(ValueError, match="unknown quantize='fp4'"):
        jaxlora.LoraConfig(quantize="fp4")
    model = models.TinyLM(d_model=64)
    params = model.init(KEY, IDS)["params"]
    cfg = jaxlora.LoraConfig(targets=["query"], quantize="nf4", quantize_exclude=["lm_hed"])
    with pytest.raises(ValueError, match="quantize_exclude pattern 'lm_hed' matches no weight"):
        jaxlora.lorafy(model, params, cfg, IDS, key=KEY)
