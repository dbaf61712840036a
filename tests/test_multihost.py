"""A real two-process run: ``jax.distributed`` over localhost, 2 processes x 4 CPU devices.

Both processes form one ``data=2,model=4`` mesh, train sharded adapters, checkpoint the
training state, save the adapter (over an older one) and export it to PEFT, every process
writing its shards; a fresh pair of processes resumes from the checkpoint, loads the
adapter and imports the export; every number matches one process driving all 8 devices.
Last, a save in which one process fails leaves the saved adapter intact and fails fast.
Processes run in their own session and are SIGKILLed (JAX catches SIGTERM) on failure,
timeout or test exit, so none is left behind.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

import jaxlora
from tests.support import multihost_worker as worker

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, STEPS, TIMEOUT_S = 2, 2, 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _logs(directory: Path, phase: str) -> str:
    return "\n".join(
        f"--- process {i}:\n" + (directory / f"{phase}.{i}.log").read_text()[-3000:]
        for i in range(PROCESSES)
    )


@contextlib.contextmanager
def _launch(directory: Path, phase: str):
    """Starts the worker processes of ``phase``; yields a function waiting for their result."""
    port = _free_port()
    procs = []
    try:
        for i in range(PROCESSES):
            env = {
                **os.environ,
                "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                "JAX_PLATFORMS": "cpu",
                "PYTHONPATH": str(ROOT),
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(PROCESSES),
                "JAX_PROCESS_ID": str(i),
            }
            cmd = [sys.executable, "-m", "tests.support.multihost_worker", str(directory)]
            cmd += ["--phase", phase, "--steps", str(STEPS), "--out", str(directory / phase)]
            with open(directory / f"{phase}.{i}.log", "w") as log:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        yield lambda: _result(procs, directory, phase)
    finally:
        _kill(procs)


def _result(procs: list[subprocess.Popen], directory: Path, phase: str) -> dict:
    """Waits for every process; fails fast when one fails, and on timeout."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            _kill(procs)
            why = "a process failed" if failed else f"no result within {TIMEOUT_S} s"
            pytest.fail(f"{phase}: {why}.\n{_logs(directory, phase)}")
        time.sleep(0.2)
    if any(p.returncode for p in procs):
        pytest.fail(
            f"{phase}: exit codes {[p.returncode for p in procs]}.\n{_logs(directory, phase)}"
        )
    return json.loads((directory / phase).read_text())


def _close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
    assert jax.device_count() == 8
    mesh = jaxlora.parse_mesh(worker.MESH)
    with _launch(tmp_path, "train") as train_result:
        # The one-process reference runs while the two processes start up.
        run, losses = worker.train(mesh, worker.setup(mesh), 0, STEPS)
        saved = worker.trainable_leaves(run.params)
        run, more = worker.train(mesh, run, STEPS, STEPS)
        train = train_result()
    assert "does not split the batch between processes [0, 1]" in train["unsplit_axis_error"]
    np.testing.assert_allclose(train["losses"], losses, rtol=1e-5)
    _close(train["trainable"], saved)
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]
    # What the two processes saved loads in one process too.
    _, loaded = jaxlora.load_adapter(tmp_path / "adapter", run.base)
    chex.assert_trees_all_equal(worker.trainable_leaves(loaded), train["trainable"])
    with _launch(tmp_path, "resume") as resume_result:
        resumed = resume_result()
    chex.assert_trees_all_equal(resumed["restored"], train["trainable"])
    chex.assert_trees_all_equal(resumed["loaded"], train["trainable"])
    chex.assert_trees_all_equal(resumed["imported"], train["trainable"])
    assert resumed["rng"] == np.asarray(jax.random.key_data(run.rng)).tolist()
    np.testing.assert_allclose(resumed["losses"], more, rtol=1e-5)
    _close(resumed["trainable"], worker.trainable_leaves(run.params))
    # One process failing mid-save: the other hears of it at once (no barrier timeout), and
    # the adapter already on disk is left as it was.
    assert resumed["partial_write"].startswith("RuntimeError: process(es) [1] failed to write")
    assert "OSError: disk full on process 1" in (tmp_path / "resume.1.log").read_text()
    _, after = jaxlora.load_adapter(tmp_path / "adapter", run.base)
    chex.assert_trees_all_equal(worker.trainable_leaves(after), train["trainable"])
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]


def test_mismatched_process_counts_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"process_id=2 is outside \[0, 2\)"):
        jaxlora.initialize_distributed("127.0.0.1:1", num_processes=2, process_id=2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"needs num_processes and process_id.*JAX_PROCESS_ID"):
        jaxlora.initialize_distributed(num_processes=2)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: None)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"num_processes=3, but the run formed with 2"):
        jaxlora.initialize_distributed(num_processes=3, process_id=0)
    with pytest.raises(ValueError, match=r"'data=2,model=2' has 4 devices but JAX sees 8"):
        jaxlora.parse_mesh("data=2,model=2")
