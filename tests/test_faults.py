"""The fault catalogue: bad inputs and faults that must fail loudly (or be prevented).

Each test names the case of issue 14 it covers; the README's "Failure behaviour" table
lists the same cases.
"""

import collections
import dataclasses
import errno
import gc
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from tests.support import models, save_loop

ROOT = Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)
X = jax.random.normal(KEY, (4, 16))


MODEL = models.MLP(features=(64, 64, 32))
CONFIG = jaxlora.LoraConfig(rank=4, targets=["dense_0", "dense_1"])


def _adapted(**cfg_kwargs):
    """MLP base params, the adapted tree with non-zero B, and the config."""
    params = MODEL.init(KEY, X)["params"]
    cfg = dataclasses.replace(CONFIG, **cfg_kwargs)
    _, lora_params = jaxlora.lorafy(MODEL, params, cfg, X, key=KEY)
    trainable, frozen = jaxlora.split(lora_params)
    trainable = jax.tree.map(lambda x: x + 0.01 * jnp.arange(x.size).reshape(x.shape), trainable)
    return params, jaxlora.combine(trainable, frozen), cfg


# --- LoraConfig: non-finite numbers are refused, numpy scalars accepted ------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": math.inf}, r"alpha=inf must be a finite positive number"),
        ({"alpha": -math.inf}, r"alpha=-inf must be a finite positive number"),
        ({"alpha": math.nan}, r"alpha=nan must be a finite positive number"),
        ({"alpha": np.float32(np.inf)}, r"alpha=np.float32\(inf\) must be a finite"),
        ({"alpha": "16"}, r"alpha='16' must be a finite positive number"),
        ({"alpha_pattern": {"q": math.inf}}, r"alpha_pattern\['q'\]=inf must be a finite"),
        ({"alpha_pattern": {"q": math.nan}}, r"alpha_pattern\['q'\]=nan must be a finite"),
        ({"dropout": math.nan}, r"dropout=nan must be a finite number in \[0, 1\)"),
        ({"dropout": math.inf}, r"dropout=inf must be a finite number in \[0, 1\)"),
        ({"dropout": "0.1"}, r"dropout='0.1' must be a finite number"),
        ({"rank": np.float64(8.0)}, r"rank=np.float64\(8.0\) must be a positive int"),
        ({"rank": True}, r"rank=True must be a positive int"),
    ],
)
def test_config_refuses_non_finite_and_non_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxlora.LoraConfig(**kwargs)


def test_config_accepts_numpy_scalars_as_python_numbers():
    cfg = jaxlora.LoraConfig(
        rank=np.int64(8),
        alpha=np.float32(16),
        rank_pattern={"q": np.int32(4)},
        alpha_pattern={"q": np.float64(2.5), "v": np.int16(3)},
        dropout=np.float32(0.125),
    )
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (8, 16.0, 0.125)
    assert type(cfg.rank) is int and type(cfg.alpha) is float and type(cfg.dropout) is float
    assert type(cfg.rank_pattern["q"]) is int
    assert [type(a) for a in cfg.alpha_pattern.values()] == [float, int]
    text = json.dumps(cfg.to_dict())  # raises TypeError on a numpy scalar
    assert jaxlora.LoraConfig(**json.loads(text)) == cfg
    assert cfg.scale_for("layer/q") == 2.5 / 4


# --- PEFT interop -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg_kwargs", "names", "both"),
    [
        ({}, {"dense_0": "shared", "dense_1": "shared"}, "'dense_0' and 'dense_1'"),
        (
            {"modules_to_save": ["dense_2"]},
            {"dense_0": "a", "dense_1": "head", "dense_2": "head"},
            "'dense_1' and 'dense_2'",
        ),
    ],
)
def test_export_peft_refuses_two_layers_with_one_torch_name(tmp_path, cfg_kwargs, names, both):
    _, lora_params, cfg = _adapted(**cfg_kwargs)
    with pytest.raises(ValueError, match=f"module_map sends both {both} to "):
        jaxlora.export_peft(tmp_path / "peft", lora_params, cfg, module_map=names.get)
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("allow_unmatched", [False, True])
def test_import_peft_matching_nothing_is_one_clear_error(tmp_path, allow_unmatched):
    params, lora_params, cfg = _adapted()
    module_map = jaxlora.peft_module_map()
    jaxlora.export_peft(tmp_path / "peft", lora_params, cfg, module_map=module_map)
    with pytest.raises(ValueError, match=r"no LoRA factor of PEFT adapter .* matches a layer") as e:
        jaxlora.import_peft(
            tmp_path / "peft",
            params,
            module_map=jaxlora.peft_module_map("model."),
            allow_unmatched=allow_unmatched,
        )
    assert "LoRA factors of 'dense.0': no flax layer" in str(e.value)
    assert "the module map adds a prefix 'model.'" in str(e.value)  # the hint names the fix


# --- TrainCheckpointer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "changed", [{"alpha": 32.0}, {"alpha_pattern": {"dense_1": 8}}, {"rslora": True}]
)
def test_restore_refuses_a_changed_scale_like_a_changed_rank(tmp_path, changed):
    params, lora_params, cfg = _adapted()
    tx = jaxlora.optimizer(optax.adam(1e-3), lora_params)
    with jaxlora.TrainCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(1, lora_params, tx.init(lora_params), KEY)
        same = ckpt.restore(1, lora_params, tx.init(lora_params))
        chex.assert_trees_all_equal(same.params, lora_params)
        other_cfg = dataclasses.replace(cfg, **changed)
        _, other = jaxlora.lorafy(MODEL, params, other_cfg, X, key=KEY)
        with pytest.raises(ValueError, match=r"step 1 .* does not fit") as e:
            ckpt.restore(1, other, jaxlora.optimizer(optax.adam(1e-3), other).init(other))
    old, new = cfg.scale_for("dense_1"), other_cfg.scale_for("dense_1")
    assert f"layer 'dense_1': saved with scale {old}, the params given have {new}" in str(e.value)


# --- non-finite training steps and adapters ------------------------------------------------


def _mse_loss(params, batch):
    x, y = batch
    y_hat = jaxlora.LoraModel(MODEL, CONFIG).apply({"params": params}, x)
    return jnp.mean((y_hat - y) ** 2)


def _batches():
    y = jax.random.normal(jax.random.key(1), (4, 32))
    return (X, y), (X.at[0, 0].set(jnp.nan), y)


@pytest.mark.parametrize("jit_lower", [False, True])
def test_skip_nonfinite_leaves_adapters_and_moments_untouched_and_counts(jit_lower):
    _, lora_params, _ = _adapted()
    good, bad = _batches()
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(_mse_loss, tx, donate=False, skip_nonfinite=True)
    if jit_lower:
        assert step.lower(lora_params, step.init(lora_params), good) is not None
    params, opt_state, _ = step(lora_params, step.init(lora_params), good)
    assert step.skipped(opt_state) == 0
    skipped_params, skipped_state, loss = step(params, opt_state, bad)
    assert not jnp.isfinite(loss)
    chex.assert_trees_all_equal(skipped_params, params)
    chex.assert_trees_all_equal(skipped_state.inner_state, opt_state.inner_state)
    assert step.skipped(skipped_state) == 1
    after, after_state, loss = step(skipped_params, skipped_state, good)
    assert jnp.isfinite(loss) and step.skipped(after_state) == 1
    assert all(jnp.isfinite(x).all() for x in jax.tree.leaves(after))


def test_without_skip_one_bad_batch_poisons_and_save_adapter_refuses(tmp_path):
    _, lora_params, cfg = _adapted()
    good, bad = _batches()
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(_mse_loss, tx, donate=False)
    params, opt_state, _ = step(lora_params, step.init(lora_params), bad)
    params, _, loss = step(params, opt_state, good)
    assert not jnp.isfinite(loss)  # poisoned for good
    with pytest.raises(ValueError, match=r"save_adapter: these arrays hold NaN or inf") as e:
        jaxlora.save_adapter(tmp_path / "adapter", params, cfg)
    assert "layer 'dense_0': A" in str(e.value) and "layer 'dense_1': B" in str(e.value)
    assert "allow_nonfinite=True" in str(e.value)
    assert not (tmp_path / "adapter").exists()
    jaxlora.save_adapter(tmp_path / "adapter", params, cfg, allow_nonfinite=True)
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", _adapted()[0])
    chex.assert_trees_all_equal(loaded, params)


def test_skip_nonfinite_state_must_come_from_step_init():
    _, lora_params, _ = _adapted()
    good, _ = _batches()
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(_mse_loss, tx, skip_nonfinite=True)
    with pytest.raises(TypeError, match=r"Make it with step.init\(params\) instead of tx.init"):
        step(lora_params, tx.init(lora_params), good)
    plain = jaxlora.make_train_step(_mse_loss, tx)
    with pytest.raises(ValueError, match=r"keeps no count of skipped steps"):
        plain.skipped(plain.init(lora_params))


# --- nothing to train ------------------------------------------------------------------


def test_optimizer_on_a_tree_with_nothing_trainable_is_an_error():
    params, lora_params, _ = _adapted()
    for frozen in (params, jaxlora.merge(lora_params)):
        with pytest.raises(ValueError, match=r"jaxlora.optimizer: these params hold nothing"):
            jaxlora.optimizer(optax.adam(1e-3), frozen)
    nothing = jax.tree.map(lambda _: False, jaxlora.trainable_mask(lora_params))
    with pytest.raises(ValueError, match=r"hold nothing that trains"):
        jaxlora.optimizer(optax.adam(1e-3), lora_params, mask=nothing)


def test_make_train_step_on_a_tree_with_nothing_trainable_is_an_error():
    params, lora_params, _ = _adapted()
    good, _ = _batches()
    step = jaxlora.make_train_step(_mse_loss, optax.adam(1e-3), donate=False)
    merged = jaxlora.merge(lora_params)
    with pytest.raises(ValueError, match=r"make_train_step: these params hold nothing"):
        step(merged, optax.adam(1e-3).init({}), good)
    with pytest.raises(ValueError, match=r"make_train_step: these params hold nothing"):
        step.lower(params, optax.adam(1e-3).init({}), good)


# --- make_train_step: loss output, optimizer state and mask that do not match ---------------


def _aux_loss(params, batch):
    return _mse_loss(params, batch), {"n": 1}


@pytest.mark.parametrize(
    ("loss_fn", "has_aux", "message"),
    [
        (_mse_loss, True, r"has_aux=True\): loss_fn returned an array of shape \(\), not a"),
        (
            lambda p, b: (_mse_loss(p, b), 1, 2),
            True,
            r"has_aux=True\): loss_fn returned a tuple of 3, not a \(loss, aux\) pair",
        ),
        (_aux_loss, False, r"has_aux=False\): loss_fn returned a tuple of 2, not a scalar loss"),
        (lambda p, b: jnp.ones(3), False, r"loss is an array of shape \(3,\), not a scalar"),
    ],
    ids=["aux-expected", "triple", "aux-unexpected", "not-scalar"],
)
def test_make_train_step_loss_output_that_contradicts_has_aux_is_named(loss_fn, has_aux, message):
    _, lora_params, _ = _adapted()
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(loss_fn, tx, has_aux=has_aux, donate=False)
    with pytest.raises(TypeError, match=message):
        step(lora_params, step.init(lora_params), _batches()[0])


def test_make_train_step_with_has_aux_returns_the_aux():
    _, lora_params, _ = _adapted()
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(_aux_loss, tx, has_aux=True, donate=False)
    _, _, (loss, aux) = step(lora_params, step.init(lora_params), _batches()[0])
    assert loss.shape == () and aux == {"n": 1}


@pytest.mark.parametrize("lower", [False, True])
def test_opt_state_of_another_tree_names_the_differences(lower):
    params, lora_params, _ = _adapted()
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    step = jaxlora.make_train_step(_mse_loss, tx, donate=False)
    _, other = jaxlora.lorafy(MODEL, params, dataclasses.replace(CONFIG, rank=8), X, key=KEY)
    other_state = jaxlora.optimizer(optax.adam(1e-2), other).init(other)
    call = step.lower if lower else step
    with pytest.raises(ValueError, match=r"opt_state does not fit these params") as e:
        call(lora_params, other_state, _batches()[0])
    mu_a = ".inner_states['trainable'].inner_state[0].mu['dense_0']['lora'].a"
    assert f"{mu_a}: (16, 8) float32, these params need (16, 4) float32" in str(e.value)
    assert "Make it with step.init(params)" in str(e.value)
    with pytest.raises(ValueError, match=r"opt_state does not fit these params") as e:
        step(lora_params, optax.adam(1e-2).init(lora_params), _batches()[0])  # another optimizer
    assert ".inner_states['trainable'].inner_state[0].count: missing" in str(e.value)


def test_optimizer_init_on_another_tree_names_the_differences():
    params, lora_params, _ = _adapted()
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params)
    _, fewer = jaxlora.lorafy(
        MODEL, params, dataclasses.replace(CONFIG, targets=["dense_0"]), X, key=KEY
    )
    with pytest.raises(ValueError, match=r"init got params of another tree") as e:
        tx.init(fewer)
    assert "dense_1/lora/a: missing\n  dense_1/lora/b: missing" in str(e.value)
    _, rescaled = jaxlora.lorafy(MODEL, params, dataclasses.replace(CONFIG, alpha=4.0), X, key=KEY)
    with pytest.raises(ValueError, match=r"same leaves, other adapter scales \(alpha/rank\)"):
        tx.init(rescaled)


def test_a_prefix_mask_holds_for_its_subtrees_and_must_not_train_frozen_leaves():
    _, lora_params, _ = _adapted()
    good = _batches()[0]
    prefix = {  # True/False for a whole adapter: train dense_0's only
        "dense_0": {"kernel": False, "bias": False, "lora": True},
        "dense_1": {"kernel": False, "bias": False, "lora": False},
        "dense_2": False,
    }
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params, mask=prefix)
    step = jaxlora.make_train_step(_mse_loss, tx, donate=False)
    params, _, _ = step(lora_params, step.init(lora_params), good)
    chex.assert_trees_all_equal(params["dense_1"], lora_params["dense_1"])
    assert not np.array_equal(params["dense_0"]["lora"].b, lora_params["dense_0"]["lora"].b)

    whole_layer = {"dense_0": True, "dense_1": False, "dense_2": False}
    tx = jaxlora.optimizer(optax.adam(1e-2), lora_params, mask=whole_layer)
    step = jaxlora.make_train_step(_mse_loss, tx, donate=False)
    with pytest.raises(ValueError, match=r"the optimizer's mask trains leaves that these") as e:
        step(lora_params, step.init(lora_params), good)
    assert "\n  dense_0/bias\n  dense_0/kernel\nWrap those leaves in jaxlora.Trainable" in str(
        e.value
    )
    with pytest.raises(ValueError, match=r"the mask does not fit params \(it is neither"):
        jaxlora.optimizer(optax.adam(1e-2), lora_params, mask={"dense_9": True})


# --- damaged adapters: load exactly or raise one clear error -----------------------------


def _flip_bits(file, count):
    """Copies of ``file``'s bytes, each with one bit flipped, at ``count`` spread positions."""
    data = file.read_bytes()
    for i in range(count):
        position = (i * len(data)) // count
        flipped = bytearray(data)
        flipped[position] ^= 1 << (i % 8)
        yield position, bytes(flipped)


def _loads_exactly_or_one_clear_error(adapter, params, expected_cfg, expected):
    try:
        cfg, loaded = jaxlora.load_adapter(adapter, params)
    except ValueError as e:
        assert str(e).startswith("load_adapter: "), e
        return "error"
    assert cfg == expected_cfg
    chex.assert_trees_all_equal(loaded, expected)
    return "exact"


# orbax leaves a coroutine whose read failed un-finalised; the error itself reaches us.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("part", ["record", "arrays"])
def test_bit_flips_in_an_adapter_load_exactly_or_raise_one_clear_error(tmp_path, part):
    params, lora_params, cfg = _adapted(modules_to_save=["dense_2"])
    adapter = tmp_path / "adapter"
    jaxlora.save_adapter(adapter, lora_params, cfg)
    files = sorted(f for f in (adapter / part).rglob("*") if f.is_file())
    outcomes = {}
    for file in files:
        original = file.read_bytes()
        for position, flipped in _flip_bits(file, 24 if part == "record" else 6):
            file.write_bytes(flipped)
            try:
                outcome = _loads_exactly_or_one_clear_error(adapter, params, cfg, lora_params)
            finally:
                file.write_bytes(original)
            outcomes[(file.name, position)] = outcome
    gc.collect()  # finalises orbax's failed reads here, under this test's warning filter
    assert "error" in outcomes.values()
    if part == "record":  # every byte of the JSON record matters: each flip is caught
        assert {o for (name, _), o in outcomes.items() if name == "metadata"} == {"error"}


def test_a_changed_value_in_the_record_is_refused_by_its_checksum(tmp_path):
    params, lora_params, cfg = _adapted()
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    record = tmp_path / "adapter" / "record" / "metadata"
    text = record.read_text()
    assert '"scale": 4.0' in text
    record.write_text(text.replace('"scale": 4.0', '"scale": 5.0', 1))  # valid JSON, other scale
    with pytest.raises(ValueError, match=r"is damaged: its record does not match its checksum"):
        jaxlora.load_adapter(tmp_path / "adapter", params)


# --- an adapter loaded onto another base of the same shapes -------------------------------


def _placed(params, placement):
    if placement == "bf16":
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    if placement == "sharded":
        mesh = jax.make_mesh((8,), ("x",))
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
        return jax.tree.map(lambda x: jax.device_put(x, spec) if x.ndim == 2 else x, params)
    return params


@pytest.mark.parametrize("placement", ["same", "bf16", "sharded"])
def test_another_base_of_the_same_shapes_is_refused_naming_the_layers(tmp_path, placement):
    params, lora_params, cfg = _adapted()
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", _placed(params, placement))
    chex.assert_trees_all_equal(jaxlora.split(loaded)[0], jaxlora.split(lora_params)[0])
    other = dict(
        params, dense_1={**params["dense_1"], "kernel": params["dense_1"]["kernel"] * 1.01}
    )
    with pytest.raises(ValueError, match=r"was trained on another base model") as e:
        jaxlora.load_adapter(tmp_path / "adapter", _placed(other, placement))
    assert "layer 'dense_1': its kernel differs" in str(e.value)
    assert "dense_0" not in str(e.value) and "allow_other_base=True" in str(e.value)
    with pytest.warns(UserWarning, match=r"layer 'dense_1'.*\n.*Loaded anyway"):
        _, loaded = jaxlora.load_adapter(
            tmp_path / "adapter", _placed(other, placement), allow_other_base=True
        )
    chex.assert_trees_all_equal(jaxlora.split(loaded)[0], jaxlora.split(lora_params)[0])


def _damage(step_dir, how):
    if how == "truncated array file":
        for data in (step_dir / "state").rglob("d/*"):
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "bad metadata JSON":
        (step_dir / "meta" / "metadata").write_text('{"data_state": {"pos')
    else:
        shutil.rmtree(step_dir / "state")


# orbax leaves a coroutine whose read failed un-finalised; the error itself reaches us.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncated array file", "bad metadata JSON", "missing state/"])
def test_a_damaged_newest_step_falls_back_to_the_newest_readable_one(tmp_path, how):
    _, lora_params, _ = _adapted()
    tx = jaxlora.optimizer(optax.adam(1e-3), lora_params)
    states = {s: jax.tree.map(lambda x, s=s: x * s, lora_params) for s in (1, 2, 3)}
    with jaxlora.TrainCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        for s, params in states.items():
            ckpt.save(s, params, tx.init(params), KEY, {"position": s})
    _damage(tmp_path / "ckpt" / "3", how)
    with jaxlora.TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        with pytest.warns(UserWarning, match=r"resuming from step 2; newer steps are damaged"):
            resumed = ckpt.restore_latest(lora_params, tx.init(lora_params))
        assert (resumed.step, resumed.data_state) == (2, {"position": 2})
        chex.assert_trees_all_equal(jaxlora.split(resumed.params)[0], jaxlora.split(states[2])[0])
        with pytest.raises(ValueError, match=r"step 3 in .* is damaged \(a file is missing"):
            ckpt.restore(3, lora_params, tx.init(lora_params))
    for step in (1, 2):
        _damage(tmp_path / "ckpt" / str(step), how)
    with (
        jaxlora.TrainCheckpointer(tmp_path / "ckpt") as ckpt,
        pytest.raises(ValueError, match=r"every checkpoint in .* is damaged") as e,
    ):
        ckpt.restore_latest(lora_params, tx.init(lora_params))
    assert all(f"step {s} in" in str(e.value) for s in (1, 2, 3))
    gc.collect()  # finalises orbax's failed reads here, under this test's warning filter


# --- interrupted saves: the next successful save removes what they left --------------------


def _staging(directory):
    return sorted(p.name for p in directory.iterdir() if ".staging-" in p.name)


def test_next_save_removes_the_staging_folders_of_interrupted_saves_only(tmp_path):
    _, lora_params, cfg = _adapted()
    for name in (".adapter.staging-0123", ".adapter.staging-4567/previous", ".other.staging-89"):
        (tmp_path / name).mkdir(parents=True)
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    assert _staging(tmp_path) == [".other.staging-89"]  # another target's: not ours
    jaxlora.export_peft(tmp_path / "other", lora_params, cfg, module_map=jaxlora.peft_module_map())
    assert _staging(tmp_path) == []


KILLS = 20  # per saver
SAVE_SECONDS = 0.15  # a save of the loop's adapter or checkpoint takes ~0.1 s on a CPU


class _Source(NamedTuple):
    path: Path
    params: Any
    cfg: jaxlora.LoraConfig
    lora_params: Any


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """What the saving processes start from (`save_loop.prepare`), and its trees."""
    path = tmp_path_factory.mktemp("source")
    params, cfg, lora_params = save_loop.setup()
    save_loop.prepare(path, params, lora_params, cfg)
    return _Source(path, params, cfg, lora_params)


class _SaveServer(NamedTuple):
    process: subprocess.Popen
    log: Path
    params: Any
    cfg: jaxlora.LoraConfig
    lora_params: Any


@pytest.fixture(scope="module")
def save_server(source):
    """`tests.support.save_loop`'s server: forks saving children for `_kill_mid_save`."""
    log = source.path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.save_loop", str(source.path)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    yield _SaveServer(process, log, *source[1:])
    process.stdin.close()
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    process.stdout.close()


def _kill_mid_save(server, kind, directory, rng):
    """Starts a child saving to ``directory`` in a loop and SIGKILLs it at a seeded random
    point of its 2nd to 4th save; returns the versions whose save it started."""
    server, log = server.process, server.log
    server.stdin.write(f"{kind} {directory}\n")
    server.stdin.flush()
    pid = int(server.stdout.readline().removeprefix("CHILD "))
    kill_in, started = rng.randrange(2, 5), []
    while len(started) < kill_in:
        line = server.stdout.readline()
        assert line.startswith("SAVING "), (line, log.read_text()[-3000:])
        started.append(int(line.split()[1]))
    time.sleep(rng.uniform(0.0, SAVE_SECONDS))
    os.kill(pid, signal.SIGKILL)
    while (line := server.stdout.readline()).startswith("SAVING "):
        started.append(int(line.split()[1]))
    assert line.split() == ["DIED", str(pid), str(int(signal.SIGKILL))], line
    return started


def _version_of(loaded, lora_params):
    """Which `save_loop.version` ``loaded`` is, checked leaf for leaf."""
    a = jaxlora.split(loaded)[0]["dense_0"]["lora"].a
    i = round(float(a[0, 0] - lora_params["dense_0"]["lora"].a[0, 0]))
    chex.assert_trees_all_equal(loaded, save_loop.version(lora_params, i))
    return i


def test_sigkills_mid_save_adapter_leave_the_old_or_new_version(tmp_path, save_server):
    params, cfg, lora_params = save_server[2:]
    adapter, rng, outcomes = tmp_path / "adapter", random.Random(14), []
    jaxlora.save_adapter(adapter, save_loop.version(lora_params, 0), cfg)
    on_disk = 0
    for _ in range(KILLS):
        started = _kill_mid_save(save_server, "adapter", adapter, rng)
        last = started[-1]  # killed during this save: the one before it is complete
        expected = {last, last - 1}
        try:
            on_disk = _version_of(jaxlora.load_adapter(adapter, params)[1], lora_params)
        except FileNotFoundError as e:  # killed between the two renames of the install
            assert "A save to it was interrupted and left these complete copies" in str(e)
            copies = sorted(tmp_path.glob(".adapter.staging-*/*"))
            assert [c.name for c in copies] == ["adapter", "previous"], copies
            found = {_version_of(jaxlora.load_adapter(c, params)[1], lora_params) for c in copies}
            assert found == expected, (found, started)
            outcomes.append("between renames")
            continue
        assert on_disk in expected, (on_disk, started)
        outcomes.append("new" if on_disk == last else "old")
    print(collections.Counter(outcomes))
    assert "old" in outcomes  # some kills did land mid-save
    jaxlora.save_adapter(adapter, save_loop.version(lora_params, 99), cfg)
    assert _staging(tmp_path) == []
    assert _version_of(jaxlora.load_adapter(adapter, params)[1], lora_params) == 99


def test_sigkills_mid_checkpoint_save_resume_from_a_complete_step(tmp_path, save_server):
    lora_params = save_server.lora_params
    tx = save_loop.optimizer(lora_params)
    directory, rng, outcomes, latest = tmp_path / "ckpt", random.Random(15), [], 0
    for _ in range(KILLS):
        started = _kill_mid_save(save_server, "checkpoint", directory, rng)
        assert started[0] == latest + 1  # each run continues from the newest complete step
        partial = [p.name for p in directory.iterdir() if not p.name.isdigit()]
        # the run's first save removed the partial steps of earlier runs: only its own remain
        assert {int(name.split(".")[0]) for name in partial} <= set(started), (partial, started)
        with jaxlora.TrainCheckpointer(directory) as ckpt:
            resumed = ckpt.restore_latest(lora_params, tx.init(lora_params))
        # asynchronous: save(i) returns before step i is on disk and waits for step i - 1
        last = started[-1]
        if resumed is None:  # killed before the first step was on disk
            assert latest == 0 and last <= 2, started
            continue
        assert max(latest, last - 2) <= resumed.step <= last, (resumed.step, started)
        assert resumed.data_state == {"version": resumed.step}
        chex.assert_trees_all_equal(resumed.rng, jax.random.key(resumed.step))
        chex.assert_trees_all_equal(resumed.params, save_loop.version(lora_params, resumed.step))
        outcomes.append("partial step left" if partial else "none partial")
        latest = resumed.step
    print(collections.Counter(outcomes))
    assert "partial step left" in outcomes  # some kills did land mid-save
    with jaxlora.TrainCheckpointer(directory) as ckpt:
        ckpt.save(latest + 1, save_loop.version(lora_params, latest + 1), tx.init(lora_params), KEY)
    assert [p.name for p in directory.iterdir() if not p.name.isdigit()] == []


# --- the OS refuses a write: one clear error, and what was saved before is intact ---------

_SAVERS = ["save_adapter", "export_peft", "TrainCheckpointer"]


def _save(saver, directory, params, cfg, step=1):
    if saver == "save_adapter":
        jaxlora.save_adapter(directory, params, cfg)
    elif saver == "export_peft":
        jaxlora.export_peft(directory, params, cfg, module_map=jaxlora.peft_module_map())
    else:
        tx = save_loop.optimizer(params)
        with jaxlora.TrainCheckpointer(directory) as ckpt:
            ckpt.save(step, params, tx.init(params), jax.random.key(step))


def _assert_holds_version(saver, directory, source, i):
    """``directory`` (written by ``saver``) loads exactly as `save_loop.version` ``i``."""
    expected = jaxlora.split(save_loop.version(source.lora_params, i))[0]
    if saver == "save_adapter":
        loaded = jaxlora.load_adapter(directory, source.params)[1]
    elif saver == "export_peft":
        module_map = jaxlora.peft_module_map()
        loaded = jaxlora.import_peft(directory, source.params, module_map=module_map)[1]
    else:
        tx = save_loop.optimizer(source.lora_params)
        with jaxlora.TrainCheckpointer(directory) as ckpt:
            resumed = ckpt.restore_latest(source.lora_params, tx.init(source.lora_params))
        assert resumed.step == i
        loaded = resumed.params
    chex.assert_trees_all_equal(jaxlora.split(loaded)[0], expected)


def _written(directory):
    """The names in ``directory`` and in each directory in it (one level)."""
    return sorted(
        f"{p.name}/{q.name}" if p.is_dir() else p.name
        for p in directory.iterdir()
        for q in (p.iterdir() if p.is_dir() else [p])
    )


def test_a_file_too_large_is_one_clear_error_and_what_was_saved_stays(tmp_path, source):
    """A real EFBIG from tensorstore, safetensors and orbax: files limited to 512 bytes."""
    limited = subprocess.run(
        [sys.executable, "-m", "tests.support.file_limit", str(source.path), str(tmp_path), "512"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = [json.loads(line) for line in limited.stdout.splitlines() if line.startswith("{")]
    assert limited.returncode == 0 and len(results) == 3, limited.stderr[-3000:]
    cause = "a file would exceed the largest file size allowed (File too large)."
    fix = "Raise the process's file size limit (`ulimit -f`) or save to another filesystem."
    kept = {
        "save_adapter": "What was there is unchanged.",
        "export_peft": "What was there is unchanged.",
        "TrainCheckpointer": "Step 2 is not saved; the complete steps [1] are unchanged.",
    }
    where = {"save_adapter": "adapter", "export_peft": "peft", "TrainCheckpointer": "checkpoint"}
    for result in results:
        saver = result["saver"]
        who = "TrainCheckpointer.save" if saver == "TrainCheckpointer" else saver
        message = f"{who}: cannot write {tmp_path / where[saver]}: {cause} {kept[saver]} {fix}"
        assert result == {"saver": saver, "type": "OSError", "errno": 27, "message": message}
    for saver in _SAVERS:  # version 1, saved before the limit, is intact and is what loads
        _assert_holds_version(saver, tmp_path / where[saver], source, 1)
    # orbax's writers may still be filling the staging folder when the error reaches us, so
    # it can outlive the failed save; the next save to the same place removes it
    for saver in _SAVERS:
        three = save_loop.version(source.lora_params, 3)
        _save(saver, tmp_path / where[saver], three, source.cfg, step=3)
        _assert_holds_version(saver, tmp_path / where[saver], source, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoint", "peft"]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["1", "3"]


@pytest.mark.parametrize(
    ("code", "cause", "fix"),
    [
        (
            errno.EACCES,
            "permission denied (Permission denied)",
            "Save to a directory you can write to, or change its permissions.",
        ),
        (errno.ENOSPC, "the disk is full (No space left on device)", "Free space there, or "),
        (errno.EROFS, "the filesystem is read-only", "Save to a writable filesystem."),
    ],
    ids=["unwritable", "disk full", "read-only"],
)
@pytest.mark.parametrize("saver", _SAVERS)
def test_a_directory_refusing_new_entries_is_one_clear_error(
    tmp_path, monkeypatch, source, saver, code, cause, fix
):
    """Root ignores permission bits, so the refusal is simulated: every directory made in
    ``tmp_path/locked`` fails as the OS would fail it (the first thing each saver does)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    _save(saver, locked / "out", save_loop.version(source.lora_params, 1), source.cfg)
    before = _written(locked)
    real_mkdir = os.mkdir

    def refusing_mkdir(path, *args, **kwargs):
        if Path(path).absolute().parent == locked:
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refusing_mkdir)
    target = locked / ("out" if saver != "TrainCheckpointer" else "new")
    with pytest.raises(OSError) as e:
        _save(saver, target, save_loop.version(source.lora_params, 2), source.cfg, step=2)
    monkeypatch.undo()
    who = {"TrainCheckpointer": "TrainCheckpointer"}.get(saver, saver)
    assert e.value.errno == code and type(e.value) is type(OSError(code, ""))
    assert str(e.value).startswith(f"{who}: cannot write {target}: {cause}"), str(e.value)
    assert fix in str(e.value) and isinstance(e.value.__cause__, OSError)
    assert _written(locked) == before
    _assert_holds_version(saver, locked / "out", source, 1)


# --- unwritable paths ---------------------------------------------------------------------


@pytest.mark.parametrize("saver", ["save_adapter", "export_peft", "TrainCheckpointer"])
def test_a_path_under_a_file_is_one_clear_error_naming_the_file(tmp_path, saver):
    _, lora_params, cfg = _adapted()
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "sub" / "out"
    save = {
        "save_adapter": lambda: jaxlora.save_adapter(target, lora_params, cfg),
        "export_peft": lambda: jaxlora.export_peft(
            target, lora_params, cfg, module_map=jaxlora.peft_module_map()
        ),
        "TrainCheckpointer": lambda: jaxlora.TrainCheckpointer(target),
    }[saver]
    with pytest.raises(NotADirectoryError) as e:
        save()
    assert str(e.value) == (
        f"{saver}: cannot write {target}: {tmp_path / 'file'} is a file, not a directory. "
        "Choose a path whose parents are directories (or can be created)."
    )


# --- the README's tables -----------------------------------------------------------------


_TABLE_HEADER = "| bad input or fault | what jaxlora does |"


def test_readme_failure_tables_quote_messages_the_code_raises_and_tests_check():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Failure behaviour", 1)[1].split("\n## ", 1)[0]
    rows = [
        line
        for line in section.splitlines()
        if line.startswith("| ") and "---" not in line and line != _TABLE_HEADER
    ]
    assert section.count(_TABLE_HEADER) == 6  # one table per area
    assert len(rows) >= 40
    source = "".join(p.read_text() for p in (ROOT / "jaxlora").glob("*.py"))
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("*.py")).replace("\\", "")
    quoted = [q for row in rows for q in re.findall(r"`([^`]*)`", row.split(" | ")[1])]
    messages = [q for q in quoted if " " in q and not q.startswith(("allow_", "step."))]
    assert len(messages) >= 50
    missing = [m for m in messages if m not in source]
    assert not missing, f"README quotes messages the code no longer has: {missing}"
    untested = [m for m in messages if m not in tests]
    assert not untested, f"README quotes messages no test asserts: {untested}"


# --- bad arguments found by trying the public API: each was a raw error or silently lost --


def _checkpointer_save(tmp_path, steps=(1,), **kwargs):
    """Saves ``steps`` (each ``(step, kwargs)`` or a step) with a fresh TrainCheckpointer."""
    _, lora_params, _ = _adapted()
    opt_state = jaxlora.optimizer(optax.adam(1e-3), lora_params).init(lora_params)
    with jaxlora.TrainCheckpointer(tmp_path / "ckpt", async_save=False, **kwargs) as ckpt:
        for step in steps:
            step, extra = step if isinstance(step, tuple) else (step, {})
            ckpt.save(step, lora_params, opt_state, **{"rng": KEY, **extra})


def _import_onto_other_base(tmp_path):
    _, lora_params, cfg = _adapted()
    module_map = jaxlora.peft_module_map()
    jaxlora.export_peft(tmp_path / "peft", lora_params, cfg, module_map=module_map)
    other = models.MLP(features=(64, 48, 32)).init(KEY, X)["params"]
    jaxlora.import_peft(tmp_path / "peft", other, module_map=module_map)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda _: jaxlora.LoraConfig(targets=["dense_0", 1]),
            TypeError,
            "LoraConfig: targets holds [1], which are not strings; patterns are layer paths",
        ),
        (
            lambda _: jaxlora.LoraConfig(dtype="float77"),
            TypeError,
            "LoraConfig: dtype='float77' is not a dtype; use e.g. 'float32' or 'bfloat16'.",
        ),
        (
            lambda _: jaxlora.LoraConfig(dtype="int8"),
            ValueError,
            "LoraConfig: dtype='int8' cannot train (adapters need a floating dtype)",
        ),
        (
            lambda _: jaxlora.LoraModel(MODEL, None),
            TypeError,
            "LoraModel: config is a NoneType, not a LoraConfig; pass the config the params",
        ),
        (
            lambda _: jaxlora.combine(
                jaxlora.split(_adapted()[1])[0], jaxlora.split(_adapted()[0])[1]
            ),
            ValueError,
            "combine: trainable and frozen are not the two halves of one split:\n"
            "  dense_0/lora/a: only in trainable",
        ),
        (
            lambda _: jaxlora.unmerge(jaxlora.merge(_adapted()[1]), _adapted()[0]),
            ValueError,
            "unmerge: the second argument holds no LoRA adapters, so there is nothing to",
        ),
        (
            lambda _: jaxlora.optimizer("adam", _adapted()[1]),
            TypeError,
            "jaxlora.optimizer: tx is a str, not an optax transformation; pass one such as",
        ),
        (
            lambda _: jaxlora.make_train_step(None, optax.adam(1e-3)),
            TypeError,
            "make_train_step: loss_fn is a NoneType, not a function; pass loss_fn(params",
        ),
        (
            lambda _: jaxlora.peft_module_maps["gpt9"],
            KeyError,
            "peft_module_maps has no map 'gpt9'; it has ['bert', ",
        ),
        (
            lambda tmp: jaxlora.load_adapter(tmp, _adapted()[0], sharding="cpu"),
            TypeError,
            "load_adapter: sharding is a str, not a jax.sharding.Sharding; pass e.g.",
        ),
        (
            lambda tmp: (
                (tmp / "file").write_text("x")
                and jaxlora.save_adapter(tmp / "file", _adapted()[1], CONFIG)
            ),
            NotADirectoryError,
            "is a file, not a directory; refusing to replace it. Choose a new directory.",
        ),
        (
            lambda tmp: _checkpointer_save(tmp, max_to_keep=0),
            ValueError,
            "TrainCheckpointer: max_to_keep=0 must be None (keep all) or an int >= 1; orbax "
            "would delete every checkpoint right after saving it.",
        ),
        (
            lambda tmp: _checkpointer_save(tmp, save_interval_steps=0),
            ValueError,
            "TrainCheckpointer: save_interval_steps=0 must be an int >= 1 (1: every step).",
        ),
        (
            lambda tmp: _checkpointer_save(tmp, steps=[-3]),
            ValueError,
            "TrainCheckpointer.save: step=-3 must be an int >= 0 (the number of steps done).",
        ),
        (
            lambda tmp: _checkpointer_save(tmp, steps=[1.5]),
            TypeError,
            "TrainCheckpointer.save: step=1.5 must be an int >= 0",
        ),
        (
            lambda tmp: _checkpointer_save(tmp, steps=[(1, {"rng": 42})]),
            TypeError,
            "TrainCheckpointer.save: rng is a int, not a PRNG key; pass the key the run",
        ),
        (
            lambda tmp: _checkpointer_save(tmp, steps=[(1, {"data_state": [1, 2]})]),
            TypeError,
            "TrainCheckpointer.save: data_state is a list, not a dict; pass e.g.",
        ),
        (
            lambda _: jaxlora.lorafy(
                MODEL, _adapted()[0], jaxlora.LoraConfig(rank=100, targets=["dense_0"]), X, key=KEY
            ),
            ValueError,
            "lorafy: rank 100 for layer 'dense_0' exceeds min(fan_in=16, fan_out=64) of its "
            "weight (16, 64); use a smaller rank, or rank_pattern={'dense_0': ...}.",
        ),
        (
            lambda tmp: _import_onto_other_base(tmp),
            ValueError,
            "import_peft: layer 'dense_1' (dense.1): lora_B has shape (64, 4), expected (out, r) "
            "= (48, 4); the adapter was trained for another base (other layer sizes).",
        ),
    ],
    ids=[
        "non-string target",
        "not a dtype",
        "integer dtype",
        "LoraModel without config",
        "combine other trees",
        "unmerge without adapters",
        "optimizer not optax",
        "loss_fn not callable",
        "unknown module map",
        "sharding not a Sharding",
        "save_adapter onto a file",
        "max_to_keep=0",
        "save_interval_steps=0",
        "negative step",
        "float step",
        "rng not a key",
        "data_state not a dict",
        "rank above the fan",
        "PEFT adapter of another base",
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, call, error, message):
    with pytest.raises(error) as e:
        call(tmp_path)
    text = e.value.args[0]
    assert message in text, text
    assert type(e.value) is error


def test_a_step_before_the_newest_is_refused_not_silently_skipped(tmp_path):
    """orbax skips a step <= its newest: a run restarted at step 0 in an old directory
    would save nothing at all."""
    with pytest.raises(ValueError) as e:
        _checkpointer_save(tmp_path, steps=[5, 5, 1])  # the same step again is a no-op
    assert str(e.value) == (
        f"TrainCheckpointer.save: step 1 is before step 5, the newest in {tmp_path / 'ckpt'}; "
        "it would not be saved. Continue the step count of the run you resumed "
        "(restore_latest(...).step), or save to a new directory."
    )
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["5"]


def test_restoring_a_step_that_is_not_there_names_the_steps_that_are(tmp_path):
    _checkpointer_save(tmp_path, steps=[2, 4])
    _, lora_params, _ = _adapted()
    opt_state = jaxlora.optimizer(optax.adam(1e-3), lora_params).init(lora_params)
    with (
        jaxlora.TrainCheckpointer(tmp_path / "ckpt") as ckpt,
        pytest.raises(FileNotFoundError) as e,
    ):
        ckpt.restore(3, lora_params, opt_state)
    assert str(e.value) == (
        f"TrainCheckpointer.restore: no step 3 in {tmp_path / 'ckpt'}; the complete "
        "steps there are [2, 4] (restore_latest picks the newest)."
    )
