"""PyTorch runners: PEFT LoRA (``torch-peft``) and DoRA (``torch-peft-dora``), full fine-tuning
(``torch-full``), the floor, PEFT's forward pass with one adapter (``torch-peft-fwd``) and with
a batch mixing K adapters (``torch-peft-mixed``, PEFT's ``adapter_names=``).

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
    adapter_ids,
    array_counts,
    cpu_count,
    time_calls,
    time_switches,
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
    return peft.get_peft_model(model, lora_config(setting, w, dora))


def lora_config(setting: str, w: Workload, dora: bool = False) -> peft.LoraConfig:
    """PEFT's config of the LoRA ``setting`` (``"qv"`` or ``"all"``), DoRA with ``dora``."""
    return peft.LoraConfig(
        r=w.rank,
        lora_alpha=w.alpha,
        target_modules=list(TARGETS[setting]),
        lora_dropout=0.0,
        use_dora=dora,
    )


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


def run_forward(setting: str, w: Workload) -> Measurement:
    """``torch-peft-fwd``: the eager forward pass of the PEFT model with one adapter."""
    torch.set_num_threads(cpu_count())
    model = build_model(setting, w).eval()
    tokens = torch.from_numpy(token_batch(w)[0]).long()
    with torch.inference_mode():
        times = time_calls(lambda: model(tokens), w)
    return Measurement(times, total_params=sum(p.numel() for p in model.parameters()))


def run_forward_mixed(setting: str, w: Workload) -> Measurement:
    """``torch-peft-mixed``: PEFT's mixed-batch forward (``adapter_names=``, one adapter per
    example, the ids of ``adapter_ids``) on a model holding K adapters; switching the whole
    batch from adapter to adapter with ``set_adapter``."""
    torch.set_num_threads(cpu_count())
    model = build_model(setting, w)
    names = ["default", *(f"t{i}" for i in range(1, int(w.adapters)))]
    for name in names[1:]:
        model.add_adapter(name, lora_config(setting, w))
    model.eval()
    tokens = torch.from_numpy(token_batch(w)[0]).long()
    per_row = [names[i - 1] for i in adapter_ids(w)]

    def switch_to(i: int) -> None:
        model.set_adapter(names[i])
        model(tokens)

    with torch.inference_mode():
        times = time_calls(lambda: model(tokens, adapter_names=per_row), w)
        switch_times = time_switches(switch_to, len(names))
    total = sum(p.numel() for p in model.parameters())
    return Measurement(times, total_params=total, switch_times_s=switch_times)


RUNNERS = {
    "torch-peft": run,
    "torch-peft-dora": functools.partial(run, dora=True),
    "torch-full": run,
    "torch-floor": run,
    "torch-peft-fwd": run_forward,
    "torch-peft-mixed": run_forward_mixed,
}
