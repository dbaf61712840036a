"""PyTorch runners: PEFT LoRA (``torch-peft``) and DoRA (``torch-peft-dora``), full fine-tuning
(``torch-full``), the floor.

Eager mode with ``torch.optim.AdamW`` defaults (no ``torch.compile``, no fused optimizer), as a
PEFT user would run it. ``torch.set_num_threads`` is set to the CPU count XLA uses.
"""

import functools
from collections.abc import Callable

import peft
import torch
import torch.nn.functional as F
from torch import nn

from experiments.bench_common import (
    FLOOR_PARAM,
    FROZEN,
    LEARNING_RATE,
    TARGETS,
    WEIGHT_DECAY,
    Measurement,
    Workload,
    array_counts,
    cpu_count,
    time_calls,
    token_batch,
)
from experiments.gpt2_torch import GPT2


def build_model(setting: str, w: Workload, dora: bool = False) -> nn.Module:
    """The torch GPT-2: PEFT LoRA (DoRA with ``dora``) on the setting's targets, all trainable
    for ``"full"``, or only the position table for ``FROZEN`` (the floor)."""
    torch.manual_seed(0)
    model = GPT2(w.vocab, w.d_model, w.layers, w.heads, w.mlp, w.seq, w.attention)
    if setting == FROZEN:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(f"{FLOOR_PARAM}."))
    if setting not in TARGETS:
        return model
    config = peft.LoraConfig(
        r=w.rank,
        lora_alpha=w.alpha,
        target_modules=list(TARGETS[setting]),
        lora_dropout=0.0,
        use_dora=dora,
    )
    return peft.get_peft_model(model, config)


def training(
    setting: str, w: Workload, dora: bool = False
) -> tuple[Callable[[], None], nn.Module, torch.optim.Optimizer]:
    """One eager training step as a call, with the model and ``torch.optim.AdamW`` it updates."""
    torch.set_num_threads(cpu_count())
    model = build_model(setting, w, dora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    tokens, targets = (torch.from_numpy(a).long() for a in token_batch(w))

    def call() -> None:
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return call, model, optimizer


def run(setting: str, w: Workload, dora: bool = False) -> Measurement:
    """Measures eager training steps of :func:`build_model` with ``torch.optim.AdamW``."""
    call, model, optimizer = training(setting, w, dora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    times = time_calls(call, w)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    floats, scalars = array_counts(state)
    return Measurement(
        times,
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in trainable),
        opt_state_floats=floats,
        opt_state_scalars=scalars,
    )


RUNNERS = {
    "torch-peft": run,
    "torch-peft-dora": functools.partial(run, dora=True),
    "torch-full": run,
    "torch-floor": run,
}
