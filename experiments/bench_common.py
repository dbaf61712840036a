"""Framework-free pieces shared by the benchmark harness and its per-framework runners.

Nothing here imports JAX or PyTorch, so each benchmark child loads only its own framework.
"""

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import jax
import numpy as np

TARGETS = {"qv": ("query", "value"), "all": ("query", "key", "value", "out", "up", "down")}
"""LoRA target layer names per setting; ``"full"`` trains every weight, ``FROZEN`` none."""

FROZEN = "frozen"
"""The floor setting: no adapters, and only ``FLOOR_PARAM`` (the position table) trains."""

FLOOR_PARAM = "wpe"

MODELS = ("gpt2", "gpt2-einsum", "gpt2-moe")
"""The linen models: ``gpt2.GPT2`` (``nn.Dense`` layers), ``gpt2_einsum.GPT2`` (the same model
written with its own einsum modules) and its mixture-of-experts variant."""

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01

SWITCHES = 10
"""Adapter switches timed per child by the rows that report ``switch_ms``."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """Every dimension of the benchmark workload (each one is a CLI flag).

    Attributes:
        vocab: Vocabulary size.
        d_model: Residual stream width.
        layers: Number of decoder blocks.
        heads: Attention heads.
        mlp: MLP hidden width.
        seq: Sequence length.
        batch: Batch size.
        rank: LoRA rank.
        alpha: LoRA alpha (the update is scaled by ``alpha / rank``).
        attention: ``"causal"``, or ``"none"`` to leave the softmax attention out of every
            model (a diagnostic: what remains is the linear layers LoRA touches).
        model: One of ``MODELS`` (the JAX linen rows; the NNX and torch rows mirror ``gpt2``).
            The benchmark harness takes a comma-separated list and runs every job on each.
        experts: Experts per MLP of ``gpt2-moe``.
        top_k: Experts per token of ``gpt2-moe``; each expert's hidden width is
            ``mlp // top_k``, so a token's active expert FLOPs equal the dense MLP's.
        adapters: Adapters in the bank of the ``jaxlora-mixed*`` rows (K), each example of a
            batch using one drawn uniformly; the harness takes a comma-separated list.
        steps: Timed steps per child process.
        warmup: Untimed steps before them (the first one compiles).
    """

    vocab: int = 8192
    d_model: int = 512
    layers: int = 6
    heads: int = 8
    mlp: int = 2048
    seq: int = 128
    batch: int = 8
    rank: int = 8
    alpha: float = 16.0
    attention: str = dataclasses.field(default="causal", metadata={"choices": ("causal", "none")})
    model: str = dataclasses.field(default="gpt2", metadata={"choices": MODELS})
    experts: int = 4
    top_k: int = 2
    adapters: str = "1,4,16"
    steps: int = 20
    warmup: int = 3


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one child process measured.

    Attributes:
        times_s: Wall time of each timed step (or forward pass), in seconds.
        total_params: Number of parameters, adapters included.
        trainable_params: Number of parameters the optimizer updates (``None`` for inference).
        opt_state_floats: Number of array elements in the optimizer state, step counters
            included (``None`` for inference).
        opt_state_scalars: How many of those elements are 0-d step counters.
        gflops: XLA's FLOP count of the compiled step, in GFLOP (``None`` outside JAX).
        base_param_bytes: Bytes of the model's own parameters as stored, adapters left out
            (a quantized base counts its codes and scales; ``None`` where not measured).
        switch_times_s: Wall time of each of ``SWITCHES`` adapter switches: selecting the
            next adapter plus the first forward pass after it (``None`` where not measured).
        compilations: XLA compilations from the first forward pass of the switching
            function through all switches (JAX rows that switch; one per structure: 1).
    """

    times_s: list[float]
    total_params: int
    trainable_params: int | None = None
    opt_state_floats: int | None = None
    opt_state_scalars: int | None = None
    gflops: float | None = None
    base_param_bytes: int | None = None
    switch_times_s: list[float] | None = None
    compilations: int | None = None


def csv_of(choices: Sequence[str] | None) -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type`` for a comma-separated subset of ``choices`` (``None``: positive
    integers)."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t for t in text.split(",") if t)
        if choices is None:
            unknown = [t for t in items if not (t.isdigit() and int(t) > 0)]
        else:
            unknown = [t for t in items if t not in choices]
        if unknown:
            valid = ",".join(choices) if choices else "positive integers"
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {valid}")
        return items

    return parse


def add_workload_flags(
    parser: argparse.ArgumentParser, *, several: Collection[str] = (), **defaults: Any
) -> None:
    """Adds a ``--flag`` for every :class:`Workload` field; ``defaults`` override its defaults.

    The flags of the fields named in ``several`` take a comma-separated list of their choices
    (the value stays one string, e.g. ``"gpt2,gpt2-einsum"``).
    """
    for f in dataclasses.fields(Workload):
        choices = f.metadata.get("choices")
        kind = f.type
        if f.name in several:
            kind, choices = (lambda text, c=choices: ",".join(csv_of(c)(text))), None
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            choices=choices,
            default=defaults.get(f.name, f.default),
            help="default: %(default)s" + (" (comma-separated)" if f.name in several else ""),
        )


def workload_of(args: argparse.Namespace) -> Workload:
    """The :class:`Workload` of parsed :func:`add_workload_flags` flags."""
    return Workload(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)})


def cpu_count() -> int:
    """Number of CPUs this process may run on (what XLA's CPU thread pool uses)."""
    return len(os.sched_getaffinity(0))


def token_batch(w: Workload) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random batch of next-token prediction data.

    Args:
        w: The workload.

    Returns:
        ``(tokens, targets)``, both int32 of shape ``(batch, seq)``; targets are tokens shifted
        by one.
    """
    ids = np.random.default_rng(0).integers(0, w.vocab, (w.batch, w.seq + 1), dtype=np.int32)
    return ids[:, :-1], ids[:, 1:]


def time_calls(call: Callable[[], Any], w: Workload) -> list[float]:
    """Calls ``call`` ``w.warmup + w.steps`` times and times the last ``w.steps`` calls.

    Args:
        call: One training step (or forward pass); it must block until its results are ready.
        w: The workload.

    Returns:
        Wall times in seconds, one per timed call.
    """
    times = []
    for _ in range(w.warmup + w.steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times[w.warmup :]


def adapter_ids(w: Workload) -> np.ndarray:
    """Which adapter each example of the batch uses in the mixed-adapter rows: ``(batch,)``
    int32 in ``1..K`` (``K = int(w.adapters)``), drawn uniformly, the same for every framework."""
    return np.random.default_rng(100).integers(1, int(w.adapters) + 1, w.batch, dtype=np.int32)


def time_switches(switch_to: Callable[[int], Any], count: int) -> list[float]:
    """Times ``SWITCHES`` adapter switches, round robin over ``count`` adapters.

    Args:
        switch_to: Selects adapter ``i`` (``0..count-1``) and runs one forward pass with it,
            blocking until its output is ready.
        count: How many adapters there are to switch among.

    Returns:
        Wall times in seconds, one per switch; the first switch selects adapter ``1 % count``.
    """
    times = []
    for i in range(1, SWITCHES + 1):
        start = time.perf_counter()
        switch_to(i % count)
        times.append(time.perf_counter() - start)
    return times


def stored_bytes(arrays: Iterable[Any]) -> int:
    """Bytes of JAX or NumPy ``arrays`` as stored (4-bit types count half a byte)."""
    return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in arrays)


def array_counts(arrays: Iterable[Any]) -> tuple[int, int]:
    """Counts elements of arrays (anything with a ``.shape``: NumPy, JAX, torch).

    Args:
        arrays: The arrays, e.g. the leaves of an optimizer state.

    Returns:
        ``(elements, scalars)``: the total number of elements, and how many arrays are 0-d.
    """
    shapes = [tuple(a.shape) for a in arrays]
    return sum(math.prod(s) for s in shapes), sum(not s for s in shapes)
