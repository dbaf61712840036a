"""A tiny torch model and its flax linen twin, with the same module names, for PEFT parity.

torch ``layers.0.q_proj`` is flax ``layers_0/q_proj`` (`jaxlora.peft_module_map()`'s rule).
The model has every layer kind PEFT exports: Embedding, Linear, and a Linear head to use
as ``modules_to_save``. `NnxNet` is its NNX twin.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jaxlora
from tests.support.steps import moved

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


class NnxBlock(nnx.Module):
    """NNX twin of `TorchBlock`."""

    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.v_proj = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, h):
        return h + jnp.tanh(self.q_proj(h)) * self.v_proj(h)


class NnxNet(nnx.Module):
    """NNX twin of `TorchNet`: torch ``layers.0.q_proj`` is ``layers[0].q_proj``."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.layers = nnx.List([NnxBlock(rngs) for _ in range(LAYERS)])
        self.classifier = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.classifier(h.mean(1))


def nnx_net(model: torch.nn.Module) -> NnxNet:
    """An `NnxNet` holding the weights of a `TorchNet` (Linear kernels transposed)."""
    net = NnxNet(nnx.Rngs(0))
    for name, tensor in model.state_dict().items():
        module_name, leaf = name.rsplit(".", 1)
        node = net
        for part in module_name.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        value = tensor.detach().numpy()
        if isinstance(node, nnx.Embed):
            node.embedding[...] = value
        elif leaf == "weight":
            node.kernel[...] = value.T
        else:
            node.bias[...] = value
    return net


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


def torch_logits(model: torch.nn.Module, token_ids: np.ndarray) -> np.ndarray:
    """``model``'s logits on ``token_ids``, without gradients."""
    with torch.no_grad():
        return model(torch.from_numpy(token_ids)).numpy()


def jax_logits(config: jaxlora.LoraConfig, params: dict, token_ids: np.ndarray) -> np.ndarray:
    """`Net`'s logits with the adapted ``params`` of ``config`` on ``token_ids``."""
    return np.asarray(jaxlora.LoraModel(Net(), config).apply({"params": params}, token_ids))


def assert_same_logits(
    model: torch.nn.Module, config: jaxlora.LoraConfig, params: dict, token_ids, tolerance: float
) -> None:
    """The torch ``model`` and the adapted `Net` agree on ``token_ids`` within ``tolerance``."""
    got, want = jax_logits(config, params, token_ids), torch_logits(model, token_ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)


def lorafied_and_moved(base_params: dict, config: jaxlora.LoraConfig, key) -> dict:
    """`Net` adapted by ``config``, every trainable leaf moved by 0.1·N(0, 1) (seed 1), so
    the adapters are not at their initial values."""
    _, lora_params = jaxlora.lorafy(Net(), base_params, config, ids(), key=key)
    return moved(lora_params, 0.1)
