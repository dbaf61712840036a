"""Banks and PEFT: combining adapters as add_weighted_adapter does, and bank files."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jaxlora
from jaxlora._tree import LoraAdapter

X = jnp.ones((2, 16))
# t1 and t3: same rank and layers (what "linear" needs); t2: another rank, one layer only
ADAPTERS = {
    "t1": dict(r=4, lora_alpha=8, target_modules=["l0", "l1"]),
    "t2": dict(r=2, lora_alpha=3, target_modules=["l1"]),
    "t3": dict(r=4, lora_alpha=4, target_modules=["l0", "l1"]),
}


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l0 = torch.nn.Linear(16, 32)
        self.l1 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.l1(torch.relu(self.l0(x)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="l1")(nn.relu(nn.Dense(32, name="l0")(x)))


def _peft_model():
    torch.manual_seed(0)
    model = None
    for name, kw in ADAPTERS.items():
        cfg = peft.LoraConfig(**kw, init_lora_weights=False)  # random A and B
        if model is None:
            model = peft.get_peft_model(TorchMLP(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model


def _t(x):
    return jnp.asarray(x.detach().numpy())


def _bank_like(pm):
    """A jaxlora bank with PEFT's base weights and exactly its adapters' factors."""
    layers = {n: getattr(pm.base_model.model, n) for n in ("l0", "l1")}
    params = {
        n: {"kernel": _t(m.base_layer.weight).T, "bias": _t(m.base_layer.bias)}
        for n, m in layers.items()
    }
    model = MLP()
    bank = params
    for name, kw in ADAPTERS.items():
        cfg = jaxlora.LoraConfig(rank=kw["r"], alpha=kw["lora_alpha"], targets=kw["target_modules"])
        _, bank = jaxlora.lorafy(model, bank, cfg, X, key=jax.random.key(0), name=name)
    adapters = {}
    for name, own in bank.adapters.items():
        adapters[name] = {
            layer: {
                "lora": LoraAdapter(
                    _t(layers[layer].lora_A[name].weight).T,
                    _t(layers[layer].lora_B[name].weight).T,
                    node["lora"].scale,
                    node["lora"].delta_eq,
                )
            }
            for layer, node in own.items()
        }
    configs = {n: bank.config(n) for n in bank.names}
    return model, jaxlora.AdapterBank(bank.base, adapters, configs)


@pytest.mark.parametrize(
    ("names", "weights", "how", "rank"),
    [
        (["t1", "t2"], [0.7, -0.4], "cat", None),
        (["t1", "t3"], [0.6, 0.5], "linear", None),
        (["t1", "t2", "t3"], [1.0, 0.5, -0.3], "svd", 3),
    ],
)
def test_merged_weights_match_peft_add_weighted_adapter(names, weights, how, rank):
    pm = _peft_model()
    model, bank = _bank_like(pm)
    pm.add_weighted_adapter(names, weights, "new", combination_type=how, svd_rank=rank)
    bank = jaxlora.add_weighted_adapter(bank, names, weights, "new", how, rank)
    merged = jaxlora.merge(bank, adapters="new")
    for layer in ("l0", "l1"):
        target = getattr(pm.base_model.model, layer)
        want = target.base_layer.weight + target.get_delta_weight("new")
        np.testing.assert_allclose(merged[layer]["kernel"], _t(want).T, atol=1e-5, rtol=1e-5)
    cfg = bank.config("new")
    assert cfg.rank == cfg.alpha == pm.peft_config["new"].r
    # the combined adapter runs like any other, alone or in a mixed batch
    bank_model = jaxlora.BankModel(model)
    y = bank_model.apply({"params": bank}, X, adapter=bank.ids(["new", None]))
    chex.assert_trees_all_close(y[0], model.apply({"params": merged}, X)[0], atol=1e-5)


def test_cat_is_exactly_the_weighted_sum_and_svd_at_full_rank_too():
    _, bank = _bank_like(_peft_model())
    deltas = {
        n: jax.tree.map(jnp.subtract, jaxlora.merge(bank, adapters=n), bank.base)
        for n in ("t1", "t2")
    }
    want = jax.tree.map(
        lambda w, a, b: w + 0.7 * a - 0.4 * b, bank.base, deltas["t1"], deltas["t2"]
    )
    for how, rank in (("cat", None), ("svd", 6)):
        combined = jaxlora.add_weighted_adapter(bank, ["t1", "t2"], [0.7, -0.4], "ab", how, rank)
        chex.assert_trees_all_close(jaxlora.merge(combined, adapters="ab"), want, atol=1e-5)


def test_errors_name_the_adapters_and_the_fix():
    _, bank = _bank_like(_peft_model())
    with pytest.raises(ValueError, match=r"adapters 't1' and 't2' differ in their layers or ranks"):
        jaxlora.add_weighted_adapter(bank, ["t1", "t2"], [1, 1], "ab", "linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        jaxlora.add_weighted_adapter(bank, ["t1", "t2"], [1], "ab", "cat")
    with pytest.raises(KeyError, match="no adapter named 'z'"):
        jaxlora.add_weighted_adapter(bank, ["t1", "z"], [1, 1], "az", "cat")
    with pytest.raises(ValueError, match="an adapter named 't1' is already in this bank"):
        jaxlora.add_weighted_adapter(bank, ["t2", "t3"], [1, 1], "t1", "cat")


def test_a_bank_saves_one_adapter_per_name_and_loads_back(tmp_path):
    _, bank = _bank_like(_peft_model())
    jaxlora.save_bank(tmp_path / "bank", bank)
    loaded = jaxlora.load_bank(tmp_path / "bank", bank.base)
    assert loaded.names == bank.names
    chex.assert_trees_all_equal(loaded.adapters, bank.adapters)
    assert loaded.config("t2") == bank.config("t2")
    cfg, alone = jaxlora.load_adapter(tmp_path / "bank" / "t2", bank.base)  # each loads alone
    chex.assert_trees_all_equal(alone, bank.select("t2"))
    jaxlora.export_peft(  # and exports to PEFT alone
        tmp_path / "peft_t2", alone, cfg, module_map=jaxlora.peft_module_map()
    )
    other = jax.tree.map(lambda w: w * 1.5, bank.base)
    with pytest.raises(ValueError, match=r"adapter 't1': .*was trained on another base model"):
        jaxlora.load_bank(tmp_path / "bank", other)


def test_several_peft_adapters_load_into_one_bank(tmp_path):
    pm = _peft_model()
    pm.save_pretrained(tmp_path / "peft", selected_adapters=["t1", "t2"])
    model, want = _bank_like(pm)
    bank = jaxlora.load_bank(tmp_path / "peft", want.base, module_map=jaxlora.peft_module_map())
    assert bank.names == ("t1", "t2")
    x = torch.ones(2, 16)
    bank_model = jaxlora.BankModel(model)
    got = bank_model.apply({"params": bank}, X, adapter=bank.ids(["t2", "t1"]))
    for row, name in enumerate(["t2", "t1"]):
        pm.set_adapter(name)
        np.testing.assert_allclose(got[row], pm(x)[row].detach().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="pass module_map="):
        jaxlora.load_bank(tmp_path / "peft", want.base)
