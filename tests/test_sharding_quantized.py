"""A quantized base on a 2x4 (data x model) mesh of 8 fake CPU devices: FSDP + tensor parallel."""

import chex
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from tests.support import models

KEY = jax.random.key(0)
FSDP_TP = [  # FSDP over "data" and Megatron-style tensor parallelism over "model"
    ("re:.*(query|key|value|up)/kernel", P("data", "model")),
    ("re:.*(out|down)/kernel", P("model", "data")),
]


def _train(lora_model, params, batch, steps=3):
    def loss_fn(params, ids):
        logits = lora_model.apply({"params": params}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    tx = jaxlora.optimizer(optax.adam(1e-2), params)
    step = jaxlora.make_train_step(loss_fn, tx)
    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return params, losses


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_base_sharded_fsdp_tp_trains_like_one_device(fmt):
    mesh = jaxlora.parse_mesh("data=2,model=4")
    model = models.TinyLM(vocab=64, d_model=128, heads=4, layers=1)
    ids = jax.random.randint(KEY, (8, 12), 0, 64)
    params = jax.device_get(model.init(KEY, ids)["params"])
    cfg = jaxlora.LoraConfig(rank=4, targets=["query", "down"], quantize=fmt)
    lora_model, sharded = jaxlora.lorafy(
        model, jaxlora.shard_params(params, mesh, FSDP_TP), cfg, ids, key=KEY
    )
    _, single = jaxlora.lorafy(model, params, cfg, ids, key=KEY)

    # codes and block scales are sharded like the kernel they replace
    query = sharded["block_0"]["attn"]["query"]["kernel"]
    down = sharded["block_0"]["down"]["kernel"]
    assert query.codes.sharding == NamedSharding(mesh, P("data", "model"))
    assert down.codes.sharding == NamedSharding(mesh, P("model", "data"))
    if fmt == "nf4":  # (128 / 64 blocks, 128): the block axis is sharded too where it divides
        assert query.scales.sharding == NamedSharding(mesh, P("data", "model"))
        assert down.scales.sharding == NamedSharding(mesh, P("model", "data"))
    chex.assert_trees_all_equal(
        jax.device_get(query), jax.device_get(single["block_0"]["attn"]["query"]["kernel"])
    )
    assert jaxlora.adapter_partition_specs(sharded)["block_0/down"] == (
        P("model", None),
        P(None, "data"),
    )

    trained, losses = _train(lora_model, sharded, jaxlora.shard_batch(ids, mesh))
    reference, ref_losses = _train(lora_model, single, ids)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(
        jax.device_get(jaxlora.split(trained)[0]),
        jax.device_get(jaxlora.split(reference)[0]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert trained["block_0"]["down"]["kernel"].codes.sharding == down.codes.sharding
