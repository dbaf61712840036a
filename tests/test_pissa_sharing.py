"""Saving and sharing PiSSA/OLoRA adapters: jaxlora's files, PEFT's files, and the
conversion to plain LoRA on the untouched base, checked against real PEFT in torch."""

import copy

import chex
import jax
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import jaxlora
from tests.support import models, peft_models

KEY = jax.random.key(0)
IDS = peft_models.ids()
MODULE_MAP = jaxlora.peft_module_map()
TOLERANCE = 1e-4
TARGETS = ["q_proj", "v_proj"]


def _trained(base_params, init):
    """A PiSSA/OLoRA adapter with its factors moved away from their initial values."""
    cfg = jaxlora.LoraConfig(rank=2, alpha=4, targets=TARGETS, init=init, bias="lora_only")
    return cfg, peft_models.lorafied_and_moved(base_params, cfg, KEY)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_adapter_loads_on_the_untouched_base(tmp_path, base_params, init):
    cfg, trained = _trained(base_params, init)
    jaxlora.save_adapter(tmp_path / "adapter", trained, cfg)
    loaded_cfg, loaded = jaxlora.load_adapter(tmp_path / "adapter", base_params)
    assert loaded_cfg == cfg
    chex.assert_trees_all_close(loaded, trained, atol=1e-6)  # the residual recomputed
    # the merged params are not the base the residual is recomputed from
    with pytest.raises(ValueError, match=r"(?s)was trained on another base .*init='" + init):
        jaxlora.load_adapter(tmp_path / "adapter", jaxlora.merge(trained))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_exported_adapter_loads_in_peft_on_the_untouched_base(
    tmp_path, torch_base, base_params, init
):
    cfg, trained = _trained(base_params, init)
    jaxlora.export_peft(tmp_path / "out", trained, cfg, module_map=MODULE_MAP)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), tmp_path / "out").eval()
    assert model.peft_config["default"].init_lora_weights == init
    peft_models.assert_same_logits(model, cfg, trained, IDS, TOLERANCE)


def _peft_trained(torch_base, init, tmp_path):
    """A PEFT PiSSA/OLoRA adapter, trained to other values; its logits; its initial model."""
    # bias="none": PEFT's conversion loads a second adapter, and two may not train biases
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=init)
    model = peft.get_peft_model(copy.deepcopy(torch_base), config)
    # PEFT's recipe: the initial adapter is saved as plain LoRA, to be subtracted later
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model, peft_models.torch_logits(model.eval(), IDS)


# PEFT warns about its own conversion (it loads the initial adapter beside the PiSSA one)
@pytest.mark.filterwarnings("ignore:.* changes the base weights")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_adapter_imports_on_the_untouched_base(tmp_path, torch_base, base_params, init):
    model, want = _peft_trained(torch_base, init, tmp_path)
    model.save_pretrained(tmp_path / "trained")
    cfg, lora_params = jaxlora.import_peft(tmp_path / "trained", base_params, module_map=MODULE_MAP)
    assert cfg.init == init
    assert np.abs(peft_models.jax_logits(cfg, lora_params, IDS) - want).max() <= TOLERANCE
    # PEFT's own conversion to plain LoRA (rank 2r) imports as plain LoRA
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial"
    )
    cfg, lora_params = jaxlora.import_peft(
        tmp_path / "converted", base_params, module_map=MODULE_MAP
    )
    assert (cfg.init, cfg.rank) == ("kaiming", 4)
    assert np.abs(peft_models.jax_logits(cfg, lora_params, IDS) - want).max() <= TOLERANCE


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_convert_to_lora_loads_on_the_untouched_base_in_jaxlora_and_peft(
    tmp_path, torch_base, base_params, init
):
    cfg, trained = _trained(base_params, init)
    want = peft_models.jax_logits(cfg, trained, IDS)
    plain_cfg, plain = jaxlora.convert_to_lora(trained, base_params, cfg)
    assert (plain_cfg.init, plain_cfg.rank, plain_cfg.alpha) == ("kaiming", 4, 8)
    assert plain["layers_0"]["q_proj"]["kernel"] is base_params["layers_0"]["q_proj"]["kernel"]
    assert np.abs(peft_models.jax_logits(plain_cfg, plain, IDS) - want).max() <= TOLERANCE
    chex.assert_trees_all_close(jaxlora.merge(plain), jaxlora.merge(trained), atol=1e-5)
    # jaxlora's own files, on the untouched base
    jaxlora.save_adapter(tmp_path / "adapter", plain, plain_cfg)
    loaded_cfg, loaded = jaxlora.load_adapter(tmp_path / "adapter", base_params)
    assert np.abs(peft_models.jax_logits(loaded_cfg, loaded, IDS) - want).max() <= TOLERANCE
    # PEFT, as plain LoRA
    jaxlora.export_peft(tmp_path / "peft", plain, plain_cfg, module_map=MODULE_MAP)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), tmp_path / "peft").eval()
    assert model.peft_config["default"].init_lora_weights is True
    assert np.abs(peft_models.torch_logits(model, IDS) - want).max() <= TOLERANCE


def test_convert_to_lora_refuses_wrong_combinations(base_params):
    cfg, trained = _trained(base_params, "pissa")
    with pytest.raises(ValueError, match=r"layer 'layers_0/q_proj': the residual of the base"):
        jaxlora.convert_to_lora(trained, jaxlora.merge(trained), cfg)
    plain_cfg = jaxlora.LoraConfig(rank=2, alpha=4, targets=TARGETS, bias="lora_only")
    with pytest.raises(ValueError, match=r"only adapters initialised from the base weights"):
        jaxlora.convert_to_lora(trained, base_params, plain_cfg)


@pytest.mark.parametrize("init", ["corda", "loftq", "astra", "lora_ga"])
def test_peft_inits_that_change_the_base_otherwise_are_refused_by_name(tmp_path, base_params, init):
    cfg, trained = _trained(base_params, "pissa")
    jaxlora.export_peft(tmp_path / "out", trained, cfg, module_map=MODULE_MAP)
    config_file = tmp_path / "out" / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"pissa"', f'"{init}"'))
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}', an init that changes"):
        jaxlora.import_peft(tmp_path / "out", base_params, module_map=MODULE_MAP)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_nnx_convert_to_lora_keeps_the_model_on_the_untouched_base(init):
    base = models.NnxModel(nnx.Rngs(0))
    ids = jax.numpy.asarray(IDS % 32)
    cfg = jaxlora.LoraConfig(rank=2, alpha=4, targets=["layers/*", "merge_heads"], init=init)
    model = jaxlora.lorafy(nnx.clone(base), cfg, rngs=nnx.Rngs(1))
    for _, param in nnx.iter_graph(model):
        if isinstance(param, jaxlora.LoraParam):
            param[...] = param[...] + 0.1
    plain_cfg, plain = jaxlora.convert_to_lora(model, base, cfg)
    assert (plain_cfg.rank, plain_cfg.init) == (4, "kaiming")
    assert plain.layers[0].lora_a[...].shape == (16, 4)
    chex.assert_trees_all_close(plain.layers[0].base.kernel[...], base.layers[0].kernel[...])
    chex.assert_trees_all_close(plain(ids), model(ids), atol=1e-5)
    chex.assert_trees_all_close(
        nnx.state(jaxlora.merge(plain)), nnx.state(jaxlora.merge(model)), atol=1e-5
    )


def test_export_refuses_weights_peft_would_rebuild_another_residual_for(tmp_path, base_params):
    cfg, trained = _trained(base_params, "pissa")

    def fused(name):  # layers_0's q_proj and v_proj as blocks of one torch Linear
        blocks = {"layers_0/q_proj": "layers.0.qv[0]", "layers_0/v_proj": "layers.0.qv[1]"}
        return blocks.get(name) or MODULE_MAP(name)

    with pytest.raises(
        ValueError, match=r"'layers_0/q_proj' maps to torch .*jaxlora.convert_to_lora"
    ):
        jaxlora.export_peft(tmp_path / "out", trained, cfg, module_map=fused)
    plain_cfg, plain = jaxlora.convert_to_lora(trained, base_params, cfg)
    jaxlora.export_peft(tmp_path / "out", plain, plain_cfg, module_map=fused)
