"""A GGUF file's own Q4_1 / Q8_0 blocks as the frozen base (`jaxlora.from_gguf`)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from tests.support import models

gguf = pytest.importorskip("gguf")
Q4_1, Q8_0, F32 = (gguf.GGMLQuantizationType[t] for t in ("Q4_1", "Q8_0", "F32"))
KEY = jax.random.key(0)
IDS = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 64


@pytest.fixture(scope="module")
def shipped():
    loading = pytest.importorskip("experiments.models.loading")
    reader = gguf.GGUFReader(loading.smollm2_gguf_path())
    return {t.name: t for t in reader.tensors}


def _bits(x):
    return np.asarray(x).view(np.uint32)


# the tied embedding (Q8_0, 28M values) and Q4_1 kernels of each shape the file holds
@pytest.mark.parametrize(
    "name",
    ["token_embd.weight", "blk.0.ffn_down.weight", "blk.7.attn_k.weight", "blk.29.ffn_up.weight"],
)
def test_dequantized_as_the_gguf_package_does_bit_for_bit(shipped, name):
    tensor = shipped[name]
    reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    rows = jaxlora.from_gguf(tensor.data, tensor.tensor_type)
    kernel = jaxlora.from_gguf(tensor.data, tensor.tensor_type, transpose=True)
    assert rows.shape == reference.shape and kernel.shape == reference.T.shape
    assert rows.nbytes == tensor.n_bytes  # the file's bytes, nothing added
    assert kernel.bits_per_weight == (5.0 if tensor.tensor_type == Q4_1 else 8.5)
    np.testing.assert_array_equal(_bits(jaxlora.dequantize(rows)), _bits(reference))
    np.testing.assert_array_equal(_bits(jax.jit(jaxlora.dequantize)(kernel)), _bits(reference.T))


def test_refused_types_and_layouts(shipped):
    norm = shipped["blk.0.attn_norm.weight"]
    with pytest.raises(ValueError, match=r"tensor type F32 is not one jaxlora keeps.*dequantize"):
        jaxlora.from_gguf(norm.data, norm.tensor_type)
    with pytest.raises(ValueError, match=r"tensor type Q4_K .*only Q4_1, Q8_0"):
        jaxlora.from_gguf(np.zeros((4, 144), np.uint8), "Q4_K")
    with pytest.raises(ValueError, match=r"row_bytes a multiple of 20 .* got uint8 \(4, 30\)"):
        jaxlora.from_gguf(np.zeros((4, 30), np.uint8), Q4_1)
    with pytest.raises(ValueError, match="no original to bound the error against"):
        jaxlora.from_gguf(shipped["blk.0.attn_k.weight"].data, Q4_1).error_bound()


def _to_gguf(path, x):
    """Dense kernels (..., in, out) as Q4_1 blocks, the embedding as Q8_0 (vocab, features)."""
    if path[-1].key == "embedding":
        return jaxlora.from_gguf(gguf.quants.quantize(np.asarray(x), Q8_0), Q8_0)
    torch_order = np.ascontiguousarray(np.swapaxes(np.asarray(x), -1, -2))
    return jaxlora.from_gguf(gguf.quants.quantize(torch_order, Q4_1), Q4_1, transpose=True)


def _dense(tree):
    return jax.tree.map(
        lambda x: jaxlora.dequantize(x) if isinstance(x, jaxlora.QuantizedArray) else x,
        tree,
        is_leaf=lambda x: isinstance(x, jaxlora.QuantizedArray),
    )


def test_scanned_model_on_gguf_blocks_trains_and_keeps_them():
    model = models.ScannedLM(d_model=64)
    params = model.init(KEY, IDS)["params"]
    blocks = jax.tree_util.tree_map_with_path(
        lambda p, x: _to_gguf(p, x) if p[-1].key in ("kernel", "embedding") else x, params
    )
    stacked = blocks["layers"]["block"]["attn"]["query"]["kernel"]
    assert stacked.format == "q4_1" and stacked.shape == (3, 64, 64)
    cfg = jaxlora.LoraConfig(rank=4, targets=["query", "up"])
    lora_model, lora_params = jaxlora.lorafy(model, blocks, cfg, IDS, key=KEY)
    assert "q4_1 (GGUF blocks), q8_0 (GGUF blocks)" in str(jaxlora.summary(lora_params, lora_model))
    chex.assert_trees_all_close(
        jax.jit(lora_model.apply)({"params": lora_params}, IDS),
        model.apply({"params": _dense(blocks)}, IDS),
        rtol=1e-5,
        atol=1e-5,
    )

    def loss_fn(params, ids):
        logits = lora_model.apply({"params": params}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(loss_fn, tx, donate=False)
    opt_state, losses = tx.init(lora_params), []
    trained = lora_params
    for _ in range(3):
        trained, opt_state, loss = step(trained, opt_state, IDS)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(jaxlora.split(trained)[1], jaxlora.split(lora_params)[1])
