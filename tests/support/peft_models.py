"""A tiny torch model and its flax linen twin, with the same module names, for PEFT parity.

torch ``layers.0.q_proj`` is flax ``layers_0/q_proj`` (`jaxlora.peft_module_map()`'s rule).
The model has every layer kind PEFT exports: Embedding, Linear, and a Linear head to use
as ``modules_to_save``.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch

VOCAB, WIDTH, CLASSES, LAYERS = 11, 8, 3, 2


class TorchBlock(torch.nn.Module):
    """``h + tanh(q_proj(h)) * v_proj(h)``."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(WIDTH, WIDTH)
        self.v_proj = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.q_proj(h)) * self.v_proj(h)


class TorchNet(torch.nn.Module):
    """``classifier(mean(blocks(embed(ids))))``: ids ``(batch, seq)`` -> logits ``(batch, 3)``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(LAYERS)])
        self.classifier = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.classifier(h.mean(1))


class Block(nn.Module):
    """Flax twin of `TorchBlock`."""

    @nn.compact
    def __call__(self, h):
        return h + jnp.tanh(nn.Dense(WIDTH, name="q_proj")(h)) * nn.Dense(WIDTH, name="v_proj")(h)


class Net(nn.Module):
    """Flax twin of `TorchNet`."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, WIDTH, name="embed")(ids)
        for i in range(LAYERS):
            h = Block(name=f"layers_{i}")(h)
        return nn.Dense(CLASSES, name="classifier")(h.mean(1))


def flax_params(model: torch.nn.Module) -> dict:
    """`Net` params holding the weights of a `TorchNet` (Linear kernels transposed)."""
    params: dict = {}
    for name, tensor in model.state_dict().items():
        module_name, leaf = name.rsplit(".", 1)
        value = tensor.detach().numpy().copy()
        if isinstance(model.get_submodule(module_name), torch.nn.Embedding):
            leaf = "embedding"
        elif leaf == "weight":
            leaf, value = "kernel", value.T
        node = params
        for part in re.sub(r"\.(\d+)", r"_\1", module_name).split("."):
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    return params


def ids(seed: int = 0, batch: int = 4, seq: int = 5) -> np.ndarray:
    """Deterministic token ids ``(batch, seq)``."""
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)
