"""LoRA+: PEFT's learning-rate groups on the same model, and the ratio in training."""

import re

import chex
import jax
import jax.numpy as jnp
import optax
import peft
import pytest
import torch
from flax import nnx
from peft.optimizers import create_loraplus_optimizer

import jaxlora
from tests.support import peft_models

LR, RATIO, LR_EMBEDDING = 0.1, 4.0, 0.01
IDS = peft_models.ids()


def _peft_rates() -> dict[str, float]:
    """``{jaxlora leaf path: learning rate}`` of PEFT's LoRA+ optimizer on the torch twin."""
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed"],
        modules_to_save=["classifier"],
        bias="lora_only",
    )
    model = peft.get_peft_model(peft_models.TorchNet(), config)
    opt = create_loraplus_optimizer(
        model,
        torch.optim.SGD,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=LR_EMBEDDING,
    )
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {}
    for group in opt.param_groups:
        for p in group["params"]:
            rates[_jax_path(names[id(p)])] = group["lr"]
    return rates


def _jax_path(torch_name: str) -> str:
    name = torch_name.removeprefix("base_model.model.")
    name = re.sub(r"\.(\d+)\.", r"_\1.", name)
    name = re.sub(
        r"lora_(embedding_)?([AB])\.default(\.weight)?", lambda m: f"lora.{m[2].lower()}", name
    )
    name = name.replace(".modules_to_save.default.weight", ".kernel")
    name = name.replace(".modules_to_save.default", "").replace(".base_layer", "")
    return name.replace(".", "/")


def _jax_rates(params, tx) -> dict[str, float]:
    """The rate each trainable leaf gets, read off one SGD update of all-ones gradients."""
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    rates = {}
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        rate = -float(u.reshape(-1)[0])
        if rate:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            rates[name.removesuffix("/value")] = rate  # a jaxlora.Trainable's field
    return rates


def _lorafied():
    torch.manual_seed(0)
    base = peft_models.flax_params(peft_models.TorchNet())
    cfg = jaxlora.LoraConfig(
        rank=4,
        alpha=8,
        targets=["q_proj", "v_proj", "embed"],
        modules_to_save=["classifier"],
        bias="lora_only",
    )
    _, params = jaxlora.lorafy(peft_models.Net(), base, cfg, IDS, key=jax.random.key(0))
    return params


def test_groups_match_peft_create_loraplus_optimizer():
    params = _lorafied()
    tx = jaxlora.optimizer(
        optax.sgd,
        params,
        learning_rate=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=LR_EMBEDDING,
    )
    want = _peft_rates()
    assert sorted(set(want.values())) == [LR_EMBEDDING, LR, LR * RATIO]
    assert _jax_rates(params, tx) == pytest.approx(want)


def test_one_sgd_step_moves_b_by_the_ratio():
    params = _lorafied()
    model = jaxlora.LoraModel(peft_models.Net(), jaxlora.LoraConfig(rank=4, alpha=8))
    labels = jnp.asarray([0, 1, 2, 1])

    def loss_fn(p, ids):
        logits = model.apply({"params": p}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step_delta(tx):
        step = jaxlora.make_train_step(loss_fn, tx, donate=False)
        new, _, _ = step(params, tx.init(params), IDS)
        return jax.tree.map(lambda a, b: a - b, new, params)

    plain = step_delta(jaxlora.optimizer(optax.sgd(LR), params))
    plus = step_delta(
        jaxlora.optimizer(optax.sgd, params, learning_rate=LR, loraplus_lr_ratio=RATIO)
    )
    q = ("layers_0", "q_proj", "lora")
    b_plain, b_plus = (d[q[0]][q[1]][q[2]].b for d in (plain, plus))
    assert float(jnp.abs(b_plain).max()) > 0
    chex.assert_trees_all_close(b_plus, RATIO * b_plain, rtol=1e-6)
    chex.assert_trees_all_close(plus[q[0]][q[1]][q[2]].a, plain[q[0]][q[1]][q[2]].a, rtol=1e-6)


def test_nnx_groups_through_nnx_optimizer():
    model = nnx.Sequential(nnx.Embed(11, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 8, rngs=nnx.Rngs(1)))
    model = jaxlora.lorafy(model, jaxlora.LoraConfig(rank=2, targets=["0", "1"]), rngs=nnx.Rngs(2))
    tx = jaxlora.optimizer(
        optax.sgd,
        model,
        learning_rate=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=LR_EMBEDDING,
    )
    opt = nnx.Optimizer(model, tx, wrt=jaxlora.TrainableParam)
    before = nnx.clone(model)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, jaxlora.TrainableParam))
    opt.update(model, grads)
    rates = [
        -float(
            (getattr(model.layers[i], n)[...] - getattr(before.layers[i], n)[...]).reshape(-1)[0]
        )
        for i in (0, 1)
        for n in ("lora_a", "lora_b")
    ]
    assert rates == pytest.approx([LR_EMBEDDING, LR_EMBEDDING, LR, LR * RATIO])


def test_loraplus_needs_a_learning_rate_function():
    params = _lorafied()
    with pytest.raises(TypeError, match="pass a function of the learning rate"):
        jaxlora.optimizer(optax.sgd(LR), params, learning_rate=LR, loraplus_lr_ratio=RATIO)
    with pytest.raises(TypeError, match="pass learning_rate="):
        jaxlora.optimizer(optax.sgd, params, loraplus_lr_ratio=RATIO)
    with pytest.raises(ValueError, match="must be a positive number"):
        jaxlora.optimizer(optax.sgd, params, learning_rate=LR, loraplus_lr_ratio=0)
