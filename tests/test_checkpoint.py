"""Adapter-only checkpoints and resumable training state (orbax), incl. real SIGKILLs."""

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from tests.support import models, train_resume

ROOT = Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)
X = jax.random.normal(KEY, (4, 16))


def _adapted(rank=4, **cfg_kwargs):
    """MLP params, adapted with non-zero B, and the config."""
    model = models.MLP(features=(64, 64, 32))
    params = model.init(KEY, X)["params"]
    cfg = jaxlora.LoraConfig(rank=rank, targets=["dense_0", "dense_1"], **cfg_kwargs)
    lora_model, lora_params = jaxlora.lorafy(model, params, cfg, X, key=KEY)
    trainable, frozen = jaxlora.split(lora_params)
    trainable = jax.tree.map(lambda x: x + 0.01 * jnp.arange(x.size).reshape(x.shape), trainable)
    return model, params, cfg, lora_model, jaxlora.combine(trainable, frozen)


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_adapter_round_trip_is_exact_and_needs_no_config(tmp_path):
    model, params, cfg, lora_model, lora_params = _adapted(
        rank_pattern={"dense_1": 2}, alpha_pattern={"dense_0": 4.0}, modules_to_save=["dense_2"]
    )
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    with jax.numpy_dtype_promotion("strict"):
        loaded_cfg, loaded = jaxlora.load_adapter(tmp_path / "adapter", params)
    assert loaded_cfg == cfg
    chex.assert_trees_all_equal(loaded, lora_params)
    assert jax.tree.structure(loaded) == jax.tree.structure(lora_params)
    y = jaxlora.LoraModel(model, loaded_cfg).apply({"params": loaded}, X)
    chex.assert_trees_all_equal(y, lora_model.apply({"params": lora_params}, X))
    _, variables = jaxlora.load_adapter(tmp_path / "adapter", {"params": params})
    chex.assert_trees_all_equal(variables["params"], lora_params)


def test_load_replaces_the_adapters_of_an_adapted_tree(tmp_path):
    _, params, cfg, _, trained = _adapted(modules_to_save=["dense_2"])
    jaxlora.save_adapter(tmp_path / "adapter", trained, cfg)
    _, fresh = jaxlora.lorafy(models.MLP(features=(64, 64, 32)), params, cfg, X, key=KEY)
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", fresh)
    chex.assert_trees_all_equal(loaded, trained)


class _Boxed(nn.Module):
    """A Dense whose kernel carries ``nn.Partitioned`` sharding names."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        return nn.Dense(32, kernel_init=init, name="up")(x)


def test_loaded_factors_are_boxed_like_lorafy_boxes_them(tmp_path):
    params = _Boxed().init(KEY, X)["params"]
    cfg = jaxlora.LoraConfig(rank=2, targets=["up"])
    _, lora_params = jaxlora.lorafy(_Boxed(), params, cfg, X, key=KEY)
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", params)
    chex.assert_trees_all_equal(loaded, lora_params)
    assert jax.tree.structure(loaded) == jax.tree.structure(lora_params)


def test_bytes_on_disk_are_the_adapter_bytes_plus_a_small_record(tmp_path):
    model = models.MLP(features=(256, 256, 256))
    x = jnp.zeros((1, 256))
    params = model.init(KEY, x)["params"]
    cfg = jaxlora.LoraConfig(rank=16, targets=["dense_0", "dense_1"], modules_to_save=["dense_2"])
    _, lora_params = jaxlora.lorafy(model, params, cfg, x, key=KEY)
    trainable, frozen = jaxlora.split(lora_params)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(KEY, len(leaves))
    noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    lora_params = jaxlora.combine(jax.tree.unflatten(treedef, noise), frozen)
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    adapter_bytes, disk = _tree_bytes(trainable), _disk_bytes(tmp_path / "adapter")
    print(f"adapter {adapter_bytes} B, on disk {disk} B, base {_tree_bytes(params)} B")
    # orbax's zstd gains ~7% on normal floats (their exponents repeat), never 10%; the
    # record and orbax's metadata files take ~7 KiB
    assert 0.9 * adapter_bytes <= disk <= adapter_bytes + 8 * 1024, (disk, adapter_bytes)


def test_restored_factors_follow_the_base_kernel_sharding(tmp_path):
    _, params, cfg, _, lora_params = _adapted(modules_to_save=["dense_2"])
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharded = jax.tree.map(
        lambda x: jax.device_put(
            x, NamedSharding(mesh, P("data", "model") if x.ndim == 2 else P("model"))
        ),
        params,
    )
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", sharded)
    adapter = loaded["dense_0"]["lora"]
    assert adapter.a.sharding.spec == P("data", None)
    assert adapter.b.sharding.spec == P(None, "model")
    assert loaded["dense_2"]["kernel"].value.sharding.spec == P("data", "model")
    chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(lora_params))
    jaxlora.save_adapter(tmp_path / "adapter", loaded, cfg)  # sharded arrays save as well
    chex.assert_trees_all_equal(jaxlora.load_adapter(tmp_path / "adapter", params)[1], lora_params)
    replicated = NamedSharding(mesh, P())
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", params, sharding=replicated)
    assert loaded["dense_1"]["lora"].b.sharding == replicated


def test_another_base_or_missing_layers_are_errors(tmp_path):
    _, _, cfg, _, lora_params = _adapted()
    jaxlora.save_adapter(tmp_path / "adapter", lora_params, cfg)
    other = models.MLP(features=(64, 48, 32)).init(KEY, X)["params"]
    with pytest.raises(ValueError, match=r"layer 'dense_1' has kernel \(64, 48\).*\(64, 64\)"):
        jaxlora.load_adapter(tmp_path / "adapter", other)
    smaller = models.MLP(features=(64,)).init(KEY, X)["params"]
    with pytest.raises(ValueError, match=r"(?s)'dense_1': no such layer.*allow_unmatched=True"):
        jaxlora.load_adapter(tmp_path / "adapter", smaller)
    with pytest.warns(UserWarning, match=r"(?s)partially.*'dense_1'"):
        _, loaded = jaxlora.load_adapter(tmp_path / "adapter", smaller, allow_unmatched=True)
    chex.assert_trees_all_equal(loaded["dense_0"]["lora"], lora_params["dense_0"]["lora"])


def test_loading_never_leaves_an_adapter_of_the_target_untouched(tmp_path):
    model, params, _, _, lora_params = _adapted()
    only_first = jaxlora.LoraConfig(rank=4, targets=["dense_0"])
    _, first = jaxlora.lorafy(model, params, only_first, X, key=KEY)
    jaxlora.save_adapter(tmp_path / "first", first, only_first)
    with pytest.raises(ValueError, match=r"'dense_1' has an adapter that .* does not replace"):
        jaxlora.load_adapter(tmp_path / "first", lora_params)


# When tensorstore fails a read, orbax's restore raises (which we turn into a ValueError) and
# leaves futures that complain, on garbage collection, that their event loop is closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_truncated_or_half_written_adapters_never_load(tmp_path):
    _, params, cfg, _, lora_params = _adapted()
    adapter = tmp_path / "adapter"
    jaxlora.save_adapter(adapter, lora_params, cfg)
    for data in (adapter / "arrays").rglob("d/*"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        jaxlora.load_adapter(adapter, params)

    half = tmp_path / "half.orbax-checkpoint-tmp-123"
    shutil.copytree(adapter, half)
    with pytest.raises(FileNotFoundError, match="no adapter"):
        jaxlora.load_adapter(tmp_path / "half", params)
    (adapter / "record" / "metadata").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a jaxlora adapter"):
        jaxlora.load_adapter(adapter, params)
    with pytest.raises(ValueError, match="not an adapter written by jaxlora"):
        jaxlora.load_adapter(tmp_path, params)


def _saved_and_doubled(tmp_path):
    """An adapter saved at ``tmp_path/adapter`` and a second version with doubled leaves."""
    _, params, cfg, _, old = _adapted()
    trainable, frozen = jaxlora.split(old)
    new = jaxlora.combine(jax.tree.map(lambda x: x * 2, trainable), frozen)
    adapter = tmp_path / "adapter"
    jaxlora.save_adapter(adapter, old, cfg)
    return params, cfg, old, new, adapter


def test_saving_over_an_adapter_is_atomic(tmp_path, monkeypatch):
    params, cfg, old, new, adapter = _saved_and_doubled(tmp_path)

    real_save = ocp.Checkpointer.save

    def crash_after_writing(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise KeyboardInterrupt("killed before the new adapter was installed")

    monkeypatch.setattr(ocp.Checkpointer, "save", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        jaxlora.save_adapter(adapter, new, cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    chex.assert_trees_all_equal(jaxlora.load_adapter(adapter, params)[1], old)
    jaxlora.save_adapter(adapter, new, cfg)
    chex.assert_trees_all_equal(jaxlora.load_adapter(adapter, params)[1], new)

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an adapter saved by jaxlora; refusing"):
        jaxlora.save_adapter(tmp_path / "notes", new, cfg)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_failed_install_keeps_the_old_adapter(tmp_path, monkeypatch):
    """If moving the new version in fails, the old one is put back, not deleted."""
    params, cfg, old, new, adapter = _saved_and_doubled(tmp_path)
    real_rename = jaxlora._files.os.rename

    def failing_install(src, dst):
        if Path(dst) == adapter.absolute() and Path(src).name == "adapter":  # the new version
            raise OSError("disk full while installing the new adapter")
        real_rename(src, dst)

    monkeypatch.setattr(jaxlora._files.os, "rename", failing_install)
    with pytest.raises(OSError, match="disk full"):
        jaxlora.save_adapter(adapter, new, cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    chex.assert_trees_all_equal(jaxlora.load_adapter(adapter, params)[1], old)


def test_interrupted_swap_is_reported_with_both_copies(tmp_path):
    _, params, cfg, _, lora_params = _adapted()
    adapter = tmp_path / "adapter"
    jaxlora.save_adapter(adapter, lora_params, cfg)
    staging = tmp_path / ".adapter.staging-x"
    staging.mkdir()
    adapter.rename(staging / "previous")  # killed between the two renames of a re-save
    with pytest.raises(FileNotFoundError, match=r"interrupted.*previous"):
        jaxlora.load_adapter(adapter, params)


def test_config_that_does_not_describe_the_params_is_rejected(tmp_path):
    _, _, _, _, lora_params = _adapted()
    with pytest.raises(ValueError, match="'dense_0' has rank 4 but the config gives rank 8"):
        jaxlora.save_adapter(tmp_path / "a", lora_params, jaxlora.LoraConfig(rank=8))
    with pytest.raises(ValueError, match="hold no LoRA adapters"):
        jaxlora.save_adapter(tmp_path / "a", {"dense_0": {"kernel": jnp.ones((2, 2))}}, None)


# ----------------------------------------------------------------------------- TrainCheckpointer


def _training():
    params, opt_state, _, step = train_resume.setup()
    return params, opt_state, step


@pytest.mark.parametrize("rng", [jax.random.key(5), jax.random.PRNGKey(5)], ids=["typed", "raw"])
def test_train_checkpointer_round_trip_interval_and_retention(tmp_path, rng):
    params, opt_state, step = _training()  # donated to the step: the template is a fresh copy
    template = _training()[:2]
    saved = {}
    with jaxlora.TrainCheckpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        assert ckpt.restore_latest(*template) is None
        for i in range(1, 6):
            data = train_resume.batch({"seed": 0, "position": i})
            params, opt_state, _ = step(params, opt_state, data, jax.random.key(i))
            started = ckpt.save(i, params, opt_state, rng, {"position": i}, force=i == 5)
            assert started == (i in (1, 5) or i % 2 == 0)  # the first save always happens
            saved[i] = jax.device_get((params, opt_state))
        resumed = ckpt.restore_latest(*template)
        assert ckpt.latest_step == 5
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 5]
    assert resumed.step == 5 and resumed.data_state == {"position": 5}
    chex.assert_trees_all_equal((resumed.params, resumed.opt_state), saved[5])
    chex.assert_trees_all_equal(resumed.rng, rng)
    with jaxlora.TrainCheckpointer(tmp_path) as ckpt:
        chex.assert_trees_all_equal(ckpt.restore(4, *template)[1:3], saved[4])


def test_train_checkpointer_off_interval_steps_leave_the_save_in_flight(tmp_path, monkeypatch):
    params, opt_state, _ = _training()
    rng = jax.random.key(0)
    with jaxlora.TrainCheckpointer(tmp_path, save_interval_steps=4) as ckpt:
        assert ckpt.save(0, params, opt_state, rng)
        waited, wait = [], ckpt.wait
        monkeypatch.setattr(ckpt, "wait", lambda: (waited.append(True), wait())[1])
        assert not any(ckpt.save(i, params, opt_state, rng) for i in (1, 2, 3))
        assert waited == []  # step 0's asynchronous save overlaps the steps off the interval
        assert ckpt.save(4, params, opt_state, rng)
        assert waited == [True]
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [0, 4]


def test_train_checkpointer_rejects_other_models_and_bad_data_state(tmp_path):
    params, opt_state, _ = _training()
    with jaxlora.TrainCheckpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(ValueError, match="data_state must be JSON-serialisable"):
            ckpt.save(1, params, opt_state, KEY, {"sampler": object()})
        ckpt.save(1, params, opt_state, KEY, {})
        other = jaxlora.LoraConfig(rank=4, targets=["dense_*"], modules_to_save=["head"])
        model = train_resume.MLP()
        base = model.init(KEY, jnp.zeros((2, train_resume.FEATURES)))["params"]
        _, wider = jaxlora.lorafy(model, base, other, jnp.zeros((2, 8)), key=KEY)
        expected = r"params/dense_0/lora/a: saved float32\(8, 2\), expected float32\(8, 4\)"
        with pytest.raises(ValueError, match=expected):
            ckpt.restore_latest(wider, jaxlora.optimizer(optax.adam(1e-2), wider).init(wider))
        with pytest.raises(ValueError, match="hold nothing that trains"):
            ckpt.save(2, base, opt_state, KEY)


def test_half_written_step_is_never_restored(tmp_path):
    params, opt_state, _ = _training()
    with jaxlora.TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(3, params, opt_state, KEY, {"position": 3})
    shutil.copytree(tmp_path / "3", tmp_path / "4.orbax-checkpoint-tmp-99")
    with jaxlora.TrainCheckpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(params, opt_state).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_train_checkpointer_takes_nnx_trainable_state(tmp_path):
    model = models.NnxModel(nnx.Rngs(0))
    jaxlora.lorafy(
        model,
        jaxlora.LoraConfig(rank=2, exclude=["head"], modules_to_save=["head"]),
        rngs=nnx.Rngs(1),
    )
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jaxlora.TrainableParam)
    state = nnx.state(model, jaxlora.TrainableParam)
    opt_state = nnx.state(optimizer, nnx.optimizer.OptState)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    saved_state = jax.tree.map(jnp.copy, state)
    saved_outputs = model(ids)
    with jaxlora.TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, state, opt_state, KEY, {"epoch": 1})
        zeros = jax.tree.map(jnp.zeros_like, (state, opt_state))
        resumed = ckpt.restore_latest(*zeros)
    chex.assert_trees_all_equal((resumed.params, resumed.opt_state), (state, opt_state))
    nnx.update(model, zeros[0])  # the model forgets its trained leaves...
    assert not jnp.array_equal(model(ids)[0], saved_outputs[0])
    nnx.update(model, resumed.params)  # ...and gets them back from the checkpoint
    chex.assert_trees_all_equal(nnx.state(model, jaxlora.TrainableParam), saved_state)
    chex.assert_trees_all_equal(model(ids), saved_outputs)


def _run(directory, steps, out, stderr):
    args = [str(directory), "--steps", str(steps), "--out", str(out)]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.train_resume", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def _kill_after(proc, line: str, delay: float = 0.0) -> list[str]:
    """SIGKILLs ``proc`` ``delay`` seconds after it prints ``line``; returns what it printed."""
    seen = []
    for out in proc.stdout:
        seen.append(out.strip())
        if seen[-1] == line:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, seen
    return seen


def _complete_steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _assert_step_is_the_reference(directory: Path, step: int) -> None:
    """The checkpoint at ``step`` holds exactly what an uninterrupted run has after it."""
    params, opt_state, _ = _training()
    with jaxlora.TrainCheckpointer(directory) as ckpt:
        restored = ckpt.restore(step, params, opt_state)
    assert restored.data_state == {**train_resume.DATA_STATE, "position": step}
    expected = train_resume.train(None, step)
    chex.assert_trees_all_equal(train_resume.trainable_leaves(restored.params), expected)


def test_sigkill_mid_save_and_mid_training_resume_bit_identically(tmp_path):
    steps, rng = 10, random.Random(373)
    reference = train_resume.train(None, steps)
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.npz"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        # 1. killed right after save(3) started. The save takes ~100 ms, so in practice step 3
        # is left half-written in a tmp directory; it must not be resumed from. Either way
        # the newest complete step is exactly the uninterrupted run's.
        printed = _kill_after(_run(ckpt, steps, out, stderr), "SAVING 3")
        complete = _complete_steps(ckpt)
        in_flight = [p.name for p in ckpt.iterdir() if not p.name.isdigit()]
        assert printed[0] == "FRESH" and complete[-1] in (2, 3), (complete, in_flight)
        assert (complete[-1] == 2) == any(n.startswith("3.orbax-checkpoint-tmp") for n in in_flight)
        _assert_step_is_the_reference(ckpt, complete[-1])
        # 2. resumes from the newest complete step; killed at a seeded random time later on.
        proc = _run(ckpt, steps, out, stderr)
        first = proc.stdout.readline().strip()
        assert first == f"RESUMED {complete[-1]}", (first, complete, in_flight)
        killed_at = complete[-1] + 1
        _kill_after(proc, f"SAVING {killed_at}", delay=rng.uniform(0, 0.1))
        complete = _complete_steps(ckpt)
        assert killed_at - 1 <= complete[-1] <= steps, (complete, killed_at)
        _assert_step_is_the_reference(ckpt, complete[-1])
        # 3. runs to the end.
        proc = _run(ckpt, steps, out, stderr)
        printed = proc.communicate()[0].split("\n")
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert printed[0] == f"RESUMED {complete[-1]}"
    assert _complete_steps(ckpt) == [steps - 1, steps]
    with np.load(out, allow_pickle=False) as final:
        chex.assert_trees_all_equal(dict(final), reference)
