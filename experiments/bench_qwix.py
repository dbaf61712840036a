"""Qwix benchmark runners: Qwix's LoRA and QLoRA, as Tunix and MaxText train with them.

Qwix (``pip install qwix``; an optional peer, like torch) adapts a model by intercepting
its ``dot_general``/``einsum`` calls: ``qwix.LoraProvider`` rules pick the modules by path
and ``qwix.apply_lora_to_model`` rebuilds the NNX model with ``nnx.LoRAParam`` factors.
Tunix then trains with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``, as
``bench_jax.measure_nnx`` does. ``qwix-qlora`` adds ``weight_qtype="nf4"`` (4-bit
NormalFloat codes, one absmax scale per 64 inputs of each output: QLoRA's block size),
so the targeted kernels are stored as codes and scales and dequantized in the step.
"""

import jax
import qwix
from flax import nnx

from experiments import gpt2
from experiments.bench_common import TARGETS, Measurement, Workload
from experiments.bench_jax import device_batch, measure_nnx, model_config

NF4_BLOCK = 64  # QLoRA's (and bitsandbytes') NF4 block size


def qwix_model(setting: str, w: Workload, weight_qtype: str | None) -> nnx.Module:
    """The NNX GPT-2 with Qwix LoRA (on ``weight_qtype`` storage) on ``setting``'s layers."""
    model = gpt2.NNXGPT2(model_config(w), (), w.rank, nnx.Rngs(0))
    quantized = {"weight_qtype": weight_qtype, "tile_size": NF4_BLOCK} if weight_qtype else {}
    provider = qwix.LoraProvider(
        module_path=rf"(.*\W)?({'|'.join(TARGETS[setting])})",
        rank=w.rank,
        alpha=w.alpha,
        **quantized,
    )
    tokens, _ = device_batch(w)
    return qwix.apply_lora_to_model(model, provider, tokens, rngs=nnx.Rngs(1))


def run_qwix(weight_qtype: str | None):
    """The runner of ``qwix-lora`` (``None``) or ``qwix-qlora`` (``"nf4"``)."""

    def run(setting: str, w: Workload) -> Measurement:
        model = qwix_model(setting, w, weight_qtype)
        adapted = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) // 2
        expected = len(TARGETS[setting]) * w.layers
        if adapted != expected:  # a path pattern that matches nothing would measure no LoRA
            raise RuntimeError(f"Qwix adapted {adapted} layers, expected {expected}")
        return measure_nnx(model, nnx.LoRAParam, w)

    return run


RUNNERS = {"qwix-lora": run_qwix(None), "qwix-qlora": run_qwix("nf4")}
